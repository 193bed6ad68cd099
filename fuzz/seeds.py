#!/usr/bin/env python3
"""Writes the hand-made seed inputs of the fuzz targets into fuzz/corpus/<target>/ (docs/fuzzing.md).

Each target reads its own input layout (see the comment at the top of fuzz_targets/<target>.rs):
a leading mode byte, then a string or separated parts. Running it again rewrites the same files.
"""
import os, json, zlib, hashlib, base64
here = os.path.dirname(os.path.abspath(__file__))
root = os.path.join(here, 'corpus')
def put(target, name, data):
    d = os.path.join(root, target); os.makedirs(d, exist_ok=True)
    if isinstance(data, str): data = data.encode()
    open(os.path.join(d, name), 'wb').write(data)

# h1_head
H = {
 'get': b'GET / HTTP/1.1\r\nHost: api.example\r\n\r\n',
 'get-query': b'GET /orders/7?x=1&y=2 HTTP/1.1\r\nHost: api.example:8080\r\nAuthorization: Bearer kg_abc\r\n\r\n',
 'get-10': b'GET /a HTTP/1.0\r\n\r\n',
 'get-10-keepalive': b'GET /a HTTP/1.0\r\nConnection: keep-alive\r\n\r\n',
 'absolute-form': b'GET http://api.example:81/orders?q HTTP/1.1\r\nHost: other\r\n\r\n',
 'absolute-https': b'GET https://api.example HTTP/1.1\r\n\r\n',
 'absolute-userinfo': b'GET http://u@h/ HTTP/1.1\r\n\r\n',
 'asterisk': b'OPTIONS * HTTP/1.1\r\nHost: h\r\n\r\n',
 'connect': b'CONNECT h:443 HTTP/1.1\r\nHost: h:443\r\n\r\n',
 'post-length': b'POST /orders HTTP/1.1\r\nHost: h\r\nContent-Length: 5\r\nContent-Type: application/json\r\n\r\nhello',
 'post-length-zero': b'POST /o HTTP/1.1\r\nContent-Length: 000\r\n\r\n',
 'regression-length-overflow': b'POST /o HTTP/1.1\r\nContent-Length: 99999999999999999999999\r\n\r\n',
 'post-length-plus': b'POST /o HTTP/1.1\r\nContent-Length: +5\r\n\r\nhello',
 'post-length-two': b'POST /o HTTP/1.1\r\nContent-Length: 5\r\nContent-Length: 5\r\n\r\nhello',
 'post-length-list': b'POST /o HTTP/1.1\r\nContent-Length: 5, 5\r\n\r\nhello',
 'post-chunked': b'POST /o HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n',
 'post-chunked-upper': b'POST /o HTTP/1.1\r\nTransfer-Encoding: CHUNKED\r\n\r\n',
 'post-chunked-and-length': b'POST /o HTTP/1.1\r\nTransfer-Encoding: chunked\r\nContent-Length: 3\r\n\r\n',
 'post-chunked-10': b'POST /o HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n',
 'post-gzip-chunked': b'POST /o HTTP/1.1\r\nTransfer-Encoding: gzip, chunked\r\n\r\n',
 'post-chunked-twice': b'POST /o HTTP/1.1\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n',
 'te-underscore': b'POST /o HTTP/1.1\r\nTransfer_Encoding: chunked\r\nContent-Length: 1\r\n\r\nx',
 'te-space-before-colon': b'POST /o HTTP/1.1\r\nTransfer-Encoding : chunked\r\n\r\n',
 'te-tab': b'POST /o HTTP/1.1\r\nTransfer-Encoding:\tchunked\t\r\n\r\n',
 'two-hosts': b'GET / HTTP/1.1\r\nHost: a\r\nhost: b\r\n\r\n',
 'bare-lf': b'GET / HTTP/1.1\nHost: a\n\n',
 'obs-fold': b'GET / HTTP/1.1\r\nX-A: 1\r\n  2\r\n\r\n',
 'nul-in-value': b'GET / HTTP/1.1\r\nX-A: a\x00b\r\n\r\n',
 'http2-version': b'GET / HTTP/2.0\r\n\r\n',
 'upgrade-websocket': b'GET /ws HTTP/1.1\r\nHost: h\r\nConnection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n',
 'h2c': b'GET / HTTP/1.1\r\nConnection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\nHTTP2-Settings: AAMAAABkAAQCAAAAAAIAAAAA\r\n\r\n',
 'expect-continue': b'PUT /o HTTP/1.1\r\nExpect: 100-continue\r\nContent-Length: 2\r\n\r\n',
 'api-key-cors': b'OPTIONS /o HTTP/1.1\r\nOrigin: https://app.example\r\nAccess-Control-Request-Method: POST\r\nX-Api-Key: kg_x\r\n\r\n',
 'dpop': b'GET /o HTTP/1.1\r\nAuthorization: DPoP abc\r\nDPoP: a.b.c\r\nX-Forwarded-For: 1.2.3.4, [::1]:80\r\n\r\n',
 'pipelined': b'GET /a HTTP/1.1\r\nHost: h\r\n\r\nGET /b HTTP/1.1\r\nHost: h\r\n\r\n',
 'partial': b'GET /a HTTP/1.1\r\nHost: h\r\n',
 'bad-method': b'G(T / HTTP/1.1\r\n\r\n',
 'ipv6-host': b'GET / HTTP/1.1\r\nHost: [::1]:8080\r\n\r\n',
}
for k, v in H.items(): put('h1_head', k, v)

