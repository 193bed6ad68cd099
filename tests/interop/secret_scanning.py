"""A code-hosting platform's secret-scanning report, signed by Python's `cryptography` (not by
keygate's code), sent to keygate's partner endpoint (issue 15).

  secret_scanning.py keygen DIR   writes DIR/partner.pem (private) and DIR/partner.pub.pem (public),
                                  before keygate starts: scripts/interop-test puts the public key
                                  into [secret_scanning]
  secret_scanning.py DIR          the checks, against the running keygate

Environment: KEYGATE_ADMIN_URL, KEYGATE_GATEWAY_URL, KEYGATE_ROOT_KEY, INTEROP_RESULTS.
"""

import base64
import hashlib
import json
import os
import sys
import urllib.error
import urllib.request

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

KEY_ID = "interop-partner-key"


def keygen(directory):
    key = ec.generate_private_key(ec.SECP256R1())
    with open(os.path.join(directory, "partner.pem"), "wb") as f:
        f.write(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    with open(os.path.join(directory, "partner.pub.pem"), "wb") as f:
        f.write(key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))


def post(url, body, key_id, signature):
    req = urllib.request.Request(url, data=body, method="POST", headers={
        "content-type": "application/json",
        "Github-Public-Key-Identifier": key_id,
        "Github-Public-Key-Signature": signature,
    })
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"null")


def main(directory):
    from checks import Checks, create_token

    admin, key = os.environ["KEYGATE_ADMIN_URL"], os.environ["KEYGATE_ROOT_KEY"]
    url = os.environ["KEYGATE_GATEWAY_URL"] + "/.well-known/keygate/secret-scanning"
    checks = Checks("secret-scanning")
    check = checks.check
    with open(os.path.join(directory, "partner.pem"), "rb") as f:
        private = serialization.load_pem_private_key(f.read(), password=None)

    created = create_token(admin, key, {"name": "leaked-on-a-forge"})
    body = json.dumps([{
        "token": created["token"], "type": "keygate_token",
        "url": "https://example.com/acme/app/blob/main/.env", "source": "content",
    }]).encode()
    # cryptography signs ECDSA as ASN.1 DER by default: the format GitHub uses.
    signature = base64.b64encode(private.sign(body, ec.ECDSA(hashes.SHA256()))).decode()

    status, answer = post(url, body + b" ", KEY_ID, signature)
    check("a body that is not the one signed is refused", status == 401, (status, answer))
    status, answer = post(url, body, "another-key", signature)
    check("an unknown key identifier is refused", status == 401, (status, answer))
    status, answer = post(url, body, KEY_ID, signature)
    check("the signed report is accepted", status == 200, (status, answer))
    expected = hashlib.sha256(created["token"].encode()).hexdigest()
    first = (answer or [{}])[0] if isinstance(answer, list) else {}
    check("the token is labelled true_positive by its SHA-256", first.get("label") == "true_positive" and first.get("token_hash") == expected, answer)
    check("the answer never holds the secret", created["token"] not in json.dumps(answer), answer)
    req = urllib.request.Request(f"{admin}/admin/v1/tokens/{created['id']}", headers={"authorization": f"Bearer {key}"})
    with urllib.request.urlopen(req, timeout=10) as resp:
        token = json.loads(resp.read())
    check("the token is marked exposed", token.get("exposed_at") is not None, token)
    checks.finish()


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "keygen":
        keygen(sys.argv[2])
    elif len(sys.argv) == 2:
        main(sys.argv[1])
    else:
        sys.exit("usage: secret_scanning.py keygen DIR | secret_scanning.py DIR")
