"""keygate's OAuth2 server and gateway, driven by Python clients that other people wrote.

authlib and requests-oauthlib get tokens (client credentials with client_secret_basic and
client_secret_post, refresh with rotation and reuse detection), introspect them (RFC 7662) and
revoke them (RFC 7009); PyJWT and jwcrypto verify the issued access tokens against the published
JWKS (RFC 9068 claims, `typ` at+jwt); jwcrypto makes DPoP proofs (RFC 9449) and computes JWK
thumbprints (RFC 7638) that must equal the `cnf.jkt` keygate puts in bound tokens; requests calls
the gateway with the tokens. Every check prints one line; the run ends with "python: N passed,
N failed" and exits 1 on any failure. A failed check stops the rest of its section (the later
checks of a section build on the earlier ones), never the other sections.

Run by scripts/interop-test, which starts keygate and the echo upstream and sets:
  KEYGATE_ADMIN_URL   http://127.0.0.1:<admin port>
  KEYGATE_GATEWAY_URL http://127.0.0.1:<gateway port>
  KEYGATE_ISSUER      the configured [oauth] issuer (= the gateway URL)
  KEYGATE_ROOT_KEY    a root key (all permissions) of the default workspace
  INTEROP_RESULTS     a file to append "python <passed> <failed>" to
"""

import base64
import hashlib
import hmac
import json
import os
import sys
import time
import traceback
import uuid
import warnings
from pathlib import Path

# joserfc (under authlib) warns on every use of the alg name "EdDSA" (deprecated by RFC 9864 in
# favour of "Ed25519"); keygate accepts both, and the test keeps "EdDSA", without the noise.
warnings.filterwarnings("ignore", message="EdDSA is deprecated")

# Both client libraries refuse plain http:// unless told it is fine; the test runs on loopback.
os.environ["AUTHLIB_INSECURE_TRANSPORT"] = "1"
os.environ["OAUTHLIB_INSECURE_TRANSPORT"] = "1"

import jwt as pyjwt  # PyJWT  # noqa: E402
import requests  # noqa: E402
from authlib.integrations.requests_client import OAuth2Session as AuthlibSession  # noqa: E402
from authlib.integrations.requests_client import OAuthError as AuthlibOAuthError  # noqa: E402
from authlib.oauth2.rfc7523 import PrivateKeyJWT  # noqa: E402
from joserfc.jwk import ECKey as JoseECKey  # noqa: E402
from joserfc.jwk import OKPKey as JoseOKPKey  # noqa: E402
from jwcrypto import jwk as jw_jwk  # noqa: E402
from jwcrypto import jws as jw_jws  # noqa: E402
from jwcrypto import jwt as jw_jwt  # noqa: E402
from oauthlib.oauth2 import BackendApplicationClient  # noqa: E402
from requests_oauthlib import OAuth2Session as OAuthlibSession  # noqa: E402

ADMIN = os.environ["KEYGATE_ADMIN_URL"].rstrip("/")
GATEWAY = os.environ["KEYGATE_GATEWAY_URL"].rstrip("/")
ISSUER = os.environ["KEYGATE_ISSUER"].rstrip("/")
ROOT_KEY = os.environ["KEYGATE_ROOT_KEY"]
VECTORS = Path(__file__).resolve().parent.parent / "vectors"
TIMEOUT = 10  # seconds per HTTP request

SCOPE = "orders:read"
ORDERS = f"{GATEWAY}/orders/1"

# ---------------------------------------------------------------------------------------------
# The check runner


class Failure(Exception):
    pass


PASSED = 0
FAILED = 0


def expect(cond, name, detail=""):
    """One check: prints "ok <name>" or raises, which fails the check and ends its section."""
    global PASSED
    if not cond:
        raise Failure(f"{name}" + (f"\n         {detail}" if detail else ""))
    PASSED += 1
    print(f"  ok    {name}", flush=True)


def section(title):
    def run(fn):
        global FAILED
        print(f"-- {title}", flush=True)
        try:
            fn()
        except Failure as e:
            FAILED += 1
            print(f"  FAIL  {e}", flush=True)
        except KeyError as e:  # S lacks what an earlier, failed section was to provide
            FAILED += 1
            print(f"  FAIL  {title}: needs {e} from an earlier section, which failed", flush=True)
        except Exception as e:  # a client library raised: that is a failure of this section too
            FAILED += 1
            print(f"  FAIL  {title}: {type(e).__name__}: {e}", flush=True)
            traceback.print_exc(limit=4, file=sys.stdout)
        return fn

    return run


def show(resp):
    """A response, for failure messages (bodies are short JSON here; tokens never appear in them)."""
    return f"HTTP {resp.status_code} {resp.headers.get('www-authenticate', '')} {resp.text[:300]}"


# ---------------------------------------------------------------------------------------------
# Helpers: the admin API (setup only), base64url, the gateway


def admin(method, path, body=None):
    r = requests.request(
        method,
        f"{ADMIN}{path}",
        json=body,
        headers={"Authorization": f"Bearer {ROOT_KEY}"},
        timeout=TIMEOUT,
    )
    if r.status_code >= 300:
        raise Failure(f"setup: admin API {method} {path} answered {show(r)}")
    return r.json()