# chunked: first byte < 0x80 decode (low bits pick the cuts), >= 0x80 round trip
C = {
 'simple': b'\x05' + b'5\r\nhello\r\n0\r\n\r\n',
 'two-chunks-ext': b'\x11' + b'3;ext=1\r\nabc\r\n4 ; q="x"\r\ndefg\r\n0\r\n\r\n',
 'trailers': b'\x22' + b'1\r\na\r\n0\r\nx-t: 1\r\nx-u: 2\r\n\r\nGET / HTTP/1.1\r\n\r\n',
 'upper-hex': b'\x33' + b'A\r\n0123456789\r\n0\r\n\r\n',
 'max-digits': b'\x44' + b'000000000000001\r\nx\r\n0\r\n\r\n',
 'too-many-digits': b'\x44' + b'ffffffffffffffff\r\n',
 'sign': b'\x01' + b'-5\r\nhello\r\n',
 'hex-prefix': b'\x02' + b'0x5\r\nhello\r\n',
 'space-in-size': b'\x03' + b'5 5\r\nhello\r\n',
 'bare-lf-size': b'\x04' + b'5\nhello\r\n0\r\n\r\n',
 'bare-lf-trailer': b'\x05' + b'0\r\nx: 1\nGET /smuggled HTTP/1.1\r\n\r\n',
 'data-no-crlf': b'\x06' + b'5\r\nhelloXX0\r\n\r\n',
 'empty-line': b'\x07' + b'\r\n',
 'partial-data': b'\x08' + b'5\r\nhel',
 'partial-size': b'\x09' + b'5',
 'regression-long-line': b'\x0a' + b'1;' + b'e' * 5000 + b'\r\nx\r\n0\r\n\r\n',
 'underscore': b'\x0b' + b'1_0\r\n' + b'x' * 16 + b'\r\n0\r\n\r\n',
 'rt-plain': b'\x80' + b'hello world, a body in chunks',
 'rt-ext': b'\x93' + bytes(range(256)),
 'rt-trailer': b'\xa5' + b'\r\n0\r\n\r\n' * 5,
 'rt-empty': b'\xb1',
}
for k, v in C.items(): put('chunked', k, v)

# path
P = ['/', '/orders', '/orders/', '/a/../b', '//admin', '/orders/%2e%2e/admin', '/orders/%2E%2E/admin',
     '/orders%2F..%2Fadmin', '/../../etc/passwd', '/a/./b//c', '/a/b/..', '/x%20y', '/a%00b', '/a\\b',
     '/a%5cb', '/a%zz', '/a%2', '/é', '/orders/%61dmin/users', '/orders/admin;x/users', '/a/%252e%252e/b',
     '/a/.%2e/b', '/a/%2e./b', '/a/...', '/a/.../', '/a%2f%2fb', '/%2F', '/a/b/../../..', '/a?b', '/a#b',
     '/orders/%41%42', 'orders', '/a//', '/.']
for i, p in enumerate(P): put('path', f'p{i:02}', p)
put('path', 'regression-plus-escape', '/a/%+2e')

# token_format
ALPH = '0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz'
def b62(n, w):
    s = ''
    for _ in range(w): s = ALPH[n % 62] + s; n //= 62
    return s
def tok(prefix, body55):
    t = f'{prefix}_{body55}'
    return t + b62(zlib.crc32(t.encode()), 6)
