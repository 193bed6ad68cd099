"""Verify a keygate token from a Python service (standard library only).

    from verify import verify
    result = verify("http://127.0.0.1:8081", root_key, presented_token, "orders:read", cost=1)
    if not result["valid"]:
        ...  # refuse the call; result["code"] says why

Run as a script it verifies one token: python3 verify.py URL TOKEN [SCOPE], with the root key
(permission tokens:verify) in KEYGATE_ROOT_KEY. It exits 0 when the token is valid.
"""
import json
import os
import sys
import urllib.error
import urllib.request


def verify(base_url, root_key, token, scope=None, cost=1, ip=None, timeout=2.0):
    """Returns keygate's answer as a dict: {"valid": bool, "code": str, ...}.

    Raises RuntimeError with keygate's error code for a refused request (bad key: 401, missing
    permission: 403, invalid input: 400), and OSError when keygate cannot be reached.
    """
    body = {"token": token, "cost": cost}
    if scope:
        body["scope"] = scope
    if ip:
        body["ip"] = ip
    req = urllib.request.Request(
        base_url.rstrip("/") + "/admin/v1/verify",
        data=json.dumps(body).encode(),
        headers={"Authorization": "Bearer " + root_key, "Content-Type": "application/json"},
        method="POST",
    )
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return json.load(resp)
    except urllib.error.HTTPError as e:
        error = json.load(e).get("error", {})
        raise RuntimeError(f"keygate answered {e.code}: {error.get('code')}: {error.get('message')}") from None


if __name__ == "__main__":
    if len(sys.argv) < 3:
        sys.exit("usage: verify.py URL TOKEN [SCOPE]  (root key in KEYGATE_ROOT_KEY)")
    result = verify(sys.argv[1], os.environ["KEYGATE_ROOT_KEY"], sys.argv[2], sys.argv[3] if len(sys.argv) > 3 else None)
    print(json.dumps(result))
    sys.exit(0 if result["valid"] else 1)