def new_client(label, auth_method, grant_types=("client_credentials",), scopes=(SCOPE,)):
    """An app with an OAuth client (one client per app)."""
    app = admin("POST", "/admin/v1/apps", {"name": f"interop {label} {uuid.uuid4().hex[:6]}"})
    c = admin(
        "POST",
        f"/admin/v1/apps/{app['id']}/oauth-client",
        {
            "grant_types": list(grant_types),
            "scopes": list(scopes),
            "token_endpoint_auth_method": auth_method,
        },
    )
    c["app_id"] = app["id"]
    return c


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def b64url_json(part: str):
    return json.loads(base64.urlsafe_b64decode(part + "=" * (-len(part) % 4)))


def claims_of(token):
    return b64url_json(token.split(".")[1])


def gateway_get(token, scheme="Bearer", proof=None, url=ORDERS):
    headers = {"Authorization": f"{scheme} {token}"}
    if proof is not None:
        headers["DPoP"] = proof
    return requests.get(url, headers=headers, timeout=TIMEOUT)


def rfc7638_by_hand(key: dict) -> str:
    """RFC 7638 §3: SHA-256 of the required members, lexicographic order, no whitespace."""
    required = {"EC": ("crv", "kty", "x", "y"), "OKP": ("crv", "kty", "x"), "RSA": ("e", "kty", "n")}[key["kty"]]
    canonical = json.dumps({k: key[k] for k in required}, separators=(",", ":"), sort_keys=True)
    return b64url(hashlib.sha256(canonical.encode()).digest())


def authlib_session(c, **kw):
    s = AuthlibSession(
        client_id=c["client_id"],
        client_secret=c["client_secret"],
        token_endpoint_auth_method=c["token_endpoint_auth_method"],
        revocation_endpoint_auth_method=c["token_endpoint_auth_method"],
        **kw,
    )
    # authlib raises OAuthError from the body alone; keep the HTTP response to check its status.
    s.last = None

    def keep(resp):
        s.last = resp
        return resp

    s.register_compliance_hook("access_token_response", keep)
    s.register_compliance_hook("refresh_token_response", keep)
    return s


def authlib_error(session, call):
    """Runs a token request that must fail; returns (HTTP status, RFC 6749 error code, response)."""
    try:
        call()
    except AuthlibOAuthError as e:
        resp = session.last
        return (resp.status_code if resp is not None else None), e.error, resp
    return None, None, session.last


DEFAULT_FORM_HEADERS = {
    "Accept": "application/json",
    "Content-Type": "application/x-www-form-urlencoded;charset=UTF-8",
}

# ---------------------------------------------------------------------------------------------
# The state the sections share

S = {}


@section("discovery: RFC 8414 metadata and the JWK Set (requests, jwcrypto)")
def _():
    r = requests.get(f"{GATEWAY}/.well-known/oauth-authorization-server", timeout=TIMEOUT)
    expect(r.status_code == 200 and r.headers.get("content-type", "").startswith("application/json"),
           "GET /.well-known/oauth-authorization-server on the gateway answers JSON", show(r))
    md = r.json()
    S.update(md)  # the endpoints, for the other sections, whatever the checks below find
    # The clients most sections use (the first client also makes keygate create its signing key).
    S["basic"] = new_client("basic", "client_secret_basic")
    S["post"] = new_client("post", "client_secret_post")
    expect(md.get("issuer") == ISSUER, f"metadata issuer is the configured issuer {ISSUER}", md.get("issuer"))
    for name, path in [
        ("token_endpoint", "/oauth2/token"),
        ("introspection_endpoint", "/oauth2/introspect"),
        ("revocation_endpoint", "/oauth2/revoke"),
        ("jwks_uri", "/.well-known/jwks.json"),
    ]:
        expect(md.get(name) == ISSUER + path, f"metadata {name} = issuer + {path}", md.get(name))
    for m in ("client_secret_basic", "client_secret_post"):
        expect(m in md.get("token_endpoint_auth_methods_supported", []),
               f"metadata lists token_endpoint_auth_method {m}", md.get("token_endpoint_auth_methods_supported"))
    for g in ("client_credentials", "refresh_token"):
        expect(g in md.get("grant_types_supported", []), f"metadata lists grant type {g}",
               md.get("grant_types_supported"))
    r = requests.get(md["jwks_uri"], timeout=TIMEOUT)
    expect(r.status_code == 200, "GET jwks_uri answers 200", show(r))
    keyset = jw_jwk.JWKSet.from_json(r.text)
    keys = list(keyset)
    expect(len(keys) >= 1, "jwcrypto loads the JWK Set and it has a key", r.text[:300])
    for k in keys:
        pub = k.export_public(as_dict=True)
        expect(pub.get("kty") == "OKP" and pub.get("crv") == "Ed25519" and k.get("alg") == "EdDSA"
               and k.get("use") == "sig" and k.get("kid"),
               f"JWKS key {k.get('kid')}: an Ed25519 (OKP) signing key with alg EdDSA, use sig and a kid",
               json.dumps(pub))
        expect(not k.has_private, f"JWKS key {k.get('kid')} has no private part", "")
    S["jwks_text"] = r.text


