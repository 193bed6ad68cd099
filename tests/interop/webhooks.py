"""keygate's webhooks received by a plain Python HTTP server and verified by the `standardwebhooks`
library from PyPI (the Standard Webhooks reference implementation), not by keygate's code
(issue 15): a revocation, a test event, a retry after the receiver failed, the delivery log.

Environment: KEYGATE_ADMIN_URL, KEYGATE_ROOT_KEY, INTEROP_RESULTS. keygate runs with
[webhooks] allow_private = true (the receiver is on loopback).
"""

import http.server
import json
import os
import threading
import time
import urllib.error
import urllib.request

from standardwebhooks.webhooks import Webhook, WebhookVerificationError

from checks import Checks, create_token


class Receiver(http.server.BaseHTTPRequestHandler):
    """Records every request; answers 503 to the first request of a message listed in `fail_once`."""

    received = []
    fail_once = set()
    lock = threading.Lock()

    def do_POST(self):
        body = self.rfile.read(int(self.headers.get("content-length", "0")))
        headers = {k.lower(): v for k, v in self.headers.items()}
        with self.lock:
            self.received.append((headers, body))
            msg = json.loads(body).get("type")
            fail = msg in self.fail_once
            self.fail_once.discard(msg)
        self.send_response(503 if fail else 204)
        self.send_header("content-length", "0")
        self.end_headers()

    def log_message(self, *args):
        pass


