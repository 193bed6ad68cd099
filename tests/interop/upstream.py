"""The upstream API behind keygate's gateway in the interoperability test.

Answers every request with 200 and a JSON echo of what it received:
{"method", "path", "request_line", "headers": {lower-case name: value}}, so the tests can see what
the gateway forwarded (keygate's identity headers, and that the credential is gone). Listens on
127.0.0.1 at a port the kernel picks and writes that port, then a newline, to the file named by
its first argument once it accepts connections. Stops on SIGTERM.

    python3 tests/interop/upstream.py /tmp/upstream.port
"""

import json
import os
import signal
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class Echo(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def _echo(self):
        length = int(self.headers.get("content-length") or 0)
        body = self.rfile.read(length) if length else b""
        headers = {}
        for name, value in self.headers.items():
            key = name.lower()
            headers[key] = value if key not in headers else headers[key] + ", " + value
        out = json.dumps(
            {
                "method": self.command,
                "path": self.path,
                "request_line": self.requestline,
                "headers": headers,
                "body": body.decode("utf-8", "replace"),
            }
        ).encode()
        self.send_response(200)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(out)))
        self.end_headers()
        self.wfile.write(out)

    do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = _echo

    def log_message(self, format, *args):  # noqa: A002 - the base class's name
        pass


def main():
    port_file = sys.argv[1]
    server = ThreadingHTTPServer(("127.0.0.1", 0), Echo)
    server.daemon_threads = True
    tmp = port_file + ".tmp"
    with open(tmp, "w") as f:
        f.write(f"{server.server_address[1]}\n")
    os.replace(tmp, port_file)  # the port appears whole, never half written
    signal.signal(signal.SIGTERM, lambda *_: threading.Thread(target=server.shutdown).start())
    server.serve_forever()


if __name__ == "__main__":
    main()