@section("thumbprint oracle: jwcrypto's RFC 7638 thumbprints of the RFC vectors (tests/vectors)")
def _():
    jose = json.loads((VECTORS / "jose.json").read_text())
    dpop = json.loads((VECTORS / "dpop.json").read_text())
    v = jose["rfc7638_rsa_thumbprint"]
    expect(jw_jwk.JWK(**v["jwk"]).thumbprint() == v["thumbprint"] == rfc7638_by_hand(v["jwk"]),
           "RFC 7638 §3.1 RSA example: jwcrypto = by hand = the RFC's value")
    v = jose["rfc8037_ed25519"]
    pub = {k: v["jwk_private"][k] for k in ("kty", "crv", "x")}
    expect(jw_jwk.JWK(**pub).thumbprint() == v["rfc7638_thumbprint"] == rfc7638_by_hand(pub),
           "RFC 8037 A.3 Ed25519 example: jwcrypto = by hand = the RFC's value")
    expect(jw_jwk.JWK(**dpop["public_jwk"]).thumbprint() == dpop["jkt"] == rfc7638_by_hand(dpop["public_jwk"]),
           "RFC 9449 P-256 example key: jwcrypto = by hand = the RFC's jkt")


@section("client credentials: authlib with client_secret_basic")
def _():
    c = S["basic"]
    s = authlib_session(c, scope=SCOPE)
    tok = s.fetch_token(S["token_endpoint"], grant_type="client_credentials")
    expect(tok.get("token_type") == "Bearer" and tok.get("access_token", "").count(".") == 2,
           "token answer: token_type Bearer and a JWT access token", json.dumps({k: v for k, v in tok.items() if k != "access_token"}))
    expect(tok.get("expires_in") == 900 and tok.get("scope") == SCOPE,
           "token answer: expires_in 900 (the default) and scope orders:read", f"{tok.get('expires_in')} {tok.get('scope')}")
    expect("refresh_token" not in tok, "no refresh_token for a client without the refresh_token grant")
    expect(s.last.headers.get("cache-control") == "no-store",
           "token answer has Cache-Control: no-store (RFC 6749 §5.1)", s.last.headers.get("cache-control"))
    S["basic_token"] = tok["access_token"]
    # The secret in the body instead: the client registered client_secret_basic only.
    s2 = authlib_session({**c, "token_endpoint_auth_method": "client_secret_post"})
    status, err, resp = authlib_error(s2, lambda: s2.fetch_token(S["token_endpoint"], grant_type="client_credentials"))
    expect(status == 401 and err == "invalid_client",
           "the same client with its secret in the body (client_secret_post) is refused: 401 invalid_client",
           f"{status} {err}")
    # A wrong secret over Basic: RFC 6749 §5.2 asks for 401 and a WWW-Authenticate challenge.
    s3 = authlib_session({**c, "client_secret": c["client_secret"][:-1] + ("A" if c["client_secret"][-1] != "A" else "B")})
    status, err, resp = authlib_error(s3, lambda: s3.fetch_token(S["token_endpoint"], grant_type="client_credentials"))
    expect(status == 401 and err == "invalid_client" and (resp.headers.get("www-authenticate") or "").lower().startswith("basic"),
           "a wrong secret over HTTP Basic: 401 invalid_client with WWW-Authenticate: Basic (RFC 6749 §5.2)",
           f"{status} {err} {resp.headers.get('www-authenticate') if resp is not None else ''}")
    s4 = authlib_session(c, scope="orders:write")
    status, err, _ = authlib_error(s4, lambda: s4.fetch_token(S["token_endpoint"], grant_type="client_credentials"))
    expect(status == 400 and err == "invalid_scope", "a scope the client was not given: 400 invalid_scope", f"{status} {err}")
    s5 = authlib_session(c)
    status, err, _ = authlib_error(s5, lambda: s5.refresh_token(S["token_endpoint"], refresh_token="kgrt_x"))
    expect(status == 400 and err == "unauthorized_client",
           "the refresh_token grant by a client registered without it: 400 unauthorized_client", f"{status} {err}")


@section("client credentials: authlib with client_secret_post")
def _():
    c = S["post"]
    s = authlib_session(c, scope=SCOPE)
    tok = s.fetch_token(S["token_endpoint"], grant_type="client_credentials")
    expect(tok.get("token_type") == "Bearer" and claims_of(tok["access_token"]).get("client_id") == c["client_id"],
           "token answer: a Bearer JWT whose client_id is the client", tok.get("token_type"))
    S["post_token"] = tok["access_token"]
    s2 = authlib_session({**c, "token_endpoint_auth_method": "client_secret_basic"})
    status, err, _ = authlib_error(s2, lambda: s2.fetch_token(S["token_endpoint"], grant_type="client_credentials"))
    expect(status == 401 and err == "invalid_client",
           "the same client over HTTP Basic is refused: 401 invalid_client", f"{status} {err}")


