"""keygate's email notifications received by a real SMTP server (aiosmtpd, tests/interop/
smtp_server.py) and read with Python's email parser (issue 15): a token reported exposed is
emailed to the workspace's owner, through SMTP AUTH, as plain text and HTML, without any secret.

Environment: KEYGATE_ADMIN_URL, KEYGATE_ROOT_KEY, KEYGATE_LOG (keygate's terminal output, for the
dashboard's setup code), SMTP_OUTDIR, INTEROP_RESULTS.
"""

import email
import email.policy
import json
import os
import re
import time
import urllib.parse
import urllib.request

from checks import Checks, create_token


class NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args, **kwargs):
        return None


def main():
    checks = Checks("email")
    check = checks.check
    admin, key = os.environ["KEYGATE_ADMIN_URL"], os.environ["KEYGATE_ROOT_KEY"]
    outdir = os.environ["SMTP_OUTDIR"]
    with open(os.environ["KEYGATE_LOG"]) as f:
        codes = re.findall(r"dashboard setup code: (\S+)", f.read())
    code = codes[-1] if codes else None
    check("keygate printed the dashboard's setup code", code is not None)
    if code is None:
        checks.finish()
    form = urllib.parse.urlencode({"code": code, "name": "Olivia Owner",
                                   "email": "olivia@example.com", "password": "correct horse battery staple"}).encode()
    opener = urllib.request.build_opener(NoRedirect)
    try:
        opener.open(urllib.request.Request(admin + "/setup", data=form, method="POST"), timeout=10)
        status = 200
    except urllib.error.HTTPError as e:
        status = e.code
    check("the first owner signs up", status == 303, status)

    token = create_token(admin, key, {"name": "leaky"})
    body = json.dumps({"findings": [{"token": token["token"], "location": "https://paste.example/abc"}]}).encode()
    req = urllib.request.Request(admin + "/admin/v1/tokens/exposures", data=body, method="POST",
                                 headers={"authorization": f"Bearer {key}", "content-type": "application/json"})
    with urllib.request.urlopen(req, timeout=10) as resp:
        check("the exposure is reported", resp.status == 200, resp.status)

    meta, raw, deadline = None, None, time.time() + 20
    while time.time() < deadline and meta is None:
        for name in sorted(os.listdir(outdir)):
            if name.endswith(".json"):
                with open(os.path.join(outdir, name)) as f:
                    m = json.load(f)
                with open(os.path.join(outdir, name[:-5] + ".eml"), "rb") as f:
                    r = f.read()
                if b"exposed" in r:
                    meta, raw = m, r
        time.sleep(0.1)
    check("the SMTP server received the email", meta is not None)
    if meta is None:
        checks.finish()
    check("keygate authenticated with SMTP AUTH", meta["auth"] == "keygate", meta)
    check("to the workspace's owner", meta["to"] == ["olivia@example.com"], meta)
    msg = email.message_from_bytes(raw, policy=email.policy.default)
    check("from the configured sender", "keygate@example.com" in str(msg["From"]), msg["From"])
    check("a subject that says what happened", "exposed" in str(msg["Subject"]), msg["Subject"])
    check("multipart/alternative", msg.get_content_type() == "multipart/alternative", msg.get_content_type())
    text = msg.get_body(preferencelist=("plain",))
    html = msg.get_body(preferencelist=("html",))
    check("a plain-text body naming the token", text is not None and token["id"] in text.get_content())
    check("an HTML body naming the token", html is not None and token["id"] in html.get_content())
    check("where it was found", text is not None and "paste.example" in text.get_content())
    check("no secret in the message", token["token"].encode() not in raw and b"kgroot_" not in raw)
    checks.finish()


if __name__ == "__main__":
    main()
