"""A real SMTP server for the interoperability test: aiosmtpd (PyPI), requiring AUTH (user
`keygate`, password `smtp-secret`) over a plain connection on loopback. Every message accepted is
written to OUTDIR as <n>.eml, with <n>.json beside it (envelope sender, recipients, the
authenticated user). Writes its port, then a newline, to PORTFILE once it listens.

    python3 tests/interop/smtp_server.py PORTFILE OUTDIR
"""

import json
import os
import signal
import socket
import sys
import threading
import warnings

from aiosmtpd.controller import Controller
from aiosmtpd.smtp import AuthResult, LoginPassword

USER, PASSWORD = b"keygate", b"smtp-secret"


def authenticator(server, session, envelope, mechanism, auth_data):
    ok = isinstance(auth_data, LoginPassword) and auth_data.login == USER and auth_data.password == PASSWORD
    return AuthResult(success=ok, auth_data=auth_data if ok else None)


class Store:
    def __init__(self, outdir):
        self.outdir, self.n, self.lock = outdir, 0, threading.Lock()

    async def handle_DATA(self, server, session, envelope):
        with self.lock:
            self.n += 1
            n = self.n
        meta = {"from": envelope.mail_from, "to": envelope.rcpt_tos,
                "auth": session.authenticated and session.auth_data.login.decode()}
        with open(os.path.join(self.outdir, f"{n}.eml"), "wb") as f:
            f.write(envelope.original_content)
        with open(os.path.join(self.outdir, f"{n}.json.tmp"), "w") as f:
            json.dump(meta, f)
        os.rename(os.path.join(self.outdir, f"{n}.json.tmp"), os.path.join(self.outdir, f"{n}.json"))
        return "250 Message accepted"


def main(portfile, outdir):
    # AUTH without TLS is what this loopback test wants; the warning says so on every start.
    warnings.filterwarnings("ignore", message="Requiring AUTH while not requiring TLS")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    controller = Controller(Store(outdir), hostname="127.0.0.1", port=port, authenticator=authenticator,
                            auth_required=True, auth_require_tls=False)
    controller.start()
    with open(portfile + ".tmp", "w") as f:
        f.write(f"{port}\n")
    os.rename(portfile + ".tmp", portfile)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    stop.wait()
    controller.stop()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