@section("client credentials: requests-oauthlib (BackendApplicationClient)")
def _():
    c = S["basic"]
    # requests-oauthlib sends HTTP Basic when given the secret and not told to put the id in the body.
    sess = OAuthlibSession(client=BackendApplicationClient(client_id=c["client_id"], scope=[SCOPE]))
    tok = sess.fetch_token(token_url=S["token_endpoint"], client_id=c["client_id"], client_secret=c["client_secret"])
    expect(tok.get("token_type") == "Bearer" and tok.get("scope") == [SCOPE] and claims_of(tok["access_token"])["client_id"] == c["client_id"],
           "client_secret_basic: Bearer token with scope [orders:read]", str(tok.get("scope")))
    c = S["post"]
    sess = OAuthlibSession(client=BackendApplicationClient(client_id=c["client_id"], scope=[SCOPE]))
    tok = sess.fetch_token(token_url=S["token_endpoint"], client_id=c["client_id"], client_secret=c["client_secret"],
                           include_client_id=True)
    expect(tok.get("token_type") == "Bearer" and claims_of(tok["access_token"])["client_id"] == c["client_id"],
           "client_secret_post (include_client_id=True): Bearer token for the client")
    r = sess.get(ORDERS, timeout=TIMEOUT)  # requests-oauthlib adds Authorization: Bearer itself
    expect(r.status_code == 200, "its token calls the gateway through requests-oauthlib: 200", show(r))


def verify_pyjwt(token, client, label="PyJWT"):
    header = pyjwt.get_unverified_header(token)
    expect(header.get("typ") == "at+jwt" and header.get("alg") == "EdDSA" and header.get("kid"),
           f"{label}: header typ at+jwt (RFC 9068 §2.1), alg EdDSA, a kid", json.dumps(header))
    signing_key = pyjwt.PyJWKClient(S["jwks_uri"]).get_signing_key_from_jwt(token)
    try:
        claims, error = pyjwt.decode(
            token,
            signing_key.key,
            algorithms=["EdDSA"],
            audience=ISSUER,
            issuer=ISSUER,
            options={"require": ["exp", "iat", "iss", "aud", "sub", "jti", "client_id"]},
        ), None
    except pyjwt.PyJWTError as e:
        claims, error = None, e
    expect(error is None, f"{label}: signature verifies with the JWKS key of its kid; iss, aud (= issuer), exp, iat valid",
           repr(error))
    expect(claims["client_id"] == client["client_id"] and claims["sub"] == client["client_id"],
           f"{label}: client_id and sub are the client", json.dumps(claims))
    expect(claims.get("scope") == SCOPE and isinstance(claims["jti"], str) and len(claims["jti"]) >= 16,
           f"{label}: scope orders:read and a jti", json.dumps(claims))
    expect(claims["exp"] - claims["iat"] == 900 and abs(claims["iat"] - time.time()) < 120,
           f"{label}: iat is now and exp = iat + 900", f"iat {claims['iat']} exp {claims['exp']} now {int(time.time())}")
    expect(claims.get("app_id") == client["app_id"], f"{label}: app_id claim is the client's app", claims.get("app_id"))
    # The check is real: the same signature over other claims must not verify.
    h, p, sig = token.split(".")
    forged = dict(claims, scope="orders:read orders:write")
    tampered = f"{h}.{b64url(json.dumps(forged).encode())}.{sig}"
    try:
        pyjwt.decode(tampered, signing_key.key, algorithms=["EdDSA"], audience=ISSUER, issuer=ISSUER)
        refused = False
    except pyjwt.InvalidSignatureError:
        refused = True
    expect(refused, f"{label}: the token with its scope changed fails signature verification")
    return claims


@section("access tokens verified by PyJWT against the JWKS")
def _():
    S["basic_claims"] = verify_pyjwt(S["basic_token"], S["basic"])


@section("access tokens verified by jwcrypto against the JWKS")
def _():
    token = S["post_token"]
    c = S["post"]
    keyset = jw_jwk.JWKSet.from_json(requests.get(S["jwks_uri"], timeout=TIMEOUT).text)
    try:
        t, error = jw_jwt.JWT(
            jwt=token,
            key=keyset,
            expected_type="JWS",
            check_claims={"iss": ISSUER, "aud": ISSUER, "exp": None, "iat": None, "client_id": c["client_id"],
                          "sub": c["client_id"], "scope": SCOPE},
        ), None
    except Exception as e:  # jwcrypto's JWException family and ValueError
        t, error = None, e
    expect(error is None,
           "jwcrypto: signature verifies with the JWK Set; iss, aud, exp, iat, client_id, sub, scope as expected",
           repr(error))
    header = json.loads(t.header)
    claims = json.loads(t.claims)
    expect(header.get("typ") == "at+jwt" and header.get("alg") == "EdDSA" and keyset.get_key(header.get("kid")) is not None,
           "jwcrypto: header typ at+jwt, alg EdDSA, kid in the JWK Set", json.dumps(header))
    expect(isinstance(claims.get("jti"), str) and claims["exp"] > time.time(), "jwcrypto: a jti, exp in the future",
           json.dumps(claims))


