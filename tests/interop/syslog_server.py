"""A syslog receiver for the interoperability test: RFC 6587 octet-counted frames over TCP, each
message parsed by the `syslog-rfc5424-parser` package (PyPI), not by keygate's code. Every parsed
message is appended to OUTFILE as a line of JSON (a message that does not parse is written as
{"unparsed": …}). Writes its port, then a newline, to PORTFILE once it listens.

    python3 tests/interop/syslog_server.py PORTFILE OUTFILE
"""

import json
import os
import signal
import socketserver
import sys
import threading

from syslog_rfc5424_parser import SyslogMessage

LOCK = threading.Lock()


class Frames(socketserver.StreamRequestHandler):
    def handle(self):
        buf = b""
        while True:
            chunk = self.request.recv(65536)
            if not chunk:
                return
            buf += chunk
            while b" " in buf:
                count, rest = buf.split(b" ", 1)
                n = int(count)
                if len(rest) < n:
                    break
                message, buf = rest[:n].decode("utf-8"), rest[n:]
                try:
                    out = SyslogMessage.parse(message).as_dict()
                except Exception as e:  # the parser's own errors
                    out = {"unparsed": message, "error": str(e)}
                with LOCK, open(self.server.outfile, "a") as f:
                    f.write(json.dumps(out) + "\n")


def main(portfile, outfile):
    server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), Frames)
    server.daemon_threads = True
    server.outfile = outfile
    with open(portfile + ".tmp", "w") as f:
        f.write(f"{server.server_address[1]}\n")
    os.rename(portfile + ".tmp", portfile)
    signal.signal(signal.SIGTERM, lambda *_: threading.Thread(target=server.shutdown).start())
    server.serve_forever()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