def api(method, path, body=None):
    admin, key = os.environ["KEYGATE_ADMIN_URL"], os.environ["KEYGATE_ROOT_KEY"]
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(admin + path, data=data, method=method, headers={
        "authorization": f"Bearer {key}", "content-type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            raw = resp.read()
            return resp.status, json.loads(raw) if raw else None
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"null")


def wait_for(predicate, seconds=20):
    deadline = time.time() + seconds
    while time.time() < deadline:
        with Receiver.lock:
            found = [r for r in Receiver.received if predicate(r)]
        if found:
            return found
        time.sleep(0.1)
    return []


def of_type(kind):
    return lambda r: json.loads(r[1]).get("type") == kind


def fresh_test_event(endpoint_id):
    """Forgets what was received, sends the endpoint a test event and waits for it."""
    with Receiver.lock:
        Receiver.received.clear()
    api("POST", f"/admin/v1/webhooks/{endpoint_id}/test")
    return wait_for(of_type("webhook.test"))


def main():
    checks = Checks("webhooks")
    check = checks.check
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Receiver)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}/hooks/keygate"

    status, created = api("POST", "/admin/v1/webhooks", {
        "url": url, "description": "interop receiver", "event_types": ["token.revoked", "token.suspended"]})
    check("an endpoint is created with its secret shown once", status == 201 and created["secret"].startswith("whsec_"), (status, created))
    secret = created["secret"]
    hook = Webhook(secret)
    status, listed = api("GET", "/admin/v1/webhooks")
    check("the list never shows the secret", status == 200 and secret not in json.dumps(listed), listed)

    token = create_token(os.environ["KEYGATE_ADMIN_URL"], os.environ["KEYGATE_ROOT_KEY"], {"name": "to-revoke"})
    status, _ = api("POST", f"/admin/v1/tokens/{token['id']}/revoke", {"reason": "leaked"})
    check("the token is revoked", status == 200, status)
    got = wait_for(of_type("token.revoked"))
    check("token.revoked reaches the receiver", len(got) == 1, Receiver.received)
    if got:
        headers, body = got[0]
        try:
            payload = hook.verify(body, headers)
            check("standardwebhooks verifies keygate's signature", True)
            check("the payload names the token", payload["data"]["target"] == token["id"], payload)
        except WebhookVerificationError as e:
            check("standardwebhooks verifies keygate's signature", False, e)
        try:
            hook.verify(body.replace(b"leaked", b"LEAKED"), headers)
            check("a changed body fails verification", False)
        except WebhookVerificationError:
            check("a changed body fails verification", True)
        try:
            Webhook("whsec_" + "QUFBQUFBQUFBQUFBQUFBQUFBQUFBQUFBQUFBQUFBQUE=").verify(body, headers)
            check("another secret fails verification", False)
        except WebhookVerificationError:
            check("another secret fails verification", True)
        check("no token secret in the message", token["token"].encode() not in body and secret.encode() not in body)
    check("token.created is not sent (not subscribed)", not wait_for(of_type("token.created"), 1))

    status, delivery = api("POST", f"/admin/v1/webhooks/{created['id']}/test")
    check("a test event is queued", status == 202 and delivery["event_type"] == "webhook.test", (status, delivery))
    got = wait_for(of_type("webhook.test"))
    try:
        ok = bool(got) and hook.verify(got[0][1], got[0][0])["type"] == "webhook.test"
    except WebhookVerificationError:
        ok = False
    check("the test event arrives, verified", ok, got)

    # The receiver fails once: keygate retries about 5 s later with the same webhook-id.
    Receiver.fail_once.add("token.suspended")
    token = create_token(os.environ["KEYGATE_ADMIN_URL"], os.environ["KEYGATE_ROOT_KEY"], {"name": "to-suspend"})
    api("POST", f"/admin/v1/tokens/{token['id']}/suspend")
    both = []
    deadline = time.time() + 30
    while time.time() < deadline and len(both) < 2:
        both = wait_for(of_type("token.suspended"), 1)
    check("a failed delivery is retried", len(both) == 2, len(both))
    if len(both) == 2:
        check("with the same webhook-id", both[0][0]["webhook-id"] == both[1][0]["webhook-id"])
        try:
            hook.verify(both[1][1], both[1][0])
            check("the retry verifies", True)
        except WebhookVerificationError as e:
            check("the retry verifies", False, e)
    suspended, deadline = [], time.time() + 10
    while time.time() < deadline:  # the attempt is recorded after the receiver's answer
        status, page = api("GET", f"/admin/v1/webhooks/{created['id']}/deliveries")
        suspended = [d for d in (page or {}).get("data", []) if d["event_type"] == "token.suspended"]
        if suspended and suspended[0]["state"] == "delivered":
            break
        time.sleep(0.1)
    if suspended:
        status, detail = api("GET", f"/admin/v1/webhook-deliveries/{suspended[0]['id']}")
        statuses = [a["status"] for a in detail.get("attempts_log", [])]
        check("the delivery log shows both attempts", statuses == [503, 204], detail)
    else:
        check("the delivery log lists the delivery", False, page)

    # A rotation with an overlap: each message is signed with the new secret and the old one, and
    # the library accepts it with either (receivers move to the new secret at their own pace).
    status, rotated = api("POST", f"/admin/v1/webhooks/{created['id']}/rotate-secret", {"overlap_seconds": 3600})
    check("a rotation with an overlap shows the new secret once",
          status == 200 and rotated["secret"].startswith("whsec_") and rotated["secret"] != secret
          and rotated.get("previous_secret_until"), (status, rotated))
    got = fresh_test_event(created["id"])
    if got:
        headers, body = got[0]
        check("both signatures are sent", len(headers["webhook-signature"].split(" ")) == 2, headers)
        for name, s in [("the new secret", rotated["secret"]), ("the old secret", secret)]:
            try:
                Webhook(s).verify(body, headers)
                check(f"standardwebhooks verifies with {name} during the overlap", True)
            except WebhookVerificationError as e:
                check(f"standardwebhooks verifies with {name} during the overlap", False, e)
    else:
        check("the test event arrives after the rotation", False, Receiver.received)
    # Rotated again without an overlap: the old secrets no longer verify.
    status, last = api("POST", f"/admin/v1/webhooks/{created['id']}/rotate-secret")
    got = fresh_test_event(created["id"])
    if got:
        headers, body = got[0]
        try:
            Webhook(last["secret"]).verify(body, headers)
            check("after a rotation without overlap, the new secret verifies", True)
        except WebhookVerificationError as e:
            check("after a rotation without overlap, the new secret verifies", False, e)
        try:
            Webhook(rotated["secret"]).verify(body, headers)
            check("and the replaced one does not", False)
        except WebhookVerificationError:
            check("and the replaced one does not", True)
    else:
        check("the test event arrives after the second rotation", False, Receiver.received)
    server.shutdown()
    checks.finish()


if __name__ == "__main__":
    main()