@section("gateway: Bearer JWT on GET /orders/1, what the upstream sees")
def _():
    token, claims, c = S["basic_token"], S["basic_claims"], S["basic"]
    r = gateway_get(token)
    expect(r.status_code == 200, "GET /orders/1 with Authorization: Bearer <JWT>: 200", show(r))
    echo = r.json()
    h = echo["headers"]
    expect(echo["method"] == "GET" and echo["path"] == "/orders/1", "the upstream got GET /orders/1", echo["request_line"])
    expect(h.get("x-keygate-scopes") == SCOPE, "the upstream sees x-keygate-scopes: orders:read", json.dumps(h))
    expect(h.get("x-keygate-app-id") == c["app_id"] and h.get("x-keygate-token-id") == claims["jti"],
           "the upstream sees x-keygate-app-id = the app and x-keygate-token-id = the jti", json.dumps(h))
    expect("authorization" not in h, "the upstream does not see the token (no Authorization header)", json.dumps(h))
    r = requests.get(ORDERS, timeout=TIMEOUT)
    expect(r.status_code == 401, "no token: 401", show(r))
    # A token for another audience (RFC 8707 resource) is a valid token of keygate's, not for this gateway.
    other_aud = "https://other-api.example"
    ot = authlib_session(c, scope=SCOPE).fetch_token(S["token_endpoint"], grant_type="client_credentials",
                                                     resource=other_aud)["access_token"]
    expect(claims_of(ot).get("aud") == other_aud, "a token asked for resource=https://other-api.example has that aud",
           json.dumps(claims_of(ot)))
    try:
        pyjwt.decode(ot, pyjwt.PyJWKClient(S["jwks_uri"]).get_signing_key_from_jwt(ot).key, algorithms=["EdDSA"],
                     audience=ISSUER, issuer=ISSUER)
        aud_error = None
    except pyjwt.InvalidAudienceError as e:
        aud_error = e
    expect(aud_error is not None, "PyJWT refuses it for audience = the issuer")
    r = gateway_get(ot)
    expect(r.status_code == 401 and "invalid_token" in r.headers.get("www-authenticate", ""),
           "the gateway refuses the token for another audience: 401 invalid_token", show(r))
    w = new_client("write-only", "client_secret_basic", scopes=("orders:write",))
    wt = authlib_session(w).fetch_token(S["token_endpoint"], grant_type="client_credentials")["access_token"]
    r = gateway_get(wt)
    expect(r.status_code == 403 and "insufficient_scope" in r.headers.get("www-authenticate", ""),
           "a JWT with scope orders:write only, on GET (needs orders:read): 403 insufficient_scope", show(r))


@section("gateway: forged JWTs made with PyJWT are refused")
def _():
    token, claims = S["basic_token"], S["basic_claims"]
    expect(gateway_get(token).status_code == 200, "control: the real token still works")
    header = pyjwt.get_unverified_header(token)
    forged = dict(claims, scope="orders:read orders:write", exp=int(time.time()) + 3600)
    cases = []
    cases.append(("alg none", pyjwt.encode(forged, None, algorithm="none", headers={"typ": "at+jwt", "kid": header["kid"]})))
    jwks = json.loads(S["jwks_text"])
    pub = next(k for k in jwks["keys"] if k["kid"] == header["kid"])
    raw_pub = base64.urlsafe_b64decode(pub["x"] + "==")
    cases.append(("HS256 keyed with the public key's bytes (algorithm confusion)",
                  pyjwt.encode(forged, raw_pub, algorithm="HS256", headers={"typ": "at+jwt", "kid": header["kid"]})))
    # PyJWT (rightly) refuses to use a JWK as an HMAC secret, so this one is signed by hand.
    signing_input = (b64url(json.dumps({"alg": "HS256", "typ": "at+jwt", "kid": header["kid"]}).encode()) + "."
                     + b64url(json.dumps(forged).encode()))
    mac = hmac.new(json.dumps(pub).encode(), signing_input.encode(), hashlib.sha256).digest()
    cases.append(("HS256 keyed with the published JWK's JSON", f"{signing_input}.{b64url(mac)}"))
    h, p, sig = token.split(".")
    cases.append(("the real signature over changed claims", f"{h}.{b64url(json.dumps(forged).encode())}.{sig}"))
    cases.append(("the real token with its signature cut off", f"{h}.{p}."))
    for name, bad in cases:
        r = gateway_get(bad)
        expect(r.status_code == 401 and "invalid_token" in r.headers.get("www-authenticate", ""),
               f"{name}: 401 invalid_token", show(r))


