"""Runs the Python verification example of docs/api.md (docs/examples/verify.py) against a running
keygate, so that the documented code is known to work.

Environment (set by scripts/interop-test):
  KEYGATE_ADMIN_URL   the admin listener, such as http://127.0.0.1:18081
  KEYGATE_ROOT_KEY    a root key with tokens:write and tokens:verify
  INTEROP_RESULTS     a file to append "verify-example <passed> <failed>" to
"""

import json
import os
import sys
import urllib.request

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "docs", "examples"))
from verify import verify  # noqa: E402

URL = os.environ["KEYGATE_ADMIN_URL"]
KEY = os.environ["KEYGATE_ROOT_KEY"]
PASSED = FAILED = 0


def check(name, ok, detail=""):
    global PASSED, FAILED
    if ok:
        PASSED += 1
        print(f"ok    {name}")
    else:
        FAILED += 1
        print(f"FAIL  {name} {detail}")


def create_token(body):
    req = urllib.request.Request(
        URL + "/admin/v1/tokens", data=json.dumps(body).encode(), method="POST",
        headers={"Authorization": "Bearer " + KEY, "Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=10) as resp:
        return json.load(resp)


created = create_token({"name": "verify-example", "scopes": ["orders:read"], "quota": {"requests": 3, "period": "day"}})
token = created["token"]
r = verify(URL, KEY, token, "orders:read")
check("a valid token is ok", r["valid"] and r["code"] == "ok" and r["token_id"] == created["id"], r)
check("the quota is reported", r.get("quota", {}).get("remaining") == 2, r)
r = verify(URL, KEY, token, "orders:write")
check("another scope is insufficient_scope", not r["valid"] and r["code"] == "insufficient_scope", r)
r = verify(URL, KEY, token, cost=5)
check("a cost above the quota is quota_exceeded", r["code"] == "quota_exceeded", r)
r = verify(URL, KEY, "kg_not_a_token")
check("garbage is malformed_token", r["code"] == "malformed_token", r)
try:
    verify(URL, KEY, token, cost=5000)
    check("a cost out of range raises", False)
except RuntimeError as e:
    check("a cost out of range raises with its code", "invalid_cost" in str(e), e)

results = os.environ.get("INTEROP_RESULTS")
if results:
    with open(results, "a") as f:
        f.write(f"verify-example {PASSED} {FAILED}\n")
sys.exit(1 if FAILED else 0)
