"""keygate's audit trail streamed to a syslog receiver (tests/interop/syslog_server.py), whose
messages are parsed by the `syslog-rfc5424-parser` package (issue 15): a token's creation and
revocation arrive as RFC 5424 messages with keygate's structured data and the event as JSON.

Environment: KEYGATE_ADMIN_URL, KEYGATE_ROOT_KEY, SYSLOG_OUT, INTEROP_RESULTS.
"""

import json
import os
import time
import urllib.request

from checks import Checks, create_token


def main():
    checks = Checks("siem")
    check = checks.check
    admin, key = os.environ["KEYGATE_ADMIN_URL"], os.environ["KEYGATE_ROOT_KEY"]
    token = create_token(admin, key, {"name": "streamed-to-siem"})
    req = urllib.request.Request(f"{admin}/admin/v1/tokens/{token['id']}/revoke", data=b'{"reason": "rotated out"}',
                                 method="POST", headers={"authorization": f"Bearer {key}", "content-type": "application/json"})
    with urllib.request.urlopen(req, timeout=10) as resp:
        check("the token is revoked", resp.status == 200, resp.status)

    found, deadline = {}, time.time() + 20
    while time.time() < deadline and len(found) < 2:
        if os.path.exists(os.environ["SYSLOG_OUT"]):
            with open(os.environ["SYSLOG_OUT"]) as f:
                for line in f:
                    m = json.loads(line)
                    sd = (m.get("sd") or {}).get("keygate@32473", {})
                    if sd.get("target") == token["id"]:
                        found[m.get("msgid")] = m
        time.sleep(0.1)
    unparsed = []
    if os.path.exists(os.environ["SYSLOG_OUT"]):
        with open(os.environ["SYSLOG_OUT"]) as f:
            unparsed = [l for l in f if '"unparsed"' in l]
    check("every message keygate sent parses as RFC 5424", not unparsed, unparsed[:1])
    check("the creation arrived", "token.create" in found, list(found))
    check("the revocation arrived", "token.revoke" in found, list(found))
    m = found.get("token.revoke", {})
    check("facility log audit", m.get("facility") == "audit", m.get("facility"))
    check("a revocation is a warning", m.get("severity") == "warning", m.get("severity"))
    check("app name keygate, version 1", m.get("appname") == "keygate" and m.get("version") == 1, m)
    body = json.loads((m.get("msg") or "{}").lstrip("\ufeff"))
    check("the message is the event as JSON", body.get("action") == "token.revoke"
          and body.get("after", {}).get("revoke_reason") == "rotated out", body)
    check("with its audit-chain link", len(body.get("link", "")) == 64 and body.get("chain_seq", 0) > 0, body)
    check("no secret streamed", token["token"] not in json.dumps(found))
    checks.finish()


if __name__ == "__main__":
    main()