@section("introspection (RFC 7662) and revocation (RFC 7009) with authlib; the gateway refuses at once")
def _():
    c = S["basic"]
    s = authlib_session(c, scope=SCOPE)
    token = s.fetch_token(S["token_endpoint"], grant_type="client_credentials")["access_token"]
    claims = claims_of(token)
    r = gateway_get(token)
    expect(r.status_code == 200, "control: the new token works at the gateway", show(r))
    r = s.introspect_token(S["introspection_endpoint"], token=token, token_type_hint="access_token")
    expect(r.status_code == 200, "introspect (client_secret_basic): 200", show(r))
    info = r.json()
    expect(info.get("active") is True, "introspect: active true", r.text)
    expect(info.get("client_id") == c["client_id"] and info.get("scope") == SCOPE and info.get("token_type") == "Bearer"
           and info.get("exp") == claims["exp"] and info.get("iat") == claims["iat"] and info.get("iss") == ISSUER
           and info.get("jti") == claims["jti"] and info.get("sub") == claims["sub"],
           "introspect: client_id, scope, token_type Bearer, exp, iat, iss, jti, sub match the token", r.text)
    r = requests.post(S["introspection_endpoint"], data={"token": token}, timeout=TIMEOUT)
    expect(r.status_code == 401 and r.json().get("error") == "invalid_client",
           "introspect without client authentication: 401 invalid_client", show(r))
    r = s.revoke_token(S["revocation_endpoint"], token=token, token_type_hint="access_token")
    expect(r.status_code == 200, "revoke the access token: 200", show(r))
    r = gateway_get(token)
    expect(r.status_code == 401 and "invalid_token" in r.headers.get("www-authenticate", ""),
           "the very next gateway request with the revoked token: 401 invalid_token", show(r))
    r = s.introspect_token(S["introspection_endpoint"], token=token)
    expect(r.status_code == 200 and r.json() == {"active": False},
           "introspect the revoked token: exactly {\"active\": false}", show(r))
    r = s.revoke_token(S["revocation_endpoint"], token="this-token-was-never-issued")
    expect(r.status_code == 200, "revoke an unknown token: 200 (RFC 7009 §2.2)", show(r))
    unknown_jwt = pyjwt.encode({"iss": ISSUER, "jti": "unknown"}, "k" * 32, algorithm="HS256")
    r = s.revoke_token(S["revocation_endpoint"], token=unknown_jwt, token_type_hint="access_token")
    expect(r.status_code == 200, "revoke an unknown JWT: 200", show(r))
    r = s.introspect_token(S["introspection_endpoint"], token="this-token-was-never-issued")
    expect(r.status_code == 200 and r.json() == {"active": False}, "introspect an unknown token: {\"active\": false}", show(r))
    p = authlib_session(S["post"])
    r = p.introspect_token(S["introspection_endpoint"], token=S["post_token"])
    expect(r.status_code == 200 and r.json().get("active") is True and r.json().get("client_id") == S["post"]["client_id"],
           "introspect with client_secret_post: active true", show(r))


@section("refresh tokens: rotation and reuse detection (authlib)")
def _():
    c = new_client("refresh", "client_secret_basic", grant_types=("client_credentials", "refresh_token"))
    s = authlib_session(c, scope=SCOPE)
    t1 = s.fetch_token(S["token_endpoint"], grant_type="client_credentials")
    rt1, at1 = t1.get("refresh_token"), t1["access_token"]
    expect(isinstance(rt1, str) and rt1, "client credentials for a client with refresh_token: the answer has a refresh_token")
    info = s.introspect_token(S["introspection_endpoint"], token=rt1, token_type_hint="refresh_token").json()
    expect(info.get("active") is True and info.get("token_type") == "refresh_token" and info.get("client_id") == c["client_id"],
           "introspect the refresh token: active, token_type refresh_token, its client", json.dumps(info))
    t2 = s.refresh_token(S["token_endpoint"], refresh_token=rt1)
    rt2, at2 = t2.get("refresh_token"), t2["access_token"]
    expect(rt2 and rt2 != rt1 and at2 != at1 and t2.get("token_type") == "Bearer",
           "refresh: a new access token and a new (rotated) refresh token")
    expect(gateway_get(at2).status_code == 200, "the refreshed access token works at the gateway")
    verify_pyjwt(at2, c, "PyJWT, refreshed token")
    oc = new_client("refresh-other", "client_secret_basic", grant_types=("client_credentials", "refresh_token"))
    other = authlib_session(oc)
    status, err, _ = authlib_error(other, lambda: other.refresh_token(S["token_endpoint"], refresh_token=rt2))
    expect(status == 400 and err == "invalid_grant",
           "another client (with the refresh_token grant) presenting the refresh token: 400 invalid_grant",
           f"{status} {err}")
    r = s.introspect_token(S["introspection_endpoint"], token=rt2)
    expect(r.json().get("active") is True, "the other client's attempt did not use up the refresh token", r.text)
    status, err, _ = authlib_error(s, lambda: s.refresh_token(S["token_endpoint"], refresh_token=rt1))
    expect(status == 400 and err == "invalid_grant", "the used refresh token presented again: 400 invalid_grant", f"{status} {err}")
    status, err, _ = authlib_error(s, lambda: s.refresh_token(S["token_endpoint"], refresh_token=rt2))
    expect(status == 400 and err == "invalid_grant",
           "after the reuse, the newest refresh token is revoked too: 400 invalid_grant", f"{status} {err}")
    r = s.introspect_token(S["introspection_endpoint"], token=rt2)
    expect(r.json() == {"active": False}, "introspect the newest refresh token: inactive", r.text)
    for name, at in (("refreshed", at2), ("first", at1)):
        r = gateway_get(at)
        expect(r.status_code == 401, f"the family's {name} access token is refused at the gateway: 401", show(r))
        r = s.introspect_token(S["introspection_endpoint"], token=at)
        expect(r.json() == {"active": False}, f"introspect the family's {name} access token: inactive", r.text)