good = tok('kg', 'AbCdEfGhIjKl' + 'x' * 43)
T = {
 'valid-kg': good, 'valid-root': tok('kgroot', '0' * 55), 'valid-other-prefix': tok('acme2', 'Z' * 55),
 'bad-checksum': good[:-1] + ('A' if good[-1] != 'A' else 'B'), 'short': good[:-1], 'long': good + 'a',
 'bad-char': good[:20] + '-' + good[21:], 'no-underscore': good.replace('_', ''), 'upper-prefix': 'KG' + good[2:],
 'empty': '', 'only-prefix': 'kg_', 'unicode': 'kg_' + 'é' * 30 + 'x',
}
for k, v in T.items(): put('token_format', 'parse-' + k, b'\x00' + v.encode())
for i, (seed, at, new, prefix) in enumerate([(1, 0, 0, b'kg'), (2, 3, 61, b'acme'), (3, 70, 10, b'x'),
        (4, 255, 255, b'abcdefgh'), (5, 2, 5, b'abcdefghi'), (6, 40, 7, b''), (7, 12, 1, b'k9')]):
    put('token_format', f'mint-{i}', b'\x01' + seed.to_bytes(8, 'little') + bytes([at, new]) + prefix)

# jose: mode 0 raw string, 1 sign (header \xff payload \xff edits), 2 ES256 edits
j = json.load(open(os.path.join(here, '..', 'tests', 'vectors', 'jose.json')))
def b64(b): return base64.urlsafe_b64encode(b).rstrip(b'=').decode()
es = j['rfc7515_a3_es256']
J = {
 'raw-rfc8037': j['rfc8037_ed25519']['jws_compact'],
 'raw-rfc7515': es['signing_input'] + '.' + es['signature_b64url_raw_r_s'],
 'raw-none': b64(b'{"alg":"none"}') + '.' + b64(b'{"sub":"x"}') + '.',
 'raw-hs256': b64(b'{"alg":"HS256","typ":"JWT"}') + '.' + b64(b'{"sub":"x"}') + '.' + b64(b'x' * 32),
 'raw-crit': b64(b'{"alg":"EdDSA","crit":["exp"]}') + '.' + b64(b'{}') + '.' + b64(b'\x00' * 64),
 'raw-jwk-header': b64(json.dumps({"alg": "ES256", "jwk": {"kty": "EC", "crv": "P-256", "x": es['jwk_private']['x'], "y": es['jwk_private']['y']}}).encode()) + '.' + b64(b'{}') + '.' + b64(b'\x00' * 64),
 'raw-padded': j['rfc8037_ed25519']['jws_compact'] + '==',
 'raw-four-segments': 'a.b.c.d',
 'raw-jwk-okp': json.dumps({k: v for k, v in j['rfc8037_ed25519']['jwk_private'].items() if k != 'd'}),
 'raw-jwk-ec': json.dumps({k: v for k, v in es['jwk_private'].items() if k != 'd'} | {"kid": "k1", "alg": "ES256", "use": "sig"}),
 'raw-jwk-private': json.dumps(es['jwk_private']),
 'raw-jwk-rsa': json.dumps(j['rfc7638_rsa_thumbprint']['jwk']),
}
for k, v in J.items(): put('jose', k, b'\x00' + v.encode())
claims = {"iss": "https://issuer.example", "sub": "user-1", "aud": "api", "exp": 1700000600, "iat": 1699999990,
          "jti": "j1", "client_id": "c1", "scope": "orders:read", "cnf": {"jkt": "abc"}}
SIGN = {
 'sign-at': (b'{"typ":"at+jwt"}', json.dumps(claims).encode(), b''),
 'sign-at-mutated': (b'{"typ":"at+jwt"}', json.dumps(claims).encode(), b'\x00\x00\x10A\x01\x00\x40.\x02\x00\x70\x00'),
 'sign-expired': (b'{"typ":"application/at+jwt"}', json.dumps(claims | {"exp": 1}).encode(), b''),
 'sign-array-aud': (b'{"typ":"at+jwt","kid":"x"}', json.dumps(claims | {"aud": ["a", "api"], "nbf": 1800000000}).encode(), b'\x00\x00\x05B'),
 'sign-array-claims': (b'null', b'[1,2,3]', b''),
 'sign-not-json': (b'{}', b'Example of Ed25519 signing', b'\x02\x00\x00\x00'),
 'sign-cnf-array': (b'{"typ":"at+jwt"}', json.dumps(claims | {"cnf": ["abc"]}).encode(), b''),
}
for k, (h, p, e) in SIGN.items(): put('jose', k, b'\x01' + h + b'\xff' + p + b'\xff' + e)
put('jose', 'es256-unchanged', b'\x02')
put('jose', 'es256-flip', b'\x02' + b'\x00\x00\x96x')
put('jose', 'es256-header', b'\x02' + b'\x00\x00\x03Q')

