"""Runs the Python verification example of docs/api.md (docs/examples/verify.py) against a running
keygate, so that the documented code is known to work.

Environment (set by scripts/interop-test):
  KEYGATE_ADMIN_URL   the admin listener, such as http://127.0.0.1:18081
  KEYGATE_ROOT_KEY    a root key with tokens:write and tokens:verify
  INTEROP_RESULTS     a file to append "verify-example <passed> <failed>" to
"""

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "docs", "examples"))
from verify import verify  # noqa: E402

from checks import Checks, create_token  # noqa: E402

URL = os.environ["KEYGATE_ADMIN_URL"]
KEY = os.environ["KEYGATE_ROOT_KEY"]
checks = Checks("verify-example")
check = checks.check

created = create_token(URL, KEY, {"name": "verify-example", "scopes": ["orders:read"], "quota": {"requests": 3, "period": "day"}})
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

checks.finish()