@section("refresh tokens: revoking one (RFC 7009) revokes its access tokens")
def _():
    c = new_client("refresh-revoke", "client_secret_post", grant_types=("client_credentials", "refresh_token"))
    s = authlib_session(c, scope=SCOPE)
    t = s.fetch_token(S["token_endpoint"], grant_type="client_credentials")
    expect(gateway_get(t["access_token"]).status_code == 200, "control: the access token works")
    r = s.revoke_token(S["revocation_endpoint"], token=t["refresh_token"], token_type_hint="refresh_token")
    expect(r.status_code == 200, "revoke the refresh token: 200", show(r))
    status, err, _ = authlib_error(s, lambda: s.refresh_token(S["token_endpoint"], refresh_token=t["refresh_token"]))
    expect(status == 400 and err == "invalid_grant", "refresh with the revoked refresh token: 400 invalid_grant", f"{status} {err}")
    r = gateway_get(t["access_token"])
    expect(r.status_code == 401, "its access token is refused at the gateway on the next request: 401", show(r))


@section("private_key_jwt (RFC 7523) with authlib's PrivateKeyJWT: ES256 and EdDSA keys made by joserfc")
def _():
    for alg, make in (("ES256", lambda: JoseECKey.generate_key("P-256", private=True)),
                      ("EdDSA", lambda: JoseOKPKey.generate_key("Ed25519", private=True))):
        key = make()
        public = key.as_dict(private=False)
        app = admin("POST", "/admin/v1/apps", {"name": f"interop pkjwt {alg} {uuid.uuid4().hex[:6]}"})
        c = admin("POST", f"/admin/v1/apps/{app['id']}/oauth-client",
                  {"grant_types": ["client_credentials"], "scopes": [SCOPE], "token_endpoint_auth_method": "private_key_jwt",
                   "jwks": {"keys": [public]}})
        expect(c.get("token_endpoint_auth_method") == "private_key_jwt" and c.get("client_secret") is None,
               f"{alg}: a private_key_jwt client registered with its JWKS has no secret", json.dumps(c)[:300])
        sent = {}
        s = AuthlibSession(client_id=c["client_id"], client_secret=key, token_endpoint_auth_method="private_key_jwt",
                           scope=SCOPE)
        s.register_client_auth_method(PrivateKeyJWT(S["token_endpoint"], alg=alg))

        def keep_body(resp, sent=sent):
            sent["body"] = resp.request.body
            return resp

        s.register_compliance_hook("access_token_response", keep_body)
        tok = s.fetch_token(S["token_endpoint"], grant_type="client_credentials")
        expect(tok.get("token_type") == "Bearer" and claims_of(tok["access_token"])["client_id"] == c["client_id"],
               f"{alg}: authlib's signed client assertion gets a token for the client", tok.get("token_type"))
        expect(gateway_get(tok["access_token"]).status_code == 200, f"{alg}: the token works at the gateway")
        body = sent["body"].decode() if isinstance(sent["body"], bytes) else sent["body"]
        r = requests.post(S["token_endpoint"], data=body, timeout=TIMEOUT,
                          headers={"Content-Type": "application/x-www-form-urlencoded"})
        expect(r.status_code == 401 and r.json().get("error") == "invalid_client",
               f"{alg}: the same client assertion sent again: 401 invalid_client (jti used once)", show(r))
        stranger = make()
        s2 = AuthlibSession(client_id=c["client_id"], client_secret=stranger, token_endpoint_auth_method="private_key_jwt")
        s2.register_client_auth_method(PrivateKeyJWT(S["token_endpoint"], alg=alg))
        s2.last = None
        s2.register_compliance_hook("access_token_response", lambda resp: setattr(s2, "last", resp) or resp)
        status, err, _ = authlib_error(s2, lambda: s2.fetch_token(S["token_endpoint"], grant_type="client_credentials"))
        expect(status == 401 and err == "invalid_client", f"{alg}: an assertion signed by an unregistered key: 401 invalid_client",
               f"{status} {err}")


@section("revocation by another client leaves the token alone, answered like an unknown token (RFC 7009 §2.2)")
def _():
    s = authlib_session(S["basic"], scope=SCOPE)
    token = s.fetch_token(S["token_endpoint"], grant_type="client_credentials")["access_token"]
    other = authlib_session(S["post"])
    unknown = other.revoke_token(S["revocation_endpoint"], token="kg_notatokenatall", token_type_hint="access_token")
    r = other.revoke_token(S["revocation_endpoint"], token=token, token_type_hint="access_token")
    expect(r.status_code == 200 and r.status_code == unknown.status_code and r.json() == unknown.json() == {},
           "another client's revocation request answers exactly as for an unknown token: 200 {}", show(r))
    r = gateway_get(token)
    expect(r.status_code == 200, "the token still works at the gateway", show(r))
    r = s.introspect_token(S["introspection_endpoint"], token=token)
    expect(r.json().get("active") is True, "introspection by its own client: still active", r.text)


def dpop_proof(key, htm, htu, access_token=None, jti=None, iat=None):
    """An RFC 9449 §4.2 proof made with jwcrypto."""
    alg = "ES256" if key.get("kty") == "EC" else "EdDSA"
    payload = {"jti": jti or uuid.uuid4().hex, "htm": htm, "htu": htu, "iat": int(time.time()) if iat is None else iat}
    if access_token is not None:
        payload["ath"] = b64url(hashlib.sha256(access_token.encode()).digest())
    s = jw_jws.JWS(json.dumps(payload).encode())
    s.add_signature(key, alg=alg, protected=json.dumps({"typ": "dpop+jwt", "alg": alg, "jwk": key.export_public(as_dict=True)}))
    return s.serialize(compact=True)