# dpop: mode < 0x80 raw; >= 0x80 sign (header \xff claims \xff edits); bit 1: no typ, bit 2: no jwk
d = json.load(open(os.path.join(here, '..', 'tests', 'vectors', 'dpop.json')))
put('dpop', 'raw-rfc-resource', b'\x00' + d['resource_request_proof']['proof'].encode())
put('dpop', 'raw-rfc-resource-bound', b'\x01' + d['resource_request_proof']['proof'].encode())
put('dpop', 'raw-rfc-token', b'\x00' + d['token_request_proof']['proof'].encode())
put('dpop', 'raw-htu', b'\x00' + b'HTTPS://Resource.Example.org:443/a/%7Euser/./b/../protectedresource?q#f')
put('dpop', 'raw-htu-utf8', b'\x00' + 'https://h/é/%C3%A9'.encode())
token = d['resource_request_proof']['access_token']
ath = b64(hashlib.sha256(token.encode()).digest())
base = {"jti": "j-1", "htm": "GET", "htu": "https://resource.example.org/protectedresource", "iat": 1562262618}
D = {
 'sign-plain': (b'{}', base, b''),
 'sign-ath-nonce': (b'{}', base | {"ath": ath, "nonce": "n-current"}, b''),
 'sign-htu-variant': (b'{}', base | {"htu": "HTTPS://resource.example.org:443/./protectedresource?x=1", "ath": ath}, b''),
 'sign-old': (b'{}', base | {"iat": 1562262618 - 61}, b''),
 'sign-future': (b'{}', base | {"iat": 1562262618 + 6}, b''),
 'sign-post': (b'{}', base | {"htm": "POST"}, b''),
 'sign-long-jti': (b'{}', base | {"jti": "x" * 257}, b''),
 'sign-float-iat': (b'{}', base | {"iat": 1562262618.5}, b''),
 'sign-mutated': (b'{}', base | {"ath": ath}, b'\x00\x00\x20Z\x01\x00\x90A'),
 'sign-typ-jwt': (b'{"typ":"JWT"}', base, b''),
}
for i, (k, (h, c, e)) in enumerate(D.items()):
    put('dpop', k, bytes([0x80]) + h + b'\xff' + json.dumps(c).encode() + b'\xff' + e)
put('dpop', 'sign-no-typ', bytes([0x82]) + b'{}\xff' + json.dumps(base).encode() + b'\xff')
put('dpop', 'sign-no-jwk', bytes([0x84]) + b'{}\xff' + json.dumps(base).encode() + b'\xff')
put('dpop', 'sign-bound-rfc', bytes([0x81]) + b'{}\xff' + json.dumps(base).encode() + b'\xff')

# call_chunk: the bytes of a call-log chunk (crates/keygate-core/src/calls.rs), LEB128 varints
def varint(v):
    out = bytearray()
    while v >= 0x80:
        out.append((v & 0x7f) | 0x80); v >>= 7
    out.append(v); return bytes(out)
def zz(v): return (v << 1) ^ (v >> 63) if v >= 0 else ((-v) << 1) - 1
def chunk(base, strings, calls):
    b = b'\x01' + varint(zz(base)) + varint(len(strings))
    for s in strings:
        s = s.encode(); b += varint(len(s)) + s
    b += varint(len(calls))
    for c in calls:
        b += varint(zz(c[0])) + b''.join(varint(v) for v in c[1:])
    return b
S = ['GET', 'orders', '/orders/7', '203.0.113.7', 'insufficient_scope', 'POST', '/o\'r"d\\ers/ü', '2001:db8::1']
put('call_chunk', 'empty', chunk(0, [], []))
put('call_chunk', 'one', chunk(1780000000000, S[:4], [(0, 0, 2, 2, 200, 420, 3, 0)]))
put('call_chunk', 'refused', chunk(1780000000000, S[:5], [(0, 0, 2, 2, 403, 91, 3, 5), (7, 0, 0, 2, 200, 1000003, 3, 0)]))
put('call_chunk', 'mixed', chunk(-5, S, [(i * 3, (i % 2) * 5, (i % 3 > 0) * 2, 6 if i % 2 else 2, 200 + i, i * 977, 7 if i % 2 else 3, (i % 4 == 0) * 5) for i in range(12)]))
put('call_chunk', 'far-times', chunk(-(2**62), S[:4], [(2**62, 0, 0, 2, 500, 2**64 - 1, 3, 0), (-(2**62), 0, 0, 2, 0, 0, 3, 0)]))