@section("DPoP with jwcrypto proofs: cnf.jkt equals jwcrypto's RFC 7638 thumbprint (P-256 and Ed25519)")
def _():
    c = S["basic"]
    for kty, crv in (("EC", "P-256"), ("OKP", "Ed25519")):
        key = jw_jwk.JWK.generate(kty=kty, crv=crv)
        jkt = key.thumbprint()
        expect(jkt == rfc7638_by_hand(key.export_public(as_dict=True)), f"{crv}: jwcrypto's thumbprint = RFC 7638 by hand")
        s = authlib_session(c, scope=SCOPE)
        headers = dict(DEFAULT_FORM_HEADERS, DPoP=dpop_proof(key, "POST", S["token_endpoint"]))
        tok = s.fetch_token(S["token_endpoint"], grant_type="client_credentials", headers=headers)
        expect(tok.get("token_type") == "DPoP", f"{crv}: a token request with a DPoP proof gets token_type DPoP",
               tok.get("token_type"))
        claims = verify_pyjwt(tok["access_token"], c, f"PyJWT, {crv} DPoP-bound token")
        expect(claims.get("cnf", {}).get("jkt") == jkt,
               f"{crv}: the token's cnf.jkt equals jwcrypto's thumbprint of the proof key", f"{claims.get('cnf')} vs {jkt}")
        info = s.introspect_token(S["introspection_endpoint"], token=tok["access_token"]).json()
        expect(info.get("token_type") == "DPoP" and info.get("cnf", {}).get("jkt") == jkt,
               f"{crv}: introspection says token_type DPoP and cnf.jkt = the thumbprint", json.dumps(info))
        at = tok["access_token"]
        r = gateway_get(at, "DPoP", dpop_proof(key, "GET", ORDERS, at))
        expect(r.status_code == 200 and r.json()["headers"].get("x-keygate-scopes") == SCOPE,
               f"{crv}: GET /orders/1 with Authorization: DPoP and a jwcrypto proof: 200", show(r))
        r = gateway_get(at, "Bearer")
        expect(r.status_code == 401, f"{crv}: the bound token as Bearer: 401", show(r))
        other = jw_jwk.JWK.generate(kty=kty, crv=crv)
        r = gateway_get(at, "DPoP", dpop_proof(other, "GET", ORDERS, at))
        expect(r.status_code == 401, f"{crv}: a proof by another key: 401", show(r))
        r = gateway_get(at, "DPoP", dpop_proof(key, "GET", ORDERS, None))
        expect(r.status_code == 401, f"{crv}: a proof without ath: 401", show(r))
        r = gateway_get(at, "DPoP", dpop_proof(key, "GET", ORDERS, at, iat=int(time.time()) - 3600))
        expect(r.status_code == 401, f"{crv}: a proof made an hour ago: 401", show(r))
        # A second proof with the same key is fine: replay is per proof, not per key.
        r = gateway_get(at, "DPoP", dpop_proof(key, "GET", ORDERS, at))
        expect(r.status_code == 200, f"{crv}: control: a new proof by the right key still works", show(r))
    # A refresh token bound to a key needs a proof of that key.
    rc = new_client("dpop-refresh", "client_secret_basic", grant_types=("client_credentials", "refresh_token"))
    key = jw_jwk.JWK.generate(kty="EC", crv="P-256")
    s = authlib_session(rc, scope=SCOPE)
    tok = s.fetch_token(S["token_endpoint"], grant_type="client_credentials",
                        headers=dict(DEFAULT_FORM_HEADERS, DPoP=dpop_proof(key, "POST", S["token_endpoint"])))
    other = jw_jwk.JWK.generate(kty="EC", crv="P-256")
    status, err, _ = authlib_error(s, lambda: s.refresh_token(
        S["token_endpoint"], refresh_token=tok["refresh_token"],
        headers=dict(DEFAULT_FORM_HEADERS, DPoP=dpop_proof(other, "POST", S["token_endpoint"]))))
    expect(status == 400 and err == "invalid_dpop_proof",
           "refresh of a DPoP-bound refresh token with another key's proof: 400 invalid_dpop_proof", f"{status} {err}")
    t2 = s.refresh_token(S["token_endpoint"], refresh_token=tok["refresh_token"],
                         headers=dict(DEFAULT_FORM_HEADERS, DPoP=dpop_proof(key, "POST", S["token_endpoint"])))
    expect(t2.get("token_type") == "DPoP" and claims_of(t2["access_token"]).get("cnf", {}).get("jkt") == key.thumbprint(),
           "refresh with a proof of the bound key: a DPoP token bound to the same key", t2.get("token_type"))


def main():
    total = PASSED + FAILED
    print(f"python: {PASSED} passed, {FAILED} failed", flush=True)
    results = os.environ.get("INTEROP_RESULTS")
    if results:
        with open(results, "a") as f:
            f.write(f"python {PASSED} {FAILED}\n")
    return 1 if FAILED or total == 0 else 0


if __name__ == "__main__":
    sys.exit(main())
