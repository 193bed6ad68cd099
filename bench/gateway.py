#!/usr/bin/env python3
"""Gateway benchmark: keygate side by side with nginx and HAProxy, in one run.

Five variants share one upstream (an nginx answering `return 200 "ok"` on its own port) and are
measured interleaved, round after round, so that whatever else the machine does at a given moment
weighs on all of them alike:

  direct       the upstream itself, no hop: the ceiling
  nginx        nginx as a plain reverse proxy (keep-alive upstream, HTTP/1.1, no access log)
  nginx-keys   the same plus a `map` of the valid keys and `limit_req` keyed on the key
  haproxy      HAProxy with a map file of valid keys and a stick-table rate limit
  keygate      keygate with 10,000 tokens (5% revoked, so refused), a per-token rate limit
               that never fires, and usage metering

Throughput is closed-loop `wrk` with a Lua script that puts a different bearer token on each
request. Latency is open-loop `h2load --rps` at a fixed rate: half of what the plain nginx proxy
reached. CPU time per request comes from /proc/PID/stat of each proxy (all its processes and
threads), peak RSS from /proc/PID/status. Results are medians of per-round figures and ratios.

It installs what it lacks (Debian: nginx, haproxy, wrk, nghttp2-client), builds keygate in
release mode, prints a table, and writes the table and an SVG chart into docs/. Every process it
starts is stopped when it ends, including on Ctrl-C.

    python3 bench/gateway.py                 # the full run (about 11 minutes)
    python3 bench/gateway.py --smoke         # a quick check that every piece works; no docs
    python3 bench/gateway.py --no-doc --rounds 1 --seconds 5 --latency-rounds 1 --profile 10
                                             # where the time goes: `perf stat` of every proxy
                                             # and `perf record` of keygate, into the work dir
    python3 bench/gateway.py --no-doc --rounds 1 --seconds 5 --latency-rounds 0 --profile-system 15
                                             # the whole machine's µs a request under each proxy,
                                             # by role (wrk, proxy, upstream, idle) and function
    python3 bench/gateway.py --no-doc --baseline /tmp/keygate-old
                                             # an A/B: another keygate binary runs as a sixth
                                             # variant, "baseline", on a copy of the same data
                                             # (same tokens, same pepper), interleaved with the rest
    python3 bench/gateway.py --no-doc --baseline target/release/keygate \
        --baseline-config '[call_log]\nenabled = false'
                                             # the same binary with a feature off: its cost
    python3 bench/gateway.py --no-doc --baseline target/release/keygate --baseline-public
                                             # the same binary on a public route (no token
                                             # checked): keygate's proxying alone
    python3 bench/gateway.py --suite tls     # TLS and HTTP/2, each keygate variant beside its nginx
    python3 bench/gateway.py --suite shared  # rate limits shared through Redis against local ones

`--suite tls` measures three other pairs, interleaved the same way, on a certificate (ECDSA P-256,
from a CA made for the run) that both sides serve:

  nginx-tls / keygate-tls            TLS on the listener (nginx with OpenSSL, keygate with rustls),
                                     wrk over HTTPS with keep-alive, plain HTTP to the upstream
  nginx-https-up / keygate-https-up  plain HTTP from wrk, `https://` to the upstream (an nginx TLS
                                     listener), the upstream's certificate verified by both
  nginx-h2 / keygate-h2              HTTP/2 clients: h2load over TLS, ALPN h2, on the TLS listeners

Each variant's ratio is to the nginx of its pair; the TLS version, cipher suite and group each
side negotiated are recorded. The page gets its own section (the plain one stays as it is).

`--suite shared` measures what sharing rate limits through Redis costs one node (issue 14): two
keygate processes of the same binary on copies of the same data (same tokens, same pepper), in
front of the same upstream, interleaved the same way, with no nginx or HAProxy:

  keygate        the plain suite's keygate: local rate limits (an atomic cell per token)
  keygate-redis  the same configuration plus `[redis]` (`--redis-url`, a key prefix of its own,
                 `kgbench-…`): each token's limit is a GCRA bucket in Redis, spent from leases

keygate-redis's ratio is to keygate. Around each of its runs the script reads its `/metrics`
(admin listener) for the calls to Redis, the requests that waited for a lease and those decided
locally; after the run it checks that the limiter saw every request and refused none
(`keygate_gateway_limiter_decisions_total`) on both, and that `keygate_shared_limits_up` is 1. It
deletes its Redis keys when it ends. Needs `redis-cli` and a Redis it may write keys into. Its
section of the page is its own too; bench/nodes.py (several nodes) and bench/startup.py (start-up
with 1,000,000 tokens) measure the rest of issue 14, written up by hand after it.
"""

from __future__ import annotations

import argparse
import atexit
import dataclasses
import datetime as dt
import http.client
import json
import os
import platform
import random
import resource
import re
import shutil
import signal
import ssl
import statistics
import textwrap
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CLK_TCK = os.sysconf("SC_CLK_TCK")

VARIANTS = ["direct", "nginx", "nginx-keys", "haproxy", "keygate", "keygate-jwt"]
# `--suite tls`: each keygate variant and the nginx it is measured against (its "reference"; in the
# plain suite every variant's reference is the plain nginx proxy).
TLS_PAIRS = [("nginx-tls", "keygate-tls"), ("nginx-https-up", "keygate-https-up"), ("nginx-h2", "keygate-h2")]
SUITES = {"plain": list(VARIANTS), "tls": [v for pair in TLS_PAIRS for v in pair],
          "shared": ["keygate", "keygate-redis"]}
REFERENCE = {v: n for n, k in TLS_PAIRS for v in (n, k)}
# `--suite shared`: both are measured against keygate with local limits (set in main).
SHARED_REFERENCE = {"keygate": "keygate", "keygate-redis": "keygate"}
TLS_LISTENER = {"nginx-tls", "keygate-tls", "nginx-h2", "keygate-h2"}
HTTP2 = {"nginx-h2", "keygate-h2"}
# The process that serves a variant, where it is not the variant's own name.
PROCESS = {"direct": "upstream", "keygate-jwt": "keygate", "keygate-jwt-new": "keygate",
           "nginx-h2": "nginx-tls", "keygate-h2": "keygate-tls"}


def reference(variant: str) -> str:
    return REFERENCE.get(variant, "nginx")


LABELS = {
    "direct": "direct (no proxy)",
    "nginx": "nginx, plain proxy",
    "nginx-keys": "nginx + key map + limit_req",
    "haproxy": "HAProxy + key map + stick table",
    "keygate": "keygate (auth + limit + metering)",
    "keygate-jwt": "keygate with JWT access tokens (cached)",
    "keygate-jwt-new": "keygate with JWTs never seen before",
    "baseline": "keygate, baseline binary (--baseline)",
    "nginx-tls": "nginx, TLS listener (OpenSSL)",
    "keygate-tls": "keygate, TLS listener (rustls)",
    "nginx-https-up": "nginx, https:// upstream",
    "keygate-https-up": "keygate, https:// upstream",
    "nginx-h2": "nginx, HTTP/2 clients (TLS, ALPN h2)",
    "keygate-h2": "keygate, HTTP/2 clients (TLS, ALPN h2)",
    "keygate-redis": "keygate, rate limits shared on Redis",
}
COLORS = {
    "direct": "#9e9e9e",
    "nginx": "#2e7d32",
    "nginx-keys": "#66bb6a",
    "haproxy": "#1565c0",
    "keygate": "#e65100",
    "keygate-jwt": "#ffa726",
    "baseline": "#8d6e63",
    "nginx-tls": "#2e7d32",
    "keygate-tls": "#e65100",
    "nginx-https-up": "#66bb6a",
    "keygate-https-up": "#ffa726",
    "nginx-h2": "#a5d6a7",
    "keygate-h2": "#ffcc80",
    "keygate-redis": "#bf360c",
}
TOOLS = {"nginx": "nginx", "haproxy": "haproxy", "wrk": "wrk", "h2load": "nghttp2-client"}
# keygate-redis's counters on /metrics (`--suite shared`).
SHARED_COUNTERS = {
    "calls": "keygate_shared_limits_calls_total",
    "waits": "keygate_shared_limits_waits_total",
    "local": "keygate_shared_limits_local_decisions_total",
    "failures": "keygate_shared_limits_failures_total",
}

BEGIN = "<!-- gateway-bench:begin — written by bench/gateway.py; a rerun replaces what is inside -->"
END = "<!-- gateway-bench:end -->"
TLS_BEGIN = "<!-- gateway-bench-tls:begin — written by bench/gateway.py --suite tls; a rerun replaces what is inside -->"
TLS_END = "<!-- gateway-bench-tls:end -->"
SHARED_BEGIN = "<!-- gateway-bench-shared:begin — written by bench/gateway.py --suite shared; a rerun replaces what is inside -->"
SHARED_END = "<!-- gateway-bench-shared:end -->"
# Set by Bench.make_certs: trusts the run's CA, for the script's own HTTPS requests.
CLIENT_TLS: ssl.SSLContext | None = None
CLIENT_TLS_CA: Path | None = None


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


# --------------------------------------------------------------------------------------------
# Processes


class Procs:
    """Every process this script starts, so that all of them (and only them) are stopped."""

    def __init__(self) -> None:
        self.started: list[tuple[str, subprocess.Popen]] = []

    def start(self, name: str, argv: list[str], logfile: Path, env: dict | None = None) -> subprocess.Popen:
        out = open(logfile, "ab")
        p = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env)
        out.close()
        self.started.append((name, p))
        return p

    def stop(self, name: str) -> None:
        """Stops the process started under `name` (SIGTERM, so it shuts down gracefully)."""
        for n, p in self.started:
            if n == name and p.poll() is None:
                p.send_signal(signal.SIGTERM)
                p.wait(timeout=30)
        self.started = [(n, p) for n, p in self.started if n != name]

    def stop_all(self) -> None:
        for name, p in reversed(self.started):
            if p.poll() is None:
                # nginx and HAProxy stop their workers themselves on SIGTERM.
                p.send_signal(signal.SIGTERM)
        deadline = time.time() + 10
        for name, p in reversed(self.started):
            try:
                p.wait(timeout=max(0.1, deadline - time.time()))
            except subprocess.TimeoutExpired:
                log(f"{name} (pid {p.pid}) did not stop; killing it")
                p.kill()
                p.wait()
        self.started.clear()


PROCS = Procs()


def children(pid: int) -> list[int]:
    try:
        text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    except OSError:
        return []
    return [int(x) for x in text.split()]


def perf_stat_counts(path: Path) -> dict[str, float]:
    """The counts of a `perf stat -x ,` output file, by event name (events perf could not count
    are left out)."""
    counts = {}
    for line in path.read_text().splitlines():
        parts = line.split(",")
        if len(parts) > 2 and parts[0].replace(".", "").isdigit():
            counts[parts[2]] = float(parts[0])
    return counts


def process_tree(pid: int) -> list[int]:
    out = [pid]
    for c in children(pid):
        out.extend(process_tree(c))
    return out


def cpu_split(pids: list[int]) -> tuple[int, int]:
    """(utime, stime) of the processes (all their threads), in clock ticks."""
    user = system = 0
    for pid in pids:
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2 :].split()
        user += int(fields[11])
        system += int(fields[12])
    return user, system


def cpu_ticks(pids: list[int]) -> int:
    return sum(cpu_split(pids))


def memory_kib(pids: list[int]) -> tuple[int, int]:
    """(sum of VmHWM, sum of VmRSS) in KiB."""
    hwm = rss = 0
    for pid in pids:
        try:
            text = Path(f"/proc/{pid}/status").read_text()
        except OSError:
            continue
        for line in text.splitlines():
            if line.startswith("VmHWM:"):
                hwm += int(line.split()[1])
            elif line.startswith("VmRSS:"):
                rss += int(line.split()[1])
    return hwm, rss


def machine_busy_ticks() -> int:
    """Busy time of the whole machine (all cores), in clock ticks, from /proc/stat."""
    parts = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    v = [int(x) for x in parts]
    idle = v[3] + (v[4] if len(v) > 4 else 0)
    return sum(v[:8]) - idle


def connection(port: int, tls: bool = False, timeout: float = 5) -> http.client.HTTPConnection:
    if tls:
        return http.client.HTTPSConnection("localhost", port, timeout=timeout, context=CLIENT_TLS)
    return http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)


def wait_http(port: int, path: str = "/", timeout: float = 30.0, headers: dict | None = None, tls: bool = False) -> int:
    deadline = time.time() + timeout
    last: Exception | None = None
    while time.time() < deadline:
        try:
            c = connection(port, tls, timeout=2)
            c.request("GET", path, headers=headers or {})
            status = c.getresponse().status
            c.close()
            return status
        except OSError as e:
            last = e
            time.sleep(0.1)
    raise RuntimeError(f"nothing answers on port {port} after {timeout}s: {last}")


def fetch(port: int, token: str | None, tls: bool = False, path: str = "/bench") -> tuple[int, str]:
    c = connection(port, tls)
    c.request("GET", path, headers={"Authorization": f"Bearer {token}"} if token else {})
    r = c.getresponse()
    body = r.read().decode(errors="replace")
    c.close()
    return r.status, body


def get_status(port: int, token: str | None, tls: bool = False) -> int:
    return fetch(port, token, tls)[0]


def h2_once(port: int, token: str | None) -> tuple[int, str]:
    """One HTTP/2 request over TLS with h2load (the load generator of the h2 variants), which must
    negotiate h2 by ALPN: the status class (200, 300, 400 or 500) and what the TLS negotiated, as
    h2load reports it."""
    argv = ["h2load", "-n1", "-c1", f"https://localhost:{port}/bench"]
    if token:
        argv[1:1] = ["-H", f"Authorization: Bearer {token}"]
    out = subprocess.run(argv, capture_output=True, text=True).stdout
    if not re.search(r"^application protocol: h2$", out, re.M | re.I):
        raise RuntimeError(f"h2load did not negotiate h2 with port {port}:\n{out}")
    m = re.search(r"status codes: (\d+) 2xx, (\d+) 3xx, (\d+) 4xx, (\d+) 5xx", out)
    if not m:
        raise RuntimeError(f"h2load against port {port} gave no status:\n{out}")
    counts = [int(x) for x in m.groups()]
    tls = re.search(r"TLS Protocol: (\S+)\nCipher: (\S+)\nServer Temp Key: (\S+)", out)
    facts = f"{tls.group(1)} {tls.group(2)}, {tls.group(3)}, ALPN h2 (as h2load reports it)" if tls else "?"
    return ([200, 300, 400, 500][counts.index(1)] if 1 in counts else 0), facts


def negotiated_tls(port: int, alpn: str) -> str:
    """What an OpenSSL client (the library wrk and h2load use) negotiates with the listener on `port`."""
    p = subprocess.run(
        ["openssl", "s_client", "-connect", f"127.0.0.1:{port}", "-servername", "localhost", "-alpn", alpn,
         "-CAfile", str(CLIENT_TLS_CA)],
        input="", capture_output=True, text=True, timeout=20,
    )
    out = p.stdout + p.stderr
    proto = re.search(r"New, (TLSv[\d.]+), Cipher is (\S+)", out)
    group = re.search(r"Server Temp Key: ([^\n]+)", out)
    got_alpn = re.search(r"ALPN protocol: (\S+)", out)
    verify = re.search(r"Verify return code: (\d+)", out)
    if not proto:
        return "?"
    return (f"{proto.group(1)} {proto.group(2)}, {group.group(1).split(',')[0] if group else '?'}, "
            f"ALPN {got_alpn.group(1) if got_alpn else 'none'}, verify {'ok' if verify and verify.group(1) == '0' else 'FAILED'}")


# --------------------------------------------------------------------------------------------
# Setup


def ensure_tools(install: bool, profile: bool) -> None:
    tools = dict(TOOLS, perf="linux-perf") if profile else TOOLS
    missing = [pkg for tool, pkg in tools.items() if shutil.which(tool) is None]
    if not missing:
        return
    if not install:
        sys.exit(f"missing tools (Debian packages {' '.join(missing)}); run without --no-install")
    log(f"installing {' '.join(missing)}")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    sudo = [] if os.geteuid() == 0 else ["sudo"]
    subprocess.run(sudo + ["apt-get", "update", "-qq"], check=True, env=env)
    subprocess.run(sudo + ["apt-get", "install", "-y", "-qq", *missing], check=True, env=env)


def build_keygate(skip: bool, given: str | None) -> Path:
    if given:
        return Path(given).resolve()
    binary = ROOT / "target" / "release" / "keygate"
    if not skip:
        log("building keygate (cargo build --release -p keygate)")
        subprocess.run(["cargo", "build", "--release", "-q", "-p", "keygate"], cwd=ROOT, check=True)
    if not binary.exists():
        sys.exit(f"{binary} is missing; build it or drop --no-build")
    return binary


@dataclass
class Ports:
    upstream: int
    nginx: int
    nginx_keys: int
    haproxy: int
    keygate: int
    admin: int
    baseline: int
    baseline_admin: int
    jwks: int
    upstream_tls: int
    nginx_tls: int
    nginx_https_up: int
    keygate_tls: int
    keygate_tls_admin: int
    keygate_https_up: int
    keygate_https_up_admin: int
    keygate_redis: int
    keygate_redis_admin: int

    @classmethod
    def from_base(cls, base: int) -> "Ports":
        return cls(*range(base, base + len(dataclasses.fields(cls))))

    def of(self, variant: str) -> int:
        return {
            "direct": self.upstream,
            "nginx": self.nginx,
            "nginx-keys": self.nginx_keys,
            "haproxy": self.haproxy,
            "keygate": self.keygate,
            "keygate-jwt": self.keygate,
            "keygate-jwt-new": self.keygate,
            "baseline": self.baseline,
            "nginx-tls": self.nginx_tls,
            "nginx-h2": self.nginx_tls,
            "nginx-https-up": self.nginx_https_up,
            "keygate-tls": self.keygate_tls,
            "keygate-h2": self.keygate_tls,
            "keygate-https-up": self.keygate_https_up,
            "keygate-redis": self.keygate_redis,
        }[variant]


NGINX_COMMON = """\
worker_processes {workers};
worker_rlimit_nofile 65536;
daemon off;
master_process on;
pid {dir}/nginx.pid;
error_log {dir}/error.log warn;
events {{ worker_connections 8192; multi_accept on; }}
http {{
    access_log off;
    keepalive_requests 100000000;
    keepalive_timeout 120s;
    client_body_temp_path {dir}/tmp;
    proxy_temp_path {dir}/tmp;
    fastcgi_temp_path {dir}/tmp;
    uwsgi_temp_path {dir}/tmp;
    scgi_temp_path {dir}/tmp;
{body}
}}
"""

UPSTREAM_BODY = """\
    server {{
        listen 127.0.0.1:{port} backlog=4096;
        location / {{ return 200 "ok"; }}
    }}
"""

# The upstream's TLS listener (`--suite tls`): what the https:// upstream variants talk to.
# /tls-info answers with what the connection negotiated, for the record; /bench is "ok" as above.
UPSTREAM_TLS_BODY = """\
    server {{
        listen 127.0.0.1:{port} ssl backlog=4096;
{tls}
        location / {{ return 200 "ok"; }}
        location = /tls-info {{ return 200 "$ssl_protocol $ssl_cipher, $ssl_curve, reused=$ssl_session_reused"; }}
    }}
"""

# The same certificate and key for every TLS listener, nginx's and keygate's.
NGINX_TLS = """\
        ssl_certificate {dir}/cert.pem;
        ssl_certificate_key {dir}/key.pem;
        ssl_protocols TLSv1.2 TLSv1.3;
        ssl_session_cache shared:SSL:16m;
        ssl_session_timeout 1h;"""

# The https:// upstream as nginx does it, verifying the certificate as keygate always does, with
# SNI and the verified name "localhost" (keygate's `tls_server_name`), sessions reused.
NGINX_PROXY_SSL = """\
            proxy_ssl_protocols TLSv1.2 TLSv1.3;
            proxy_ssl_verify on;
            proxy_ssl_trusted_certificate {dir}/ca.pem;
            proxy_ssl_verify_depth 2;
            proxy_ssl_name localhost;
            proxy_ssl_server_name on;
            proxy_ssl_session_reuse on;"""

PROXY_BODY = """\
    upstream origin {{
        server 127.0.0.1:{upstream};
        keepalive 256;
        keepalive_requests 100000000;
    }}
{extra}
    server {{
        listen 127.0.0.1:{port}{listen} backlog=4096;
{server}
        location / {{
{checks}
            proxy_pass {scheme}://origin;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
{proxy}
        }}
    }}
"""


def proxy_body(port: int, upstream: int, extra: str = "", checks: str = "", tls_dir: Path | None = None,
               listener_tls: bool = False, upstream_tls: bool = False) -> str:
    """An nginx reverse proxy: plain, or with TLS (and HTTP/2 by ALPN) on the listener, or with an
    https:// upstream."""
    return PROXY_BODY.format(
        upstream=upstream, port=port, extra=extra, checks=checks,
        listen=" ssl http2" if listener_tls else "",
        server=NGINX_TLS.format(dir=tls_dir) if listener_tls else "",
        scheme="https" if upstream_tls else "http",
        proxy=NGINX_PROXY_SSL.format(dir=tls_dir) if upstream_tls else "",
    )

KEYS_EXTRA = """\
    map_hash_max_size 262144;
    map_hash_bucket_size 256;
    map $http_authorization $api_key {{
        default "";
        include {dir}/keys.map;
    }}
    limit_req_zone $api_key zone=per_key:16m rate=1000000r/s;
    limit_req_status 429;
"""

KEYS_CHECKS = """\
            if ($api_key = "") { return 401; }
            limit_req zone=per_key burst=100000 nodelay;
"""

HAPROXY_CFG = """\
global
    nbthread {threads}
    maxconn 4096
    tune.bufsize 16384

defaults
    mode http
    timeout connect 2s
    timeout client 60s
    timeout server 60s
    timeout http-keep-alive 120s
    option http-keep-alive

frontend gateway
    bind 127.0.0.1:{port}
    stick-table type string len 96 size 32k expire 60s store http_req_rate(1s)
    http-request deny deny_status 401 unless {{ req.hdr(authorization) -m beg "Bearer " }}
    http-request set-var(txn.key) req.hdr(authorization),word(2,' ')
    http-request set-var(txn.app) var(txn.key),map({dir}/keys.map)
    http-request deny deny_status 401 unless {{ var(txn.app) -m found }}
    http-request track-sc0 var(txn.key)
    http-request deny deny_status 429 if {{ sc_http_req_rate(0) gt 1000000 }}
    default_backend origin

backend origin
    http-reuse always
    server up 127.0.0.1:{upstream}
"""

KEYGATE_CFG = """\
data_dir = "{dir}/data"
usage_flush_seconds = 5

[admin]
listen = "127.0.0.1:{admin}"

[gateway]
listen = "127.0.0.1:{port}"
threads = {threads}
access_log = false
demo = false
{deny}
[log]
level = "warn"
format = "text"

[oauth]
issuer = "http://127.0.0.1:{port}"
access_token_ttl_seconds = 86400

[[oauth.trusted_issuers]]
issuer = "https://bench-idp.invalid"
audience = "bench"
jwks_url = "http://127.0.0.1:{jwks}/jwks.json"

[[routes]]
id = "bench"
path = "/"
upstream = "{upstream}"
{route_extra}"""

def deny_list(n: int) -> str:
    """`deny = [...]` of `n` CIDRs that match no client of the benchmark (which all come from
    127.0.0.1): documentation and private ranges at prefix lengths 32, 24 and 16, so that the
    gateway looks the address up once per distinct length."""
    if n <= 0:
        return ""
    out = []
    for i in range(n):
        a, b = divmod(i, 256)
        kind = i % 3
        if kind == 0:
            out.append(f'"10.{a % 256}.{b}.{i % 200 + 1}/32"')
        elif kind == 1:
            out.append(f'"192.168.{b}.0/24"' if a == 0 else f'"172.{16 + a % 16}.{b}.0/24"')
        else:
            out.append(f'"100.{64 + a % 64}.0.0/16"')
    return "deny = [" + ", ".join(dict.fromkeys(out)) + "]\n"


# `--suite tls`: the route's https:// upstream, verified against the run's CA under the name the
# certificate carries (as nginx's proxy_ssl_name), and the gateway's own TLS listener.
KEYGATE_UPSTREAM_TLS = """\
tls_ca_file = "{dir}/ca.pem"
tls_server_name = "localhost"
"""

KEYGATE_LISTENER_TLS = """\

[gateway.tls]
cert = "{dir}/cert.pem"
key = "{dir}/key.pem"
"""

# `--suite shared`: the same configuration, with every rate limit a bucket in Redis.
KEYGATE_REDIS = """\

[redis]
url = "{url}"
key_prefix = "{prefix}"
"""

WRK_LUA = """\
-- Every request carries a bearer token picked at random from KG_BENCH_TOKENS (one a line).
-- The requests are formatted once per thread, so the choice costs wrk almost nothing. With
-- KG_BENCH_SEQ=1 each thread instead takes every KG_BENCH_THREADS-th token, in order, so that no
-- token is sent twice while the list lasts (JWTs never seen before).
local seq = os.getenv("KG_BENCH_SEQ") == "1"
local nthreads = tonumber(os.getenv("KG_BENCH_THREADS") or "1")
local list = {}
for line in io.lines(os.getenv("KG_BENCH_TOKENS")) do
    if #line > 0 then list[#list + 1] = line end
end

local threads = 0
function setup(thread)
    threads = threads + 1
    thread:set("thread_no", threads)
end

local prepared = {}
function init(args)
    math.randomseed(os.time() * 1000 + (thread_no or 0) * 7919)
    local host = wrk.headers["Host"]
    local first, step = 1, 1
    if seq then first, step = thread_no or 1, nthreads end
    for i = first, #list, step do
        prepared[#prepared + 1] = wrk.format("GET", "/bench", { ["Host"] = host, ["Authorization"] = "Bearer " .. list[i] })
    end
end

local next_i = 0
function request()
    if seq then
        next_i = next_i % #prepared + 1
        return prepared[next_i]
    end
    return prepared[math.random(#prepared)]
end

function done(summary, latency, requests)
    local e = summary.errors
    io.write(string.format(
        'KGBENCH {"requests":%d,"duration_us":%d,"non_2xx":%d,"connect_errors":%d,"read_errors":%d,' ..
        '"write_errors":%d,"timeouts":%d,"p50_us":%d,"p99_us":%d}\\n',
        summary.requests, summary.duration, e.status, e.connect, e.read, e.write, e.timeout,
        latency:percentile(50), latency:percentile(99)))
end
"""


class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.dir = Path(args.workdir)
        self.ports = Ports.from_base(args.base_port)
        self.pids: dict[str, int] = {}
        self.valid: list[str] = []
        self.invalid: list[str] = []
        self.raw = self.dir / "raw"
        # `--suite shared`: keygate-redis's keys in Redis start with "{<prefix>:" (deleted at the end).
        self.redis_prefix = f"kgbench-{random.SystemRandom().getrandbits(32):08x}"

    # ---- setup ------------------------------------------------------------------------------

    def prepare_dir(self) -> None:
        marker = self.dir / ".keygate-bench"
        if self.dir.exists() and any(self.dir.iterdir()):
            if not marker.exists():
                sys.exit(f"{self.dir} is not empty and was not made by this script; choose another --workdir")
            shutil.rmtree(self.dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        marker.touch()
        for sub in ["raw", "upstream/tmp", "nginx/tmp", "nginx-keys/tmp", "haproxy", "keygate", "baseline",
                    "tls", "nginx-tls/tmp", "nginx-https-up/tmp", "keygate-tls", "keygate-https-up", "keygate-redis"]:
            (self.dir / sub).mkdir(parents=True, exist_ok=True)

    def start_nginx(self, name: str, workers: int, body: str) -> None:
        d = self.dir / name
        (d / "nginx.conf").write_text(NGINX_COMMON.format(workers=workers, dir=d, body=body))
        subprocess.run(["nginx", "-t", "-q", "-c", str(d / "nginx.conf"), "-p", str(d)], check=True)
        p = PROCS.start(name, ["nginx", "-c", str(d / "nginx.conf"), "-p", str(d)], d / "stdout.log")
        self.pids[name] = p.pid

    def make_certs(self) -> None:
        """A CA and a server certificate for "localhost" and 127.0.0.1 (ECDSA P-256), in tls/: every
        TLS listener of the run serves this one certificate."""
        global CLIENT_TLS, CLIENT_TLS_CA
        import ipaddress
        from cryptography import x509
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import ec
        from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

        d = self.dir / "tls"
        now = dt.datetime.now(dt.timezone.utc)

        def cert(subject: str, key, issuer: str, issuer_key, ca: bool) -> x509.Certificate:
            b = (x509.CertificateBuilder()
                 .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
                 .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, issuer)]))
                 .public_key(key.public_key()).serial_number(x509.random_serial_number())
                 .not_valid_before(now - dt.timedelta(hours=1)).not_valid_after(now + dt.timedelta(days=2))
                 .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
            if ca:
                b = b.add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True)
            else:
                b = (b.add_extension(x509.SubjectAlternativeName(
                        [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
                     .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False))
            return b.sign(issuer_key, hashes.SHA256())

        ca_key, key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
        ca = cert("keygate bench CA", ca_key, "keygate bench CA", ca_key, True)
        leaf = cert("localhost", key, "keygate bench CA", ca_key, False)
        pem = serialization.Encoding.PEM
        (d / "ca.pem").write_bytes(ca.public_bytes(pem))
        (d / "cert.pem").write_bytes(leaf.public_bytes(pem))
        (d / "key.pem").write_bytes(key.private_bytes(pem, serialization.PrivateFormat.PKCS8,
                                                      serialization.NoEncryption()))
        CLIENT_TLS_CA = d / "ca.pem"
        CLIENT_TLS = ssl.create_default_context(cafile=str(CLIENT_TLS_CA))

    def start_upstream(self) -> None:
        body = UPSTREAM_BODY.format(port=self.ports.upstream)
        if self.args.suite == "tls":
            body += UPSTREAM_TLS_BODY.format(port=self.ports.upstream_tls, tls=NGINX_TLS.format(dir=self.dir / "tls"))
        self.start_nginx("upstream", self.args.upstream_workers, body)
        wait_http(self.ports.upstream)
        if self.args.suite == "tls":
            wait_http(self.ports.upstream_tls, tls=True)

    def keygate_ports(self, name: str) -> tuple[int, int]:
        """(gateway port, admin port) of a keygate instance."""
        p = self.ports
        return {
            "keygate": (p.keygate, p.admin),
            "baseline": (p.baseline, p.baseline_admin),
            "keygate-tls": (p.keygate_tls, p.keygate_tls_admin),
            "keygate-https-up": (p.keygate_https_up, p.keygate_https_up_admin),
            "keygate-redis": (p.keygate_redis, p.keygate_redis_admin),
        }[name]

    def keygate_config(self, name: str) -> Path:
        d = self.dir / name
        port, admin = self.keygate_ports(name)
        tls = self.dir / "tls"
        upstream = f"http://127.0.0.1:{self.ports.upstream}"
        if name == "keygate-https-up":
            upstream = f"https://127.0.0.1:{self.ports.upstream_tls}"
        cfg = d / "keygate.toml"
        cfg.write_text(
            KEYGATE_CFG.format(
                dir=d, admin=admin, port=port, threads=self.args.workers, upstream=upstream, jwks=self.ports.jwks,
                deny=deny_list(self.args.deny) if name in ("keygate", "baseline") else "",
                route_extra="public = true\n" if name == "baseline" and self.args.baseline_public else "",
            )
            + (KEYGATE_UPSTREAM_TLS.format(dir=tls) if name == "keygate-https-up" else "")
            + (KEYGATE_LISTENER_TLS.format(dir=tls) if name == "keygate-tls" else "")
            + (KEYGATE_REDIS.format(url=self.args.redis_url, prefix=self.redis_prefix) if name == "keygate-redis" else "")
            + ("\n" + self.args.baseline_config.replace("\\n", "\n") + "\n" if name == "baseline" else "")
        )
        return cfg

    def spawn_keygate(self, name: str, binary: Path, cfg: Path, admin: int) -> None:
        env = dict(os.environ)
        env.pop("KEYGATE_PEPPER", None)
        p = PROCS.start(name, [str(binary), "serve", "--config", str(cfg)], self.dir / name / "stdout.log", env)
        self.pids[name] = p.pid
        wait_http(admin, "/admin/v1/health")

    def start_keygate(self, binary: Path) -> None:
        # The tokens are made by the first instance; with more than one, its data directory is then
        # copied (while it is stopped, so the copy is consistent) for each of the others: all serve
        # the same tokens under the same pepper. With --baseline the first is the baseline binary,
        # as a newer binary migrates an older store forward (not the other way round).
        if self.args.suite == "tls":
            instances = [("keygate-tls", binary), ("keygate-https-up", binary)]
        elif self.args.suite == "shared":
            instances = [("keygate", binary), ("keygate-redis", binary)]
        elif self.args.baseline:
            instances = [("baseline", Path(self.args.baseline).resolve()), ("keygate", binary)]
        else:
            instances = [("keygate", binary)]
        first, first_bin = instances[0]
        cfg = self.keygate_config(first)
        out = subprocess.run(
            [str(first_bin), "root-key", "create", "--name", "bench", "--config", str(cfg), "--output", "json"],
            check=True,
            capture_output=True,
            text=True,
        )
        root_key = json.loads(out.stdout)["key"]
        self.root_key, self.admin_port = root_key, self.ports.admin
        self.spawn_keygate(first, first_bin, cfg, self.keygate_ports(first)[1])
        self.create_tokens(root_key, self.keygate_ports(first)[1])
        if len(instances) > 1:
            PROCS.stop(first)
            for name, _ in instances[1:]:
                shutil.copytree(self.dir / first / "data", self.dir / name / "data")
            for name, b in instances:
                self.spawn_keygate(name, b, self.keygate_config(name), self.keygate_ports(name)[1])

    def create_tokens(self, root_key: str, admin: int) -> None:
        n, bad = self.args.tokens, self.args.invalid
        log(f"creating {n} tokens through the admin API ({bad} of them then revoked)")
        body = json.dumps(
            {"name": "bench", "rate_limit": {"requests": 1_000_000, "per_seconds": 1, "burst": 0}}
        )
        headers = {"Authorization": f"Bearer {root_key}", "Content-Type": "application/json"}
        made: list[tuple[str, str]] = []
        lock = threading.Lock()
        errors: list[str] = []

        def worker(count: int) -> None:
            c = http.client.HTTPConnection("127.0.0.1", admin, timeout=30)
            mine = []
            for _ in range(count):
                c.request("POST", "/admin/v1/tokens", body=body, headers=headers)
                r = c.getresponse()
                data = r.read()
                if r.status != 201:
                    errors.append(f"{r.status} {data[:200]!r}")
                    return
                j = json.loads(data)
                mine.append((j["id"], j["token"]))
            c.close()
            with lock:
                made.extend(mine)

        t0 = time.time()
        per = [n // 4 + (1 if i < n % 4 else 0) for i in range(4)]
        threads = [threading.Thread(target=worker, args=(k,)) for k in per]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        if errors or len(made) != n:
            sys.exit(f"token creation failed: {errors[:3]}")
        made.sort()
        rng = random.Random(20240607)
        rng.shuffle(made)
        revoke, keep = made[:bad], made[bad:]
        c = http.client.HTTPConnection("127.0.0.1", admin, timeout=30)
        for tid, _ in revoke:
            c.request("POST", f"/admin/v1/tokens/{tid}/revoke", body="{}", headers=headers)
            r = c.getresponse()
            r.read()
            if r.status != 200:
                sys.exit(f"revoking {tid} answered {r.status}")
        c.close()
        if self.args.app_limits:
            # The tokens' app (the default one) gets a shared rate limit and quota that never
            # fire: every request then also takes from the app's bucket and counts in its quota.
            c = http.client.HTTPConnection("127.0.0.1", admin, timeout=30)
            c.request("GET", "/admin/v1/apps?limit=100", headers=headers)
            apps = json.loads(c.getresponse().read())["data"]
            default = next(a["id"] for a in apps if a.get("is_default"))
            limits = {"rate_limit": {"requests": 1_000_000, "per_seconds": 1, "burst": 0},
                      "quota": {"requests": 1_000_000_000_000, "period": "month"}}
            c.request("PATCH", f"/admin/v1/apps/{default}", body=json.dumps(limits), headers=headers)
            r = c.getresponse()
            data = r.read()
            if r.status != 200:
                sys.exit(f"setting the app's shared limits answered {r.status}: {data[:200]!r}")
            c.close()
            log(f"app {default}: shared rate limit and quota set (never reached)")
        self.valid = [t for _, t in keep]
        self.invalid = [t for _, t in revoke]
        log(f"tokens ready in {time.time() - t0:.0f}s: {len(self.valid)} valid, {len(self.invalid)} revoked")

    def write_token_files(self) -> None:
        pool = self.valid + self.invalid
        random.Random(7).shuffle(pool)
        (self.dir / "tokens.txt").write_text("\n".join(pool) + "\n")
        # nginx: `map` lines; the value is a short per-key id that limit_req counts by.
        lines = [f'"Bearer {t}" k{i};' for i, t in enumerate(self.valid)]
        (self.dir / "nginx-keys" / "keys.map").write_text("\n".join(lines) + "\n")
        # HAProxy: "key value" lines, keyed by the token (the header's second word).
        lines = [f"{t} app{i}" for i, t in enumerate(self.valid)]
        (self.dir / "haproxy" / "keys.map").write_text("\n".join(lines) + "\n")

    def start_proxies(self) -> None:
        up = self.ports.upstream
        if self.args.suite == "tls":
            tls = self.dir / "tls"
            self.start_nginx("nginx-tls", self.args.workers,
                             proxy_body(self.ports.nginx_tls, up, tls_dir=tls, listener_tls=True))
            self.start_nginx("nginx-https-up", self.args.workers,
                             proxy_body(self.ports.nginx_https_up, self.ports.upstream_tls, tls_dir=tls, upstream_tls=True))
            wait_http(self.ports.nginx_tls, tls=True)
            wait_http(self.ports.nginx_https_up)
            return
        if self.args.suite == "shared":
            return
        self.start_nginx("nginx", self.args.workers, proxy_body(self.ports.nginx, up))
        d = self.dir / "nginx-keys"
        self.start_nginx(
            "nginx-keys",
            self.args.workers,
            proxy_body(self.ports.nginx_keys, up, extra=KEYS_EXTRA.format(dir=d), checks=KEYS_CHECKS),
        )
        d = self.dir / "haproxy"
        (d / "haproxy.cfg").write_text(
            HAPROXY_CFG.format(threads=self.args.workers, port=self.ports.haproxy, upstream=up, dir=d)
        )
        subprocess.run(["haproxy", "-c", "-q", "-f", str(d / "haproxy.cfg")], check=True)
        p = PROCS.start("haproxy", ["haproxy", "-db", "-f", str(d / "haproxy.cfg")], d / "stdout.log")
        self.pids["haproxy"] = p.pid
        for v in ["nginx", "nginx-keys", "haproxy"]:
            wait_http(self.ports.of(v))

    def check_answers(self) -> None:
        """Each variant answers 200 to a valid token and, if it checks keys, 401 to a revoked one."""
        good, bad = self.valid[0], self.invalid[0] if self.invalid else "kg_not_a_token"
        for v in VARIANTS:
            port = self.ports.of(v)
            if v in HTTP2:
                got = tuple(h2_once(port, t)[0] for t in (good, bad, None))
            else:
                got = tuple(get_status(port, t, v in TLS_LISTENER) for t in (good, bad, None))
            checks_keys = (
                v.startswith("keygate") or (v == "baseline" and not self.args.baseline_public) or v in ("nginx-keys", "haproxy")
            )
            # (h2load tells only the status class: 400 stands for any 4xx.)
            refused = 400 if v in HTTP2 else 401
            want = (200, refused, refused) if checks_keys else (200, 200, 200)
            if got != want:
                sys.exit(f"{v} answered {got} (valid, revoked, none); expected {want}")
        log("every variant answers as expected (valid 200; revoked and missing 401 where keys are checked)")

    def proxy_pids(self, variant: str) -> list[int]:
        return process_tree(self.pids[PROCESS.get(variant, variant)])

    def tls_facts(self) -> dict[str, dict[str, str]]:
        """What each TLS leg negotiated: the client's (an OpenSSL client, as wrk and h2load are) with
        the listener, and the proxy's with the upstream (the upstream's /tls-info, through the proxy)."""
        out: dict[str, dict[str, str]] = {}
        for v in VARIANTS:
            port = self.ports.of(v)
            facts = {}
            if v in HTTP2:
                facts["client"] = h2_once(port, self.valid[0])[1]
            elif v in TLS_LISTENER:
                facts["client"] = negotiated_tls(port, "http/1.1")
            if v.endswith("-https-up"):
                status, body = fetch(port, self.valid[0], path="/tls-info")
                facts["upstream"] = body.strip() if status == 200 else f"? ({status})"
            out[v] = facts
            log(f"TLS of {v}: " + "; ".join(f"{k}: {x}" for k, x in facts.items()))
        return out

    # ---- shared limits (`--suite shared`) -------------------------------------------------------

    def admin_metrics(self, name: str) -> dict[str, float]:
        """A keygate instance's `/metrics` (admin listener), as {"name{labels}": value}."""
        c = connection(self.keygate_ports(name)[1])
        c.request("GET", "/metrics")
        r = c.getresponse()
        text = r.read().decode()
        c.close()
        if r.status != 200:
            raise RuntimeError(f"/metrics of {name} answered {r.status}")
        out = {}
        for line in text.splitlines():
            if line and not line.startswith("#"):
                key, _, value = line.rpartition(" ")
                try:
                    out[key] = float(value)
                except ValueError:
                    pass
        return out

    def shared_counters(self, variant: str) -> dict[str, float]:
        """keygate-redis's shared-limit counters (calls to Redis, waits for a lease, local
        decisions, failed calls); nothing for the other variants."""
        if variant != "keygate-redis":
            return {}
        m = self.admin_metrics("keygate-redis")
        return {k: m.get(name, 0.0) for k, name in SHARED_COUNTERS.items()}

    def counted(self, run, variant: str) -> dict:
        """`run()`, with the shared-limit counters' increase during it in the result's "shared" and,
        in the shared suite, the Redis server's CPU time per request."""
        before = self.shared_counters(variant)
        redis = getattr(self, "redis_pid", None)
        redis0 = cpu_ticks([redis]) if redis else 0
        r = run()
        if redis:
            r["redis_cpu_us_per_req"] = (cpu_ticks([redis]) - redis0) * 1e6 / CLK_TCK / max(1, r["requests"])
        if before:
            after = self.shared_counters(variant)
            r["shared"] = {k: after[k] - before[k] for k in before}
        return r

    def ratelimit_fields(self, variant: str) -> dict[str, str]:
        """The RateLimit fields of the answer to a valid token: keygate writes them whenever the
        token's limit was checked."""
        c = connection(self.ports.of(variant))
        c.request("GET", "/bench", headers={"Authorization": f"Bearer {self.valid[0]}"})
        r = c.getresponse()
        r.read()
        c.close()
        return {k.lower(): v for k, v in r.getheaders() if k.lower().startswith("ratelimit")}

    def redis_cli(self, *args: str) -> str:
        return subprocess.run(["redis-cli", "-u", self.args.redis_url, *args], capture_output=True, text=True,
                              check=True, timeout=60).stdout

    def redis_keys(self) -> list[str]:
        """The Redis keys of this run's keygate-redis (hash-tagged "{<prefix>:<token id>}:…")."""
        return [k for k in self.redis_cli("--scan", "--pattern", f"{{{self.redis_prefix}:*").split() if k]

    def cleanup_redis(self) -> None:
        """Deletes this run's keys (they also expire by themselves about a second after use)."""
        if self.args.suite != "shared" or getattr(self, "redis_cleaned", False):
            return
        try:
            keys = self.redis_keys()
            for i in range(0, len(keys), 500):
                self.redis_cli("DEL", *keys[i : i + 500])
            self.redis_cleaned = True
            log(f"deleted {len(keys)} Redis keys of prefix {self.redis_prefix}")
        except (OSError, subprocess.SubprocessError) as e:
            log(f"could not delete the Redis keys {{{self.redis_prefix}:*: {e}")

    def shared_facts_before(self) -> dict:
        facts = {"redis_prefix": self.redis_prefix,
                 "ratelimit_fields": {v: self.ratelimit_fields(v) for v in VARIANTS}}
        info = self.redis_cli("INFO", "server")
        m = re.search(r"redis_version:(\S+)", info)
        facts["redis_version"] = m.group(1) if m else "?"
        # The Redis server's CPU time is read around each run (when it runs on this machine).
        m = re.search(r"process_id:(\d+)", info)
        if m and Path(f"/proc/{m.group(1)}/stat").exists():
            self.redis_pid = int(m.group(1))
        for v, fields in facts["ratelimit_fields"].items():
            log(f"{v} answers a valid token with " + ("; ".join(f"{k}: {x}" for k, x in fields.items()) or "no RateLimit fields"))
            if not fields:
                sys.exit(f"{v} wrote no RateLimit fields: the tokens' rate limit is not checked")
        return facts

    def shared_facts_after(self) -> dict:
        """What each instance's limiter decided over the whole run, and whether keygate-redis used
        Redis: its counters, `keygate_shared_limits_up`, and its keys in Redis right after."""
        out = {}
        for v in VARIANTS:
            m = self.admin_metrics(v)
            out[v] = {
                "limiter_allowed": m.get('keygate_gateway_limiter_decisions_total{decision="allowed"}', 0.0),
                "limiter_refused": m.get('keygate_gateway_limiter_decisions_total{decision="refused"}', 0.0),
                "rate_limited": m.get('keygate_gateway_refusals_total{reason="rate_limited"}', 0.0),
                "unknown_token": m.get('keygate_gateway_refusals_total{reason="unknown_token"}', 0.0),
                "requests_2xx": m.get('keygate_gateway_requests_total{route="bench",status="2xx"}', 0.0),
            }
            if v == "keygate-redis":
                out[v].update({k: m.get(name, float("nan")) for k, name in SHARED_COUNTERS.items()})
                for k in ("up", "nodes", "leases"):
                    out[v][k] = m.get(f"keygate_shared_limits_{k}", float("nan"))
                out[v]["redis_keys"] = len(self.redis_keys())
            log(f"{v}: " + ", ".join(f"{k} {x:,.0f}" for k, x in out[v].items()))
        r = out.get("keygate-redis", {})
        if r.get("up") != 1 or not r.get("calls"):
            log("WARNING: keygate-redis did not use Redis (keygate_shared_limits_up != 1 or no calls)")
        return out

    # ---- load -------------------------------------------------------------------------------

    def url(self, variant: str) -> str:
        scheme = "https" if variant in TLS_LISTENER else "http"
        return f"{scheme}://{'localhost' if scheme == 'https' else '127.0.0.1'}:{self.ports.of(variant)}/bench"

    def load(self, variant: str, seconds: int, tag: str) -> dict:
        """A closed-loop throughput run: h2load for the HTTP/2 variants, wrk for the others."""
        if variant in HTTP2:
            return self.h2load_throughput(variant, seconds, tag)
        return self.wrk(variant, seconds, tag)

    def measured(self, variant: str, argv: list[str], env: dict | None, tag: str) -> tuple[str, dict]:
        """Runs a load generator against `variant`; returns its output and what the processes
        spent meanwhile (clock ticks), for `per_request`."""
        proxy = self.proxy_pids(variant)
        upstream = process_tree(self.pids["upstream"])
        busy0, up0, (pu0, ps0) = machine_busy_ticks(), cpu_ticks(upstream), cpu_split(proxy)
        kids0 = resource.getrusage(resource.RUSAGE_CHILDREN)
        t0 = time.time()
        p = subprocess.run(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        wall = time.time() - t0
        kids1 = resource.getrusage(resource.RUSAGE_CHILDREN)
        out = p.stdout
        load_ticks = round((kids1.ru_utime + kids1.ru_stime - kids0.ru_utime - kids0.ru_stime) * CLK_TCK)
        (pu1, ps1), up1, busy1 = cpu_split(proxy), cpu_ticks(upstream), machine_busy_ticks()
        hwm, rss = memory_kib(proxy)
        shown = " ".join("Authorization: Bearer <token>" if a.startswith("Authorization: Bearer ") else a for a in argv)
        (self.raw / f"{tag}-{variant}.txt").write_text(shown + "\n\n" + out)
        if p.returncode != 0:
            raise RuntimeError(f"{argv[0]} against {variant} failed:\n{out}")
        proxy_ticks = (pu1 - pu0) + (ps1 - ps0)
        upstream_ticks = up1 - up0
        other = (busy1 - busy0) - proxy_ticks - load_ticks - (0 if variant == "direct" else upstream_ticks)
        ticks = dict(user=pu1 - pu0, sys=ps1 - ps0, upstream=upstream_ticks, load=load_ticks,
                     other_cores=max(0.0, other / CLK_TCK / wall), hwm_kib=hwm, rss_kib=rss)
        return out, ticks

    @staticmethod
    def per_request(variant: str, r: dict, ticks: dict) -> dict:
        """Adds throughput and CPU per request to a run's counts (`requests`, `duration_us`)."""
        reqs = r["requests"]
        us = 1e6 / CLK_TCK / reqs
        r.update(
            variant=variant,
            rps=reqs / (r["duration_us"] / 1e6),
            cpu_us_per_req=(ticks["user"] + ticks["sys"]) * us,
            user_us_per_req=ticks["user"] * us,
            sys_us_per_req=ticks["sys"] * us,
            upstream_cpu_us_per_req=ticks["upstream"] * us,
            wrk_cpu_us_per_req=ticks["load"] * us,
            other_cpu_cores=ticks["other_cores"],
            hwm_kib=ticks["hwm_kib"],
            rss_kib=ticks["rss_kib"],
        )
        return r

    def wrk(self, variant: str, seconds: int, tag: str, tokens: Path | None = None) -> dict:
        default = self.dir / ("tokens-jwt.txt" if variant == "keygate-jwt" else "tokens.txt")
        env = dict(os.environ, KG_BENCH_TOKENS=str(tokens or default), KG_BENCH_THREADS=str(self.args.wrk_threads))
        if tokens is not None:
            env["KG_BENCH_SEQ"] = "1"
        argv = [
            "wrk",
            f"-t{self.args.wrk_threads}",
            f"-c{self.args.connections}",
            f"-d{seconds}s",
            "--timeout",
            "5s",
            "-s",
            str(self.dir / "tokens.lua"),
            self.url(variant),
        ]
        out, ticks = self.measured(variant, argv, env, tag)
        m = re.search(r"^KGBENCH (\{.*\})$", out, re.M)
        if not m:
            raise RuntimeError(f"wrk against {variant} failed:\n{out}")
        return self.per_request(variant, json.loads(m.group(1)), ticks)

    def h2load_throughput(self, variant: str, seconds: int, tag: str) -> dict:
        """Closed-loop HTTP/2: `--h2-clients` connections of `--h2-streams` concurrent streams each,
        over TLS with ALPN h2. h2load sends one header set, so each run carries one valid token
        (another each run), not a token drawn per request as with wrk."""
        a = self.args
        token = random.Random(f"{tag}-{variant}").choice(self.valid)
        argv = ["h2load", f"-t{a.wrk_threads}", f"-c{a.h2_clients}", f"-m{a.h2_streams}", f"-D{seconds}",
                "-H", f"Authorization: Bearer {token}", self.url(variant)]
        out, ticks = self.measured(variant, argv, None, tag)
        fin = re.search(r"finished in ([\d.]+)s", out)
        req = re.search(r"requests: (\d+) total, (\d+) started, (\d+) done, (\d+) succeeded, (\d+) failed, "
                        r"(\d+) errored, (\d+) timeout", out)
        codes = re.search(r"status codes: (\d+) 2xx", out)
        mean = re.search(r"time for request:\s+\S+\s+\S+\s+([\d.]+)(us|ms|s)", out)
        if not (fin and req and codes) or not re.search(r"^application protocol: h2$", out, re.M | re.I):
            raise RuntimeError(f"h2load against {variant} failed:\n{out}")
        done = int(req.group(3))
        r = {"requests": done, "duration_us": float(fin.group(1)) * 1e6, "non_2xx": done - int(codes.group(1)),
             "connect_errors": 0, "read_errors": int(req.group(6)), "write_errors": 0, "timeouts": int(req.group(7)),
             "p50_us": None, "p99_us": None,
             "mean_us": float(mean.group(1)) * {"us": 1, "ms": 1e3, "s": 1e6}[mean.group(2)] if mean else None}
        return self.per_request(variant, r, ticks)

    def h2load(self, variant: str, rate: int, seconds: int, token: str, tag: str) -> dict:
        clients = self.args.latency_clients
        per_client = max(1, round(rate / clients))
        logfile = self.raw / f"{tag}-{variant}.tsv"
        argv = [
            "h2load",
            *([] if variant in HTTP2 else ["--h1"]),
            "-t1",
            f"-c{clients}",
            f"--rps={per_client}",
            f"-D{seconds}",
            "--warm-up-time=1",
            "-H",
            f"Authorization: Bearer {token}",
            f"--log-file={logfile}",
            self.url(variant),
        ]
        out = subprocess.run(argv, capture_output=True, text=True)
        (self.raw / f"{tag}-{variant}.txt").write_text(" ".join(argv).replace(token, "<token>") + "\n\n" + out.stdout + out.stderr)
        if out.returncode != 0:
            raise RuntimeError(f"h2load against {variant} failed:\n{out.stdout}{out.stderr}")
        rows = []
        for line in logfile.read_text().splitlines():
            parts = line.split("\t")
            if len(parts) >= 3:
                rows.append((int(parts[0]), int(parts[1]), int(parts[2])))
        logfile.unlink()
        if not rows:
            raise RuntimeError(f"h2load against {variant} logged no request")
        # Drop the first second (connections opening) whatever h2load counted as warm-up.
        first = min(r[0] for r in rows)
        kept = sorted(r[2] for r in rows if r[0] >= first + 1_000_000)
        bad = sum(1 for r in rows if not 200 <= r[1] < 300)
        span = (max(r[0] for r in rows) - first) / 1e6 or 1.0
        return {
            "variant": variant,
            "requests": len(rows),
            "achieved_rps": len(rows) / span,
            "non_2xx": bad,
            "p50_us": pct(kept, 50),
            "p99_us": pct(kept, 99),
            "p999_us": pct(kept, 99.9),
        }

    # ---- the run ----------------------------------------------------------------------------

    def run(self, binary: Path) -> dict:
        a = self.args
        self.prepare_dir()
        (self.dir / "tokens.lua").write_text(WRK_LUA)
        # A copy, so that a rebuild while the benchmark runs changes nothing.
        shutil.copy2(binary, self.dir / "keygate-bin")
        binary = self.dir / "keygate-bin"
        facts = machine_facts(binary)
        facts["load_before"] = os.getloadavg()
        started = time.time()
        if a.suite == "tls":
            self.make_certs()
        self.start_upstream()
        self.start_idp()
        self.start_keygate(binary)
        self.write_token_files()
        if "keygate-jwt" in VARIANTS:
            self.make_jwts()
        self.start_proxies()
        self.check_answers()
        if a.suite == "tls":
            facts["tls"] = self.tls_facts()
        if a.suite == "shared":
            facts["shared"] = self.shared_facts_before()

        log(f"warm-up: {a.warmup}s per variant")
        warmup = {v: self.counted(lambda: self.load(v, a.warmup, "warmup"), v) for v in VARIANTS}

        thr: dict[str, list[dict]] = {v: [] for v in VARIANTS}
        for rnd in range(a.rounds):
            order = interleave(VARIANTS, rnd)
            for v in order:
                r = self.counted(lambda: self.load(v, a.seconds, f"throughput-r{rnd + 1}"), v)
                r["round"] = rnd + 1
                thr[v].append(r)
            line = "  ".join(f"{v}={thr[v][-1]['rps']:,.0f}" for v in VARIANTS)
            extra = "".join(f"; {v}: " + ", ".join(f"{k} {x:,.0f}" for k, x in thr[v][-1]["shared"].items())
                            for v in VARIANTS if "shared" in thr[v][-1])
            log(f"round {rnd + 1}/{a.rounds} ({'→'.join(order)}): {line} req/s{extra}")

        # Each variant's fixed rate is a fraction of its reference nginx's median throughput.
        rates = {v: int(statistics.median(r["rps"] for r in thr[reference(v)]) * a.latency_fraction) for v in VARIANTS}
        for n in sorted({reference(v) for v in VARIANTS}):
            log(f"latency of {n} and its peers at a fixed {rates[n]:,} req/s ({a.latency_fraction:g} of its median)")
        lat: dict[str, list[dict]] = {v: [] for v in VARIANTS}
        rng = random.Random(11)
        jwts = (self.dir / "tokens-jwt.txt").read_text().split() if "keygate-jwt" in VARIANTS else []
        for rnd in range(a.latency_rounds):
            token = rng.choice(self.valid)
            jwt = rng.choice(jwts) if jwts else ""
            for v in interleave(VARIANTS, rnd):
                r = self.counted(lambda: self.h2load(v, rates[v], a.latency_seconds, jwt if v == "keygate-jwt" else token,
                                                     f"latency-r{rnd + 1}"), v)
                r["round"] = rnd + 1
                lat[v].append(r)
            line = "  ".join(f"{v}={lat[v][-1]['p99_us'] / 1000:.2f}" for v in VARIANTS)
            log(f"latency round {rnd + 1}/{a.latency_rounds}: p99 ms {line}")

        fresh = self.fresh_runs() if "keygate-jwt" in VARIANTS and a.fresh_rounds > 0 else []
        if a.suite == "shared":
            facts["shared"]["after"] = self.shared_facts_after()
            facts["shared"]["warmup"] = {v: r.get("shared", {}) for v, r in warmup.items()}

        facts["load_after"] = os.getloadavg()
        facts["minutes"] = (time.time() - started) / 60
        return {
            "facts": facts,
            "params": {k: v for k, v in vars(a).items()},
            "rate": rates.get("nginx"),
            "rates": rates,
            "throughput": thr,
            "latency": lat,
            "fresh": fresh,
            "summary": summarize(thr, lat),
        }

    # ---- JWT variants -------------------------------------------------------------------------

    def start_idp(self) -> None:
        """A stand-in identity provider: an Ed25519 key whose JWKS is served on its own port, so that
        keygate (which trusts it, see KEYGATE_CFG) verifies its tokens, and tokens that keygate has
        never seen can be made here by the hundred thousand."""
        from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
        from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
        import base64
        import http.server

        self.idp_key = Ed25519PrivateKey.generate()
        raw = self.idp_key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
        x = base64.urlsafe_b64encode(raw).rstrip(b"=").decode()
        jwks = json.dumps({"keys": [{"kty": "OKP", "crv": "Ed25519", "x": x, "kid": "bench-1", "alg": "EdDSA"}]}).encode()

        class Jwks(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 (the stdlib's name)
                self.send_response(200)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(jwks)))
                self.end_headers()
                self.wfile.write(jwks)

            def log_message(self, *args) -> None:
                pass

        server = http.server.ThreadingHTTPServer(("127.0.0.1", self.ports.jwks), Jwks)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        atexit.register(server.shutdown)

    def idp_tokens(self, n: int) -> list[str]:
        """`n` distinct JWTs of the stand-in identity provider."""
        import base64

        def b64(b: bytes) -> str:
            return base64.urlsafe_b64encode(b).rstrip(b"=").decode()

        header = b64(json.dumps({"alg": "EdDSA", "typ": "JWT", "kid": "bench-1"}, separators=(",", ":")).encode())
        now = int(time.time())
        out = []
        for i in range(n):
            claims = {"iss": "https://bench-idp.invalid", "sub": f"user-{i}", "aud": "bench", "exp": now + 86_400,
                      "iat": now, "jti": f"fresh-{now}-{i}", "azp": "bench-app"}
            payload = b64(json.dumps(claims, separators=(",", ":")).encode())
            sig = b64(self.idp_key.sign(f"{header}.{payload}".encode()))
            out.append(f"{header}.{payload}.{sig}")
        return out

    def make_jwts(self) -> None:
        """JWT access tokens from keygate's own token endpoint, for the `keygate-jwt` variant: an OAuth
        client, then `--jwts` tokens (paced by the endpoint's rate limit per address)."""
        n = self.args.jwts
        headers = {"Authorization": f"Bearer {self.root_key}", "Content-Type": "application/json"}
        c = http.client.HTTPConnection("127.0.0.1", self.admin_port, timeout=30)
        c.request("POST", "/admin/v1/apps", body=json.dumps({"name": "bench-jwt"}), headers=headers)
        app = json.loads(c.getresponse().read())["id"]
        c.request("POST", f"/admin/v1/apps/{app}/oauth-client",
                  body=json.dumps({"access_token_ttl_seconds": 86_400}), headers=headers)
        r = c.getresponse()
        client = json.loads(r.read())
        if r.status != 201:
            sys.exit(f"cannot register the bench's OAuth client: {r.status} {client}")
        c.close()
        import base64
        basic = base64.b64encode(f"{client['client_id']}:{client['client_secret']}".encode()).decode()
        log(f"minting {n} JWT access tokens at keygate's token endpoint (rate-limited per address)")
        t0 = time.time()
        tokens: list[str] = []
        g = http.client.HTTPConnection("127.0.0.1", self.ports.keygate, timeout=30)
        while len(tokens) < n:
            g.request("POST", "/oauth2/token", body="grant_type=client_credentials",
                      headers={"Authorization": f"Basic {basic}", "Content-Type": "application/x-www-form-urlencoded"})
            r = g.getresponse()
            body = json.loads(r.read())
            if r.status == 429:
                time.sleep(float(r.getheader("retry-after", "1")))
                continue
            if r.status != 200:
                sys.exit(f"the token endpoint answered {r.status} {body}")
            tokens.append(body["access_token"])
        g.close()
        (self.dir / "tokens-jwt.txt").write_text("\n".join(tokens) + "\n")
        log(f"{n} JWTs ready in {time.time() - t0:.0f}s")

    def fresh_runs(self) -> list[dict]:
        """`keygate-jwt-new`: every request carries a JWT keygate has never seen, so each is verified in
        full (signature and claims). Runs after the interleaved rounds, `--fresh-rounds` of
        `--fresh-seconds` each, every run on its own block of never-used tokens."""
        a = self.args
        per_run = a.fresh_tokens
        log(f"signing {per_run * a.fresh_rounds:,} fresh JWTs of the stand-in identity provider")
        runs = []
        for rnd in range(a.fresh_rounds):
            path = self.dir / f"tokens-fresh-{rnd + 1}.txt"
            path.write_text("\n".join(self.idp_tokens(per_run)) + "\n")
            r = self.wrk("keygate-jwt-new", a.fresh_seconds, f"fresh-r{rnd + 1}", tokens=path)
            r["round"] = rnd + 1
            r["tokens_reused"] = max(0, r["requests"] - per_run)
            runs.append(r)
            log(f"fresh JWTs, run {rnd + 1}/{a.fresh_rounds}: {r['rps']:,.0f} req/s, {r['cpu_us_per_req']:.1f} µs CPU/req"
                + (f" ({r['tokens_reused']:,} requests reused a token)" if r["tokens_reused"] else ""))
            path.unlink()
        return runs

    def profile(self, seconds: int) -> None:
        """Where each proxy's time goes: system calls and context switches per request for every
        proxy (`perf stat`), then `perf record` of keygate. Reports go to the work directory."""
        if shutil.which("perf") is None:
            log("perf is missing (Debian: linux-perf); no profile")
            return
        events = [
            "task-clock", "context-switches", "raw_syscalls:sys_enter",
            "syscalls:sys_enter_epoll_wait", "syscalls:sys_enter_epoll_pwait", "syscalls:sys_enter_epoll_ctl",
            "syscalls:sys_enter_read", "syscalls:sys_enter_readv", "syscalls:sys_enter_recvfrom",
            "syscalls:sys_enter_write", "syscalls:sys_enter_writev", "syscalls:sys_enter_sendto",
            "syscalls:sys_enter_futex",
        ]
        table = []
        for v in [v for v in VARIANTS if v != "direct"]:
            pids = ",".join(str(p) for p in self.proxy_pids(v))
            out = self.dir / f"perf-stat-{v}.csv"
            stat = subprocess.Popen(
                ["perf", "stat", "-x", ",", "-o", str(out), "-e", ",".join(events), "-p", pids,
                 "--", "sleep", str(seconds + 1)],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            )
            time.sleep(0.5)
            r = self.wrk(v, seconds, "profile")
            stat.wait()
            counts = perf_stat_counts(out)
            n = r["requests"]
            row = {"variant": v, "requests": n, "rps": r["rps"]}
            for e in events:
                short = e.split(":")[-1].replace("sys_enter_", "").replace("sys_enter", "syscalls")
                row[short] = counts.get(e, float("nan")) / n
            row["task-clock"] = counts.get("task-clock", float("nan")) * 1000 / n  # msec -> µs per request
            table.append(row)
        cols = [k for k in table[0] if k not in ("variant", "requests", "rps")]
        with open(self.dir / "perf-per-request.txt", "w") as f:
            f.write("per request (task-clock in µs, the rest are counts):\n")
            f.write(f"{'variant':<11}" + "".join(f"{c[:11]:>12}" for c in cols) + "\n")
            for row in table:
                f.write(f"{row['variant']:<11}" + "".join(f"{row[c]:>12.2f}" for c in cols) + "\n")
        print((self.dir / "perf-per-request.txt").read_text())

        data = self.dir / "perf.data"
        pid = self.pids["keygate"]
        env = dict(os.environ, KG_BENCH_TOKENS=str(self.dir / "tokens.txt"))
        wrk = subprocess.Popen(
            ["wrk", f"-t{self.args.wrk_threads}", f"-c{self.args.connections}", f"-d{seconds + 3}s",
             "-s", str(self.dir / "tokens.lua"), f"http://127.0.0.1:{self.ports.keygate}/bench"],
            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        time.sleep(1.5)
        log(f"perf record on keygate (pid {pid}) for {seconds}s under wrk")
        subprocess.run(
            ["perf", "record", "-F", "999", "--call-graph", "dwarf,16384", "-o", str(data), "-p", str(pid),
             "--", "sleep", str(seconds)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        wrk.wait()
        workers = ",".join(f"keygate-gw-{i}" for i in range(self.args.workers))
        reports = [
            ("perf-threads.txt", ["--no-children", "--sort", "comm"]),
            ("perf-self.txt", ["--no-children", "--sort", "dso,symbol"]),
            ("perf-inclusive.txt", ["--children", "--sort", "symbol", "--comm", workers]),
        ]
        for name, extra in reports:
            with open(self.dir / name, "w") as f:
                subprocess.run(
                    ["perf", "report", "-i", str(data), "--stdio", "-g", "none", "--percent-limit", "0.3", *extra],
                    stdout=f, stderr=subprocess.DEVNULL,
                )
        log(f"profile: {self.dir}/perf-per-request.txt, " + ", ".join(n for n, _ in reports) + f" (data: {data})")

    def system_profile(self, seconds: int) -> None:
        """Where the whole machine's time goes a request, against each proxy in turn: `perf record
        -a` on the CPU clock (every sample about 1 ms of one core's time, idle included) during a
        wrk run, each sample given to a role by its thread (wrk, the proxy, the upstream, idle,
        other; a proxy's thread that starts during the run counts as other) and to its function,
        then divided by the requests served. Unlike `--profile`'s shares of one process, these
        are absolute µs a request, so two proxies' runs compare term by term, the kernel time
        they cause in wrk and the upstream included. Only the samples taken while wrk ran count
        (`--time`, on the monotonic clock). No call graphs: with `-g`, perf's own work a sample
        cut nginx's throughput by a quarter and keygate's by 3%, which skews the comparison;
        `--profile` has keygate's call graphs."""
        if shutil.which("perf") is None:
            log("perf is missing (Debian: linux-perf); no system profile")
            return
        period_us = 1e6 / 999
        per: dict[str, dict[tuple[str, str], float]] = {}
        counted: dict[str, dict[str, float]] = {v: {} for v in VARIANTS}
        idled: dict[str, dict[str, float]] = {v: {} for v in VARIANTS}
        for v in [v for v in VARIANTS if v != "direct"]:
            roles = {}
            for role, pids in (("proxy", self.proxy_pids(v)), ("upstream", process_tree(self.pids["upstream"]))):
                for pid in pids:
                    for t in Path(f"/proc/{pid}/task").iterdir():
                        roles[int(t.name)] = role
            data = self.dir / f"perf-system-{v}.data"
            n, window = self.under_perf(
                v, seconds, "system-profile",
                ["record", "-a", "-e", "cpu-clock", "-F", "999", "-k", "CLOCK_MONOTONIC", "-o", str(data)])
            # The scheduler's work, counted over the whole machine in a wrk run of its own (its
            # tracepoints cost a little per event, and the proxy that causes more events would
            # pay more of it in the profile above).
            sched_out = self.dir / f"perf-system-sched-{v}.csv"
            m, _ = self.under_perf(
                v, seconds, "system-profile-sched",
                ["stat", "-a", "-x", ",", "-o", str(sched_out), "-e", ",".join(SCHED_EVENTS)])
            counted[v] = {e: c / m for e, c in perf_stat_counts(sched_out).items()}
            idled[v] = self.idle_switches(v, min(seconds, 3), roles)
            rep = subprocess.run(
                ["perf", "report", "-i", str(data), "--stdio", "--no-children", "-n", "-g", "none",
                 "--time", window, "--sort", "pid,sym", "--percent-limit", "0"],
                stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
            ).stdout
            costs: dict[tuple[str, str], float] = {}
            for line in rep.splitlines():
                m = re.match(r"^\s*[\d.]+%\s+(\d+)\s+(\d+):(\S+)\s+\[(.)\]\s+(.*?)\s*$", line)
                if not m:
                    continue
                samples, tid, comm, space, sym = int(m[1]), int(m[2]), m[3], m[4], m[5]
                role = "idle" if tid == 0 else role_of(roles, tid, comm)
                key = (f"{role} {'kernel' if space == 'k' else 'user'}", sym)
                costs[key] = costs.get(key, 0.0) + samples * period_us / n
            per[v] = costs
        names = list(per)
        groups = sorted({g for c in per.values() for g, _ in c})
        lines = [f"µs of one core's time a request, by role (the machine's {os.cpu_count()} cores; "
                 "idle is time nobody used):",
                 f"{'role':<18}" + "".join(f"{v:>14}" for v in names)]
        for g in groups:
            lines.append(f"{g:<18}" + "".join(f"{sum(c for (gg, _), c in per[v].items() if gg == g):>14.3f}" for v in names))
        lines.append(f"{'all but idle':<18}" + "".join(
            f"{sum(c for (gg, _), c in per[v].items() if not gg.startswith('idle')):>14.3f}" for v in names))
        lines += ["", "the scheduler's events a request, whole machine (`perf stat -a` about a second wrk run):",
                  f"{'event':<34}" + "".join(f"{v:>14}" for v in names)]
        for e in SCHED_EVENTS:
            lines.append(f"{e:<34}" + "".join(f"{counted[v].get(e, float('nan')):>14.3f}" for v in names))
        lines += ["", "switches to the idle task a request, by the role of the thread that left the core:",
                  f"{'role':<34}" + "".join(f"{v:>14}" for v in names)]
        for r in sorted({r for d in idled.values() for r in d}):
            lines.append(f"{r:<34}" + "".join(f"{idled[v].get(r, 0.0):>14.3f}" for v in names))
        ref = "nginx" if "nginx" in per else names[0]
        for v in [v for v in names if v != ref]:
            keys = set(per[v]) | set(per[ref])
            diff = sorted(keys, key=lambda k: -abs(per[v].get(k, 0.0) - per[ref].get(k, 0.0)))
            lines += ["", f"{v} against {ref}, the 40 largest differences (µs a request):",
                      f"{'role':<18}{'function':<48}{ref:>10}{v:>10}{'diff':>10}"]
            for k in diff[:40]:
                a, b = per[ref].get(k, 0.0), per[v].get(k, 0.0)
                lines.append(f"{k[0]:<18}{k[1][:47]:<48}{a:>10.3f}{b:>10.3f}{b - a:>+10.3f}")
        out = self.dir / "perf-system.txt"
        out.write_text("\n".join(lines) + "\n")
        print(out.read_text())
        log(f"system profile: {out} (data: {self.dir}/perf-system-<variant>.data)")

    def idle_switches(self, variant: str, seconds: int, roles: dict[int, str]) -> dict[str, float]:
        """How often a core goes idle a request under `variant`, by the role of the thread that
        blocked and left it (`sched:sched_switch` to pid 0, recorded over the whole machine in a
        wrk run of its own)."""
        data = self.dir / f"perf-system-switch-{variant}.data"
        n, window = self.under_perf(
            variant, seconds, "system-profile-switch",
            ["record", "-a", "-e", "sched:sched_switch", "-k", "CLOCK_MONOTONIC", "-o", str(data)])
        trace = subprocess.run(["perf", "script", "-i", str(data), "-F", "trace", "--time", window],
                               stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True).stdout
        out: dict[str, float] = {}
        for line in trace.splitlines():
            m = re.search(r"prev_comm=(.*?) prev_pid=(\d+) .*==> next_comm=.* next_pid=0 ", line + " ")
            if m:
                role = role_of(roles, int(m[2]), m[1])
                out[role] = out.get(role, 0.0) + 1 / n
        return out

    def under_perf(self, variant: str, seconds: int, tag: str, perf: list[str]) -> tuple[int, str]:
        """Runs `perf <perf> -- sleep` while a wrk run of `seconds` loads `variant`; returns the
        requests served and the wrk run's time window on the monotonic clock, as `perf report
        --time` and `perf script --time` take it (for a perf recording with `-k CLOCK_MONOTONIC`)."""
        rec = subprocess.Popen(["perf", *perf, "--", "sleep", str(seconds + 2)],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(0.5)
        t0 = time.monotonic()
        n = self.wrk(variant, seconds, tag)["requests"]
        t1 = time.monotonic()
        rec.wait()
        return n, f"{t0:.6f},{t1:.6f}"


def role_of(roles: dict[int, str], tid: int, comm: str) -> str:
    """A thread's role in `--profile-system`: the proxy's or the upstream's (by thread id, read
    before the run), wrk's (by name), or other."""
    return roles.get(tid, "wrk" if comm == "wrk" else "other")


# What `--profile-system` counts of the scheduler: wake-ups, switches, migrations between cores,
# and the interrupts one core sends another to make it reschedule or run a function.
SCHED_EVENTS = [
    "sched:sched_wakeup", "sched:sched_switch", "sched:sched_migrate_task",
    "irq_vectors:reschedule_entry", "irq_vectors:call_function_single_entry",
]


def interleave(items: list[str], rnd: int) -> list[str]:
    """A different order each round: rotated by the round number, reversed every other round (two
    items, where rotating and reversing would cancel out, simply alternate)."""
    if len(items) == 2:
        return list(items) if rnd % 2 == 0 else items[::-1]
    k = rnd % len(items)
    order = items[k:] + items[:k]
    return order[::-1] if rnd % 2 else order


def pct(sorted_values: list[int], p: float) -> float:
    if not sorted_values:
        return float("nan")
    i = min(len(sorted_values) - 1, max(0, int(round(p / 100 * len(sorted_values) + 0.5)) - 1))
    return float(sorted_values[i])


def med(values) -> float:
    values = list(values)
    return statistics.median(values) if values else float("nan")


def per_round(thr: dict, v: str, ref: str) -> list[float]:
    """The per-round throughput ratios of `v` to `ref` (none if `ref` was not measured)."""
    if ref not in thr:
        return [float("nan")]
    return [a["rps"] / b["rps"] for a, b in zip(thr[v], thr[ref])]


def summarize(thr: dict, lat: dict) -> dict:
    """Medians per variant. "vs_nginx" is the ratio to the variant's reference nginx: the plain
    proxy, or in the TLS suite the nginx of its pair."""
    out = {}
    for v in VARIANTS:
        runs = thr[v]
        per_round_nginx = per_round(thr, v, reference(v))
        per_round_direct = per_round(thr, v, "direct")
        lruns = lat[v]
        direct_lat = lat.get("direct") or [{"p99_us": float("nan")}] * len(lruns)
        added = [a["p99_us"] - b["p99_us"] for a, b in zip(lruns, direct_lat)]
        per_round_keygate = per_round(thr, v, "keygate")
        out[v] = {
            "rps": med(r["rps"] for r in runs),
            "vs_keygate": med(per_round_keygate),
            "vs_keygate_range": [min(per_round_keygate), max(per_round_keygate)],
            "vs_nginx": med(per_round_nginx),
            "vs_nginx_range": [min(per_round_nginx), max(per_round_nginx)],
            "vs_direct": med(per_round_direct),
            "cpu_us_per_req": med(r["cpu_us_per_req"] for r in runs),
            "user_us_per_req": med(r["user_us_per_req"] for r in runs),
            "sys_us_per_req": med(r["sys_us_per_req"] for r in runs),
            "upstream_cpu_us_per_req": med(r["upstream_cpu_us_per_req"] for r in runs),
            "wrk_cpu_us_per_req": med(r["wrk_cpu_us_per_req"] for r in runs),
            "peak_rss_mib": max(r["hwm_kib"] for r in runs) / 1024,
            "non_2xx_share": sum(r["non_2xx"] for r in runs) / max(1, sum(r["requests"] for r in runs)),
            "socket_errors": sum(r["connect_errors"] + r["read_errors"] + r["write_errors"] + r["timeouts"] for r in runs),
            "other_cpu_cores": med(r["other_cpu_cores"] for r in runs),
            "lat_p50_ms": med(r["p50_us"] for r in lruns) / 1000,
            "lat_p99_ms": med(r["p99_us"] for r in lruns) / 1000,
            "lat_p999_ms": med(r["p999_us"] for r in lruns) / 1000,
            "lat_added_p99_ms": med(added) / 1000,
            "lat_achieved_rps": med(r["achieved_rps"] for r in lruns),
            "lat_non_2xx": sum(r["non_2xx"] for r in lruns),
        }
        if runs and "redis_cpu_us_per_req" in runs[0]:
            out[v]["redis_cpu_us_per_req"] = med(r["redis_cpu_us_per_req"] for r in runs)
        if runs and "shared" in runs[0]:
            reqs = sum(r["requests"] for r in runs)
            out[v]["shared"] = {k: sum(r["shared"][k] for r in runs) for k in SHARED_COUNTERS}
            out[v]["shared_calls_per_1000"] = 1000 * out[v]["shared"]["calls"] / max(1, reqs)
    return out


def cmd_output(argv: list[str]) -> str:
    try:
        p = subprocess.run(argv, capture_output=True, text=True, timeout=20)
        return (p.stdout + p.stderr).strip()
    except (OSError, subprocess.TimeoutExpired):
        return "?"


def machine_facts(binary: Path) -> dict:
    cpu = "?"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    mem_kib = int(Path("/proc/meminfo").read_text().split()[1])
    commit = cmd_output(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"])
    dirty = cmd_output(["git", "-C", str(ROOT), "status", "--porcelain", "--", "crates", "Cargo.toml", "Cargo.lock"])
    lock = (ROOT / "Cargo.lock").read_text() if (ROOT / "Cargo.lock").exists() else ""

    def locked(crate: str) -> str:
        m = re.search(rf'^name = "{crate}"\nversion = "([^"]+)"', lock, re.M)
        return f"{crate} {m.group(1) if m else '?'}"

    return {
        "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "cpu": cpu,
        "cores": os.cpu_count(),
        "memory_gib": round(mem_kib / 1024 / 1024),
        "kernel": platform.release(),
        "os": cmd_output(["sh", "-c", ". /etc/os-release && echo $PRETTY_NAME"]),
        "nginx": cmd_output(["nginx", "-v"]).replace("nginx version: ", ""),
        "haproxy": "haproxy/" + (re.findall(r"version (\S+)", cmd_output(["haproxy", "-v"])) or ["?"])[0],
        "wrk": cmd_output(["wrk", "-v"]).splitlines()[0].split(" [")[0].replace("wrk debian/", "wrk/"),
        "h2load": cmd_output(["h2load", "--version"]).splitlines()[0],
        "openssl": cmd_output(["openssl", "version"]).split(" (")[0],
        "rustls": f"{locked('rustls')} with {locked('aws-lc-rs')}",
        "keygate": cmd_output([str(binary), "--version"]) + f" (commit {commit}{', with uncommitted changes' if dirty else ''})",
    }


# --------------------------------------------------------------------------------------------
# Report


def fmt_int(x: float) -> str:
    return f"{x:,.0f}"


def verdicts(s: dict) -> list[tuple[str, bool, str]]:
    k, n = s["keygate"], s["nginx"]
    jwt = []
    if "keygate-jwt" in s:
        j = s["keygate-jwt"]
        jwt = [(
            "Throughput with JWT access tokens (cached) within 5% of API keys (issue 5)",
            j["vs_keygate"] >= 0.95,
            f"ratio {j['vs_keygate']:.2f} (rounds {j['vs_keygate_range'][0]:.2f}–{j['vs_keygate_range'][1]:.2f}); "
            f"{fmt_int(j['rps'])} against {fmt_int(k['rps'])} req/s",
        )]
    return [
        (
            "Throughput at least the plain nginx proxy's (ratio ≥ 1.0)",
            k["vs_nginx"] >= 1.0,
            f"ratio {k['vs_nginx']:.2f} (rounds {k['vs_nginx_range'][0]:.2f}–{k['vs_nginx_range'][1]:.2f}); "
            f"{fmt_int(k['rps'])} against {fmt_int(n['rps'])} req/s",
        ),
        (
            "CPU time per request at most nginx's",
            k["cpu_us_per_req"] <= n["cpu_us_per_req"],
            f"{k['cpu_us_per_req']:.1f} µs against {n['cpu_us_per_req']:.1f} µs "
            f"({k['cpu_us_per_req'] / n['cpu_us_per_req']:.2f}×)",
        ),
        (
            "p99 added latency at half nginx's maximum at most nginx's",
            k["lat_added_p99_ms"] <= n["lat_added_p99_ms"],
            f"{k['lat_added_p99_ms']:.2f} ms against {n['lat_added_p99_ms']:.2f} ms",
        ),
    ] + jwt


def run_header(res: dict, versions: str, command: str,
               what: str = "Reproduce (installs nginx, haproxy, wrk and nghttp2-client if missing, builds keygate, "
                           "rewrites this part of the page and the chart):") -> list[str]:
    """The lines every section starts with: the machine, its load, the versions, the command."""
    f = res["facts"]
    return [
        f"Run of {f['date']}, {f['minutes']:.0f} minutes, on {f['cores']} cores ({f['cpu']}), "
        f"{f['memory_gib']} GiB, {f['os']}, Linux {f['kernel']}. Load average before: "
        f"{f['load_before'][0]:.2f}, after: {f['load_after'][0]:.2f}.",
        "",
        f"Versions (Debian packages): {versions}; {f['keygate']}.",
        "",
        what,
        "",
        "```sh",
        command,
        "```",
        "",
    ]


def ms(us: float | None) -> str:
    return "—" if us is None else f"{us / 1000:.2f}"


def every_run(res: dict) -> list[str]:
    """The collapsed table of every run, throughput then latency."""
    p = res["params"]
    lines = ["<details><summary>Every run</summary>", ""]
    lines.append("| phase | round | variant | req/s | CPU µs/req | upstream µs/req | non-2xx | p50 ms | p99 ms |")
    lines.append("|---|---:|---|---:|---:|---:|---:|---:|---:|")
    for rnd in range(p["rounds"]):
        for v in VARIANTS:
            r = res["throughput"][v][rnd]
            tool = "h2load" if v in HTTP2 else "wrk"
            lines.append(f"| {tool} | {rnd + 1} | {v} | {fmt_int(r['rps'])} | {r['cpu_us_per_req']:.1f} | "
                         f"{r['upstream_cpu_us_per_req']:.1f} | {r['non_2xx']} | {ms(r['p50_us'])} | "
                         f"{ms(r['p99_us'])} |")
    for rnd in range(p["latency_rounds"]):
        for v in VARIANTS:
            r = res["latency"][v][rnd]
            lines.append(f"| h2load | {rnd + 1} | {v} | {fmt_int(r['achieved_rps'])} | | | {r['non_2xx']} | "
                         f"{ms(r['p50_us'])} | {ms(r['p99_us'])} |")
    lines.append("")
    lines.append("</details>")
    return lines


def side_costs(s: dict, load_generator: str) -> str:
    """What the upstream, the load generator and the rest of the machine spent, and the errors."""
    up = ", ".join(f"{v} {s[v]['upstream_cpu_us_per_req']:.1f}" for v in VARIANTS)
    load = ", ".join(f"{v} {s[v]['wrk_cpu_us_per_req']:.1f}" for v in VARIANTS)
    other = max(s[v]["other_cpu_cores"] for v in VARIANTS)
    return (f"Per request, the upstream spent (µs): {up}; {load_generator} spent: {load}. Other processes on the "
            f"machine used at most {other:.2f} cores (median per variant) during the runs. "
            f"Socket errors: {sum(s[v]['socket_errors'] for v in VARIANTS)}; non-2xx at the fixed rate: "
            f"{sum(s[v]['lat_non_2xx'] for v in VARIANTS)}.")


def markdown(res: dict, chart_name: str) -> str:
    f, p, s = res["facts"], res["params"], res["summary"]
    lines = run_header(res, f"{f['nginx']}, {f['haproxy']}, {f['wrk']}, {f['h2load']}", "python3 bench/gateway.py")
    lines.append(
        f"Setup: every proxy has **{p['workers']} workers** (nginx `worker_processes`, HAProxy `nbthread`, keygate "
        f"`gateway.threads`) in front of one upstream, an nginx with {p['upstream_workers']} worker answering "
        f"`return 200 \"ok\"`. Throughput: `wrk -t{p['wrk_threads']} -c{p['connections']}`, {p['rounds']} rounds of "
        f"{p['seconds']} s per variant, interleaved (the order rotates and reverses each round) after one "
        f"{p['warmup']} s warm-up per variant; every request carries a bearer token drawn at random from "
        f"{p['tokens']:,} ({p['invalid']:,} of them revoked, so refused with 401); for *keygate with JWT access "
        f"tokens*, from {p.get('jwts', 0):,} JWTs issued by keygate's token endpoint (each verified once, then "
        f"from the cache). Latency: `h2load --h1 "
        f"-c{p['latency_clients']} --rps` at a fixed **{res['rate']:,} req/s** (half the plain nginx proxy's median), "
        f"{p['latency_rounds']} rounds of {p['latency_seconds']} s, first second dropped, one valid token per round; "
        f"added latency is the variant's p99 minus the direct p99 of the same round. Figures are medians over rounds; "
        f"ratios are medians of the per-round ratios."
    )
    lines.append("")
    lines.append("| variant | req/s | × nginx proxy | × direct | CPU µs/req (user + sys) | peak RSS MiB | non-2xx | "
                 "p50 / p99 ms at fixed rate | p99 added ms |")
    lines.append("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for v in VARIANTS:
        r = s[v]
        cpu = f"{r['cpu_us_per_req']:.1f} ({r['user_us_per_req']:.1f} + {r['sys_us_per_req']:.1f})"
        if v == "direct":
            cpu += " ¹"
        added = "—" if v == "direct" else f"{r['lat_added_p99_ms']:+.2f}"
        rng = f" ({r['vs_nginx_range'][0]:.2f}–{r['vs_nginx_range'][1]:.2f})" if v != "nginx" else ""
        lines.append(
            f"| {LABELS[v]} | {fmt_int(r['rps'])} | {r['vs_nginx']:.2f}{rng} | {r['vs_direct']:.2f} | {cpu} | "
            f"{r['peak_rss_mib']:.1f} | {100 * r['non_2xx_share']:.1f}% | "
            f"{r['lat_p50_ms']:.2f} / {r['lat_p99_ms']:.2f} | {added} |"
        )
    lines.append("")
    lines.append("¹ For *direct*, the CPU and RSS columns are the upstream's own. For the others they are the "
                 "proxy's alone: all its processes and threads (utime + stime from `/proc/PID/stat` over the "
                 "measured run, divided by the requests wrk completed); RSS is the sum of `VmHWM` over its "
                 "processes. Round ranges of the ratio are in parentheses. Non-2xx are the revoked tokens' 401s.")
    lines.append("")
    lines.append(side_costs(s, "wrk"))
    lines.append("")
    fresh = res.get("fresh") or []
    if fresh:
        n_med = s["nginx"]["rps"]
        rps = med(r["rps"] for r in fresh)
        reused = sum(r.get("tokens_reused", 0) for r in fresh)
        lines.append(
            f"**JWTs never seen before** (`keygate-jwt-new`): after the rounds, {len(fresh)} runs of "
            f"{p['fresh_seconds']} s in which every request carries a JWT the gateway has not seen (EdDSA, from a "
            f"trusted issuer standing in for an identity provider, each verified in full: signature and claims): "
            f"**{fmt_int(rps)} req/s** ({rps / n_med:.2f}× the nginx proxy's median), "
            f"{med(r['cpu_us_per_req'] for r in fresh):.1f} µs CPU per request "
            f"({med(r['user_us_per_req'] for r in fresh):.1f} user + {med(r['sys_us_per_req'] for r in fresh):.1f} sys). "
            + (f"{reused:,} requests reused a token (the runs outlasted the tokens signed for them)." if reused else
               "No token was sent twice.")
        )
        lines.append("")
    lines.extend(chart_goals_runs(
        res, f"![Gateway benchmark: throughput against the nginx proxy, CPU per request, p99 added latency]({chart_name})",
        "keygate against the plain nginx proxy, on this machine", verdicts(s)))
    return "\n".join(wrap_prose(lines))


def chart_goals_runs(res: dict, image: str, whom: str, goals: list[tuple[str, bool, str]]) -> list[str]:
    """The end of a section: the chart, the goals met or not, every run."""
    lines = [image, "", f"**Goals** ({whom}):", ""]
    lines.extend(f"- {goal}: **{'met' if ok else 'not met'}**, {detail}." for goal, ok, detail in goals)
    lines.append("")
    return lines + every_run(res)


def tls_verdicts(s: dict) -> list[tuple[str, bool, str]]:
    """Issue 13's goals for each pair: throughput at least its nginx's, CPU per request at most."""
    out = []
    for n, k in TLS_PAIRS:
        a, b = s[k], s[n]
        what = LABELS[k].split(", ", 1)[1]
        out.append((
            f"{what}: throughput at least nginx's (ratio ≥ 1.0)",
            a["vs_nginx"] >= 1.0,
            f"ratio {a['vs_nginx']:.2f} (rounds {a['vs_nginx_range'][0]:.2f}–{a['vs_nginx_range'][1]:.2f}); "
            f"{fmt_int(a['rps'])} against {fmt_int(b['rps'])} req/s",
        ))
        out.append((
            f"{what}: CPU time per request at most nginx's",
            a["cpu_us_per_req"] <= b["cpu_us_per_req"],
            f"{a['cpu_us_per_req']:.1f} µs against {b['cpu_us_per_req']:.1f} µs "
            f"({a['cpu_us_per_req'] / b['cpu_us_per_req']:.2f}×)",
        ))
    return out


def shared_verdicts(s: dict, facts: dict) -> list[tuple[str, bool, str]]:
    """Issue 14's goal for one node: shared limits cost at most 10% of the throughput; and the
    checks that make the comparison mean something."""
    r, k = s["keygate-redis"], s["keygate"]
    after = facts.get("shared", {}).get("after", {})
    ra = after.get("keygate-redis", {})
    refused = sum(after.get(v, {}).get("limiter_refused", 0) for v in VARIANTS)
    return [
        (
            "Throughput with rate limits shared on Redis at least 0.9× local limits",
            r["vs_keygate"] >= 0.9,
            f"ratio {r['vs_keygate']:.2f} (rounds {r['vs_keygate_range'][0]:.2f}–{r['vs_keygate_range'][1]:.2f}); "
            f"{fmt_int(r['rps'])} against {fmt_int(k['rps'])} req/s",
        ),
        (
            "keygate-redis used Redis (`keygate_shared_limits_up` 1 at the end, calls > 0)",
            ra.get("up") == 1 and ra.get("calls", 0) > 0,
            f"up {ra.get('up', float('nan')):.0f}, {fmt_int(ra.get('calls', 0))} calls over the whole run "
            f"({fmt_int(ra.get('failures', 0))} of them failed or timed out)",
        ),
        (
            "The tokens' rate limit was checked on every admitted request and never refused one",
            refused == 0 and all(after.get(v, {}).get("limiter_allowed", 0) > 0 for v in VARIANTS),
            "; ".join(f"{v}: {fmt_int(after.get(v, {}).get('limiter_allowed', 0))} allowed, "
                      f"{fmt_int(after.get(v, {}).get('limiter_refused', 0))} refused" for v in VARIANTS),
        ),
    ]


def markdown_shared(res: dict) -> str:
    f, p, s = res["facts"], res["params"], res["summary"]
    sh = f.get("shared", {})
    lines = run_header(res, f"{f['wrk']}, {f['h2load']}, Redis {sh.get('redis_version', '?')}",
                       f.get("command", "python3 bench/gateway.py --suite shared"),
                       "Command (installs nginx, haproxy, wrk and nghttp2-client if missing; builds keygate unless "
                       "`--keygate` names a binary; rewrites this part of the page; needs `redis-cli` and a Redis):")
    lines.append(
        f"Setup: two keygate processes of the same binary, each with **{p['workers']} gateway threads**, on copies "
        f"of the same data directory (same {p['tokens']:,} tokens, same pepper), in front of one upstream, an nginx "
        f"with {p['upstream_workers']} worker answering `return 200 \"ok\"`. *keygate* has the plain suite's "
        f"configuration (rate limits counted in the node); *keygate-redis* the same plus `[redis]` with `url = "
        f"\"{p['redis_url']}\"` and `key_prefix = \"{sh.get('redis_prefix', 'kgbench-…')}\"` (`wait_ms` at its "
        f"default). Every token carries the bench's rate limit, 1,000,000 requests per second with no burst, which "
        f"never fires: each request is checked against it (locally, or against the token's GCRA bucket in Redis "
        f"through a lease of 256 requests). Throughput: `wrk -t{p['wrk_threads']} -c{p['connections']}`, "
        f"{p['rounds']} rounds of {p['seconds']} s per variant, interleaved (the order alternates each round) after "
        f"one {p['warmup']} s warm-up per variant; every request carries a bearer token drawn at random from "
        f"{p['tokens']:,} ({p['invalid']:,} of them revoked, so refused with 401). Latency: `h2load --h1 "
        f"-c{p['latency_clients']} --rps` at a fixed **{res['rates']['keygate']:,} req/s** "
        f"({p['latency_fraction']:g} of keygate's median), {p['latency_rounds']} rounds of {p['latency_seconds']} s, "
        f"first second dropped, one valid token per round. CPU per request: utime + stime of all the process's "
        f"threads from `/proc/PID/stat` over the run, divided by the requests wrk completed; the Redis server's "
        f"(on the same machine, the same 2 cores) is counted the same way, apart. Figures are medians "
        f"over rounds; ratios are medians of the per-round ratios."
    )
    lines.append("")
    lines.append("| variant | req/s | × keygate (rounds) | CPU µs/req (user + sys) | Redis server CPU µs/req | "
                 "peak RSS MiB | non-2xx | p50 / p99 ms at fixed rate | Redis calls per 1,000 requests |")
    lines.append("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for v in VARIANTS:
        r = s[v]
        ratio = "1.00" if v == "keygate" else (
            f"**{r['vs_keygate']:.2f}** ({r['vs_keygate_range'][0]:.2f}–{r['vs_keygate_range'][1]:.2f})")
        calls = f"{r['shared_calls_per_1000']:.1f}" if "shared" in r else "—"
        lines.append(
            f"| {LABELS[v]} | {fmt_int(r['rps'])} | {ratio} | {r['cpu_us_per_req']:.1f} ({r['user_us_per_req']:.1f} + "
            f"{r['sys_us_per_req']:.1f}) | {r.get('redis_cpu_us_per_req', float('nan')):.1f} | "
            f"{r['peak_rss_mib']:.1f} | {100 * r['non_2xx_share']:.1f}% | "
            f"{r['lat_p50_ms']:.2f} / {r['lat_p99_ms']:.2f} | {calls} |"
        )
    lines.append("")
    r = s["keygate-redis"]
    c = r.get("shared", {})
    reqs = sum(x["requests"] for x in res["throughput"]["keygate-redis"])
    w = sh.get("warmup", {}).get("keygate-redis", {})
    lat_c = {k: sum(x.get("shared", {}).get(k, 0) for x in res["latency"]["keygate-redis"]) for k in SHARED_COUNTERS}
    lines.append(
        f"keygate-redis's counters (`/metrics` on its admin listener, read before and after each run): over the "
        f"{p['rounds']} measured runs, {fmt_int(reqs)} requests made {fmt_int(c.get('calls', 0))} calls to Redis "
        f"(`keygate_shared_limits_calls_total`), {fmt_int(c.get('waits', 0))} requests waited for a lease "
        f"(`…_waits_total`), {fmt_int(c.get('local', 0))} were decided locally (`…_local_decisions_total`) and "
        f"{fmt_int(c.get('failures', 0))} calls failed. During its warm-up: {fmt_int(w.get('calls', 0))} calls, "
        f"{fmt_int(w.get('waits', 0))} waits, {fmt_int(w.get('local', 0))} local decisions. During the fixed-rate "
        f"runs (one token each): {fmt_int(lat_c['calls'])} calls, {fmt_int(lat_c['waits'])} waits, "
        f"{fmt_int(lat_c['local'])} local decisions."
    )
    lines.append("")
    after = sh.get("after", {})
    if after:
        ra = after.get("keygate-redis", {})
        lines.append(
            "At the end of the run: " + "; ".join(
                f"{v} counted {fmt_int(a['limiter_allowed'])} limiter decisions `allowed` and "
                f"{fmt_int(a['limiter_refused'])} `refused` ({fmt_int(a['rate_limited'])} refusals `rate_limited`)"
                for v, a in after.items())
            + f". keygate-redis: `keygate_shared_limits_up` {ra.get('up', float('nan')):.0f}, "
            f"`…_nodes` {ra.get('nodes', float('nan')):.0f}, `…_leases` {fmt_int(ra.get('leases', 0))}, "
            f"`…_calls_total` {fmt_int(ra.get('calls', 0))}, `…_waits_total` {fmt_int(ra.get('waits', 0))}, "
            f"`…_local_decisions_total` {fmt_int(ra.get('local', 0))}, `…_failures_total` "
            f"{fmt_int(ra.get('failures', 0))}; {fmt_int(ra.get('redis_keys', 0))} of its keys in Redis."
        )
        lines.append("")
    fields = sh.get("ratelimit_fields", {})
    if fields:
        lines.append("The answer to a valid token, before the rounds: " + "; ".join(
            f"{v}: " + ", ".join(f"`{k}: {x}`" for k, x in fl.items()) for v, fl in fields.items()) + ".")
        lines.append("")
    lines.append(side_costs(s, "wrk"))
    lines.append("")
    lines.append("**Goals** (issue 14, one node, on this machine):")
    lines.append("")
    lines.extend(f"- {goal}: **{'met' if ok else 'not met'}**, {detail}." for goal, ok, detail in shared_verdicts(s, f))
    lines.append("")
    lines.extend(["<details><summary>Every run</summary>", "",
                  "| phase | round | variant | req/s | CPU µs/req | Redis CPU µs/req | non-2xx | p50 ms | p99 ms | "
                  "Redis calls | waits | local | failed calls |",
                  "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"])

    def counts(r: dict) -> str:
        sc = r.get("shared")
        return " | ".join(fmt_int(sc[k]) for k in ("calls", "waits", "local", "failures")) if sc else "— | — | — | —"

    def redis_cpu(r: dict) -> str:
        return f"{r['redis_cpu_us_per_req']:.1f}" if "redis_cpu_us_per_req" in r else ""

    for rnd in range(p["rounds"]):
        for v in VARIANTS:
            r = res["throughput"][v][rnd]
            lines.append(f"| wrk | {rnd + 1} | {v} | {fmt_int(r['rps'])} | {r['cpu_us_per_req']:.1f} | {redis_cpu(r)} | "
                         f"{r['non_2xx']} | {ms(r['p50_us'])} | {ms(r['p99_us'])} | {counts(r)} |")
    for rnd in range(p["latency_rounds"]):
        for v in VARIANTS:
            r = res["latency"][v][rnd]
            lines.append(f"| h2load | {rnd + 1} | {v} | {fmt_int(r['achieved_rps'])} | | {redis_cpu(r)} | "
                         f"{r['non_2xx']} | {ms(r['p50_us'])} | {ms(r['p99_us'])} | {counts(r)} |")
    lines.extend(["", "</details>"])
    return "\n".join(wrap_prose(lines))


def markdown_tls(res: dict, chart_name: str) -> str:
    f, p, s = res["facts"], res["params"], res["summary"]
    tls = f.get("tls", {})
    lines = run_header(res, f"{f['nginx']} ({f.get('openssl', 'OpenSSL')}), {f['wrk']}, {f['h2load']}",
                       "python3 bench/gateway.py --suite tls")
    lines.append(
        f"Setup: every proxy has **{p['workers']} workers** (nginx `worker_processes`, keygate `gateway.threads`) in "
        f"front of one upstream, an nginx with {p['upstream_workers']} worker answering `return 200 \"ok\"` on a "
        f"plain port and on a TLS port. The script makes a CA and one server certificate (ECDSA P-256, for "
        f"`localhost` and 127.0.0.1) that every TLS listener serves, nginx's and keygate's alike; both sides keep "
        f"their TLS defaults but for the protocol versions, set on nginx to `TLSv1.2 TLSv1.3` (`ssl_protocols`, "
        f"`proxy_ssl_protocols`) as rustls offers them, since nginx 1.22 leaves TLS 1.3 out by default "
        f"(nginx: `ssl_session_cache shared`; keygate: {f.get('rustls', 'rustls')}). Three pairs, each keygate variant against the nginx next to it, all six "
        f"interleaved (the order rotates and reverses each round), {p['rounds']} rounds of {p['seconds']} s after "
        f"one {p['warmup']} s warm-up per variant:"
    )
    lines.append("")
    lines.append(
        f"- **TLS on the listener**: `wrk -t{p['wrk_threads']} -c{p['connections']}` over HTTPS (HTTP/1.1 by ALPN), "
        f"plain HTTP/1.1 to the upstream. wrk keeps its connections open, so each of the {p['connections']} "
        f"connections makes one handshake per run: this measures the record layer (encryption), not handshakes."
    )
    lines.append(
        f"- **`https://` upstream**: `wrk` over plain HTTP to the proxy, TLS from the proxy to the upstream's TLS "
        f"port, kept alive and pooled. Both verify the upstream's certificate against the run's CA under the name "
        f"`localhost` (keygate: `tls_ca_file`, `tls_server_name`; nginx: `proxy_ssl_verify on`, "
        f"`proxy_ssl_trusted_certificate`, `proxy_ssl_name`, `proxy_ssl_server_name on`, "
        f"`proxy_ssl_session_reuse on`, `keepalive 256`)."
    )
    lines.append(
        f"- **HTTP/2 clients**: `h2load -t{p['wrk_threads']} -c{p['h2_clients']} -m{p['h2_streams']}` "
        f"({p['h2_clients'] * p['h2_streams']} streams in flight) over TLS with ALPN h2, on the same TLS listeners "
        f"(nginx `listen … ssl http2`), plain HTTP/1.1 to the upstream. h2load sends one set of headers, so each "
        f"h2load run carries one valid token (a different one each run), where wrk draws a token per request."
    )
    lines.append("")
    lines.append(
        f"With wrk every request carries a bearer token drawn at random from {p['tokens']:,} ({p['invalid']:,} of "
        f"them revoked, so refused by keygate with 401; nginx does not check tokens and answers them 200). "
        f"Latency: `h2load -c{p['latency_clients']} --rps` (`--h1` except for the HTTP/2 pair) at a fixed rate, "
        f"{p['latency_fraction']:g} of the pair's nginx median throughput, {p['latency_rounds']} rounds of "
        f"{p['latency_seconds']} s, first second dropped. CPU per request: utime + stime of all the proxy's "
        f"processes and threads from `/proc/PID/stat` over the measured run, divided by the requests completed. "
        f"Figures are medians over rounds; ratios are medians of the per-round ratios."
    )
    lines.append("")
    lines.append("| variant | req/s | × its nginx (rounds) | CPU µs/req (user + sys) | peak RSS MiB | non-2xx | "
                 "fixed rate req/s | p50 / p99 ms at fixed rate |")
    lines.append("|---|---:|---:|---:|---:|---:|---:|---:|")
    for v in VARIANTS:
        r = s[v]
        ratio = "1.00" if v == reference(v) else (
            f"**{r['vs_nginx']:.2f}** ({r['vs_nginx_range'][0]:.2f}–{r['vs_nginx_range'][1]:.2f})")
        lines.append(
            f"| {LABELS[v]} | {fmt_int(r['rps'])} | {ratio} | {r['cpu_us_per_req']:.1f} ({r['user_us_per_req']:.1f} + "
            f"{r['sys_us_per_req']:.1f}) | {r['peak_rss_mib']:.1f} | {100 * r['non_2xx_share']:.1f}% | "
            f"{fmt_int(res['rates'][v])} | {r['lat_p50_ms']:.2f} / {r['lat_p99_ms']:.2f} |"
        )
    lines.append("")
    lines.append("What each TLS leg negotiated: the client leg as `openssl s_client` with OpenSSL's defaults (those "
                 "wrk uses) saw it, or, for the HTTP/2 pair, as h2load reported it (h2load puts AES-128-GCM first in "
                 "its TLS 1.3 suites); the upstream leg as the upstream nginx saw it, its `$ssl_protocol "
                 "$ssl_cipher, $ssl_curve, reused=$ssl_session_reused` fetched through the proxy. In TLS 1.3 both "
                 "servers follow the client's order of preference, so each pair runs the same suite:")
    lines.append("")
    for v in VARIANTS:
        for leg, text in tls.get(v, {}).items():
            name = "client → proxy" if leg == "client" else "proxy → upstream"
            lines.append(f"- {LABELS[v]}, {name}: {text}")
    lines.append("")
    lines.append(side_costs(s, "the load generator"))
    lines.append("")
    lines.extend(chart_goals_runs(
        res, f"![Gateway over TLS and HTTP/2: throughput against its nginx, CPU per request, p99]({chart_name})",
        "issue 13; each keygate variant against the nginx of its pair, on this machine", tls_verdicts(s)))
    return "\n".join(wrap_prose(lines))


def wrap_prose(lines: list[str], width: int = 100) -> list[str]:
    """Wraps paragraphs and list items at `width`; tables, code, HTML and images stay as they are."""
    out, code = [], False
    for line in lines:
        if line.startswith("```"):
            code = not code
        if code or not line or line[0] in "|<!`" or line.startswith("```"):
            out.append(line)
        elif line.startswith("- "):
            out.extend(textwrap.wrap(line, width, subsequent_indent="  ", break_on_hyphens=False,
                                     break_long_words=False))
        else:
            out.extend(textwrap.wrap(line, width, break_on_hyphens=False, break_long_words=False))
    return out


SHORT = {
    "direct": "direct",
    "nginx": "nginx proxy",
    "nginx-keys": "nginx + keys + limit_req",
    "haproxy": "HAProxy + keys + stick table",
    "keygate": "keygate",
    "keygate-jwt": "keygate, JWT",
    "baseline": "baseline",
    "nginx-tls": "nginx TLS",
    "keygate-tls": "keygate TLS",
    "nginx-https-up": "nginx → https",
    "keygate-https-up": "keygate → https",
    "nginx-h2": "nginx h2",
    "keygate-h2": "keygate h2",
}


def svg_chart(res: dict) -> str:
    """Three bar panels: throughput relative to the nginx proxy, CPU per request (user solid,
    kernel pale), p99 added latency. The dashed line in each is the plain nginx proxy."""
    s = res["summary"]
    tls = res["params"].get("suite") == "tls"
    panels = [
        ("Throughput × nginx proxy (higher is better)", "vs_nginx", "{:.2f}"),
        ("CPU µs per request (lower is better)", "cpu_us_per_req", "{:.1f}"),
        (f"p99 added ms at {res['rate']:,} req/s (lower is better)", "lat_added_p99_ms", "{:.2f}"),
    ] if not tls else [
        ("Throughput × its nginx (higher is better)", "vs_nginx", "{:.2f}"),
        ("CPU µs per request (lower is better)", "cpu_us_per_req", "{:.1f}"),
        ("p99 ms at half its nginx's max (lower is better)", "lat_p99_ms", "{:.2f}"),
    ]
    title = (f"keygate against nginx over TLS and HTTP/2: {res['facts']['cores']} cores, medians of "
             f"{res['params']['rounds']} interleaved rounds") if tls else (
             f"keygate against nginx and HAProxy: {res['facts']['cores']} cores, medians of "
             f"{res['params']['rounds']} interleaved rounds")
    W, H, pw, gap, top, base = 1020, 340, 300, 35, 55, 255
    out = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" viewBox="0 0 {W} {H}" '
        'font-family="Helvetica, Arial, sans-serif" font-size="12">',
        f'<rect width="{W}" height="{H}" fill="#ffffff"/>',
        f'<text x="{W / 2}" y="22" text-anchor="middle" font-size="15" font-weight="bold">{esc(title)}</text>',
    ]
    for pi, (title, key, fmt) in enumerate(panels):
        x0 = 20 + pi * (pw + gap)
        out.append(f'<text x="{x0 + pw / 2}" y="{top - 14}" text-anchor="middle" font-weight="bold">{esc(title)}</text>')
        shown = [v for v in VARIANTS if not (key == "lat_added_p99_ms" and v == "direct")]
        values = {v: s[v][key] for v in VARIANTS}
        hi = max(max(values[v] for v in shown), 0.0) * 1.15 or 1.0
        lo = min(min(values[v] for v in shown), 0.0) * 1.15
        scale = (base - top) / (hi - lo)
        zero = top + hi * scale
        bw = (pw - 10) / len(VARIANTS)
        for i, v in enumerate(VARIANTS):
            cx = x0 + 5 + i * bw
            val = values[v]
            if v not in shown:
                out.append(f'<text x="{cx + bw / 2:.1f}" y="{zero - 4:.1f}" text-anchor="middle" fill="#777">n/a</text>')
                continue
            h = abs(val) * scale
            y = zero - h if val >= 0 else zero
            tip = f"{LABELS[v]}: {fmt.format(val)}"
            if key == "cpu_us_per_req":
                user = s[v]["user_us_per_req"] / max(1e-9, s[v]["user_us_per_req"] + s[v]["sys_us_per_req"]) * h
                out.append(f'<rect x="{cx + 4:.1f}" y="{y:.1f}" width="{bw - 8:.1f}" height="{h - user:.1f}" '
                           f'fill="{COLORS[v]}" fill-opacity="0.4"><title>{esc(tip)}</title></rect>')
                out.append(f'<rect x="{cx + 4:.1f}" y="{y + h - user:.1f}" width="{bw - 8:.1f}" height="{user:.1f}" '
                           f'fill="{COLORS[v]}"><title>{esc(tip)}</title></rect>')
            else:
                out.append(f'<rect x="{cx + 4:.1f}" y="{y:.1f}" width="{bw - 8:.1f}" height="{max(h, 0.5):.1f}" '
                           f'fill="{COLORS[v]}"><title>{esc(tip)}</title></rect>')
            ty = y - 4 if val >= 0 else y + h + 13
            out.append(f'<text x="{cx + bw / 2:.1f}" y="{ty:.1f}" text-anchor="middle">{fmt.format(val)}</text>')
        out.append(f'<line x1="{x0}" y1="{zero:.1f}" x2="{x0 + pw}" y2="{zero:.1f}" stroke="#333"/>')
        # The dashed line: the plain nginx proxy; in the TLS suite, a ratio of 1 to its nginx.
        line = values.get("nginx", 1.0 if key == "vs_nginx" else None)
        if line is not None:
            ry = zero - line * scale
            out.append(f'<line x1="{x0}" y1="{ry:.1f}" x2="{x0 + pw}" y2="{ry:.1f}" stroke="#2e7d32" '
                       'stroke-dasharray="4 3"/>')
    lx = 20
    for v in VARIANTS:
        out.append(f'<rect x="{lx}" y="{H - 52}" width="12" height="12" fill="{COLORS[v]}"/>')
        out.append(f'<text x="{lx + 17}" y="{H - 42}">{esc(SHORT[v])}</text>')
        lx += 17 + 6.8 * len(SHORT[v]) + 26
    dashed = "a ratio of 1 to the nginx of the pair" if tls else "the plain nginx proxy"
    out.append(f'<text x="20" y="{H - 14}" fill="#555">Dashed line: {dashed}. CPU bars: solid is user '
               f"time, pale is kernel time. Generated by bench/gateway.py on {esc(res['facts']['date'])}.</text>")
    out.append("</svg>")
    return "\n".join(out) + "\n"


def esc(t: str) -> str:
    return t.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


SECTION_TITLE = "## Gateway: keygate against nginx and HAProxy"


TLS_SECTION_TITLE = "## Gateway over TLS and HTTP/2: keygate against nginx (issue 13)"


SHARED_SECTION_TITLE = "## Shared rate limits on Redis, several nodes, start-up (issue 14)"


def update_doc(doc: Path, generated: str, begin: str = BEGIN, end: str = END, title: str = SECTION_TITLE) -> None:
    """Replaces what is between the section's markers, or, the first time, the section titled
    `title` (appended at the end of the page if there is none)."""
    block = f"{begin}\n\n{generated}\n\n{end}"
    text = doc.read_text() if doc.exists() else "# Benchmarks\n"
    if begin in text and end in text:
        a, rest = text.split(begin, 1)
        _, b = rest.split(end, 1)
        text = a + block + b
    else:
        lines = text.splitlines(keepends=True)
        start = next((i for i, l in enumerate(lines) if l.rstrip("\n") == title), None)
        section = f"{title}\n\n{block}\n"
        if start is None:
            text = text.rstrip("\n") + "\n\n" + section
        else:
            end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("## ")), len(lines))
            tail = "".join(lines[end:])
            text = "".join(lines[:start]) + section + ("\n" + tail if tail else "")
    doc.write_text(text)


def print_table(res: dict) -> None:
    s = res["summary"]
    print()
    ref = "×kg" if res["params"].get("suite") == "shared" else "×nginx"
    print(f"{'variant':<16} {'req/s':>9} {ref:>7} {'×direct':>8} {'cpu µs':>7} {'rss MiB':>8} "
          f"{'non2xx':>7} {'p99 ms':>7} {'added':>7}")
    for v in VARIANTS:
        r = s[v]
        print(f"{v:<16} {r['rps']:>9,.0f} {r['vs_nginx']:>7.2f} {r['vs_direct']:>8.2f} {r['cpu_us_per_req']:>7.1f} "
              f"{r['peak_rss_mib']:>8.1f} {100 * r['non_2xx_share']:>6.1f}% {r['lat_p99_ms']:>7.2f} "
              f"{r['lat_added_p99_ms']:>+7.2f}")
    print()
    suite = res["params"].get("suite")
    goals = tls_verdicts(s) if suite == "tls" else shared_verdicts(s, res["facts"]) if suite == "shared" else verdicts(s)
    for goal, ok, detail in goals:
        print(f"{'MET    ' if ok else 'NOT MET'}  {goal}: {detail}")
    for r in res.get("fresh") or []:
        print(f"fresh JWTs, run {r['round']}: {r['rps']:,.0f} req/s, {r['cpu_us_per_req']:.1f} µs CPU/req")
    print()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--suite", choices=sorted(SUITES), default="plain",
                    help="plain: HTTP/1.1 against nginx, HAProxy (default); tls: TLS listener, https:// upstream "
                         "and HTTP/2 clients, each against nginx; shared: rate limits on Redis against local ones")
    ap.add_argument("--redis-url", default="redis://127.0.0.1:6379",
                    help="the Redis of --suite shared (default redis://127.0.0.1:6379)")
    ap.add_argument("--rounds", type=int, default=7, help="throughput rounds (default 7)")
    ap.add_argument("--seconds", type=int, default=10, help="seconds per throughput run (default 10)")
    ap.add_argument("--warmup", type=int, default=3, help="warm-up seconds per variant (default 3)")
    ap.add_argument("--workers", type=int, default=2, help="proxy workers/threads (default 2)")
    ap.add_argument("--upstream-workers", type=int, default=1, help="upstream nginx workers (default 1)")
    ap.add_argument("--wrk-threads", type=int, default=2)
    ap.add_argument("--connections", type=int, default=64)
    ap.add_argument("--tokens", type=int, default=10_000, help="tokens created in keygate (default 10000)")
    ap.add_argument("--invalid", type=int, default=500, help="of those, revoked and still sent (default 500)")
    ap.add_argument("--h2-clients", type=int, default=16, help="h2load connections of the HTTP/2 pair (default 16)")
    ap.add_argument("--h2-streams", type=int, default=4, help="h2load streams per connection (default 4)")
    ap.add_argument("--latency-rounds", type=int, default=4)
    ap.add_argument("--latency-seconds", type=int, default=8)
    ap.add_argument("--latency-clients", type=int, default=16)
    ap.add_argument("--latency-fraction", type=float, default=0.5)
    ap.add_argument("--base-port", type=int, default=28180, help="eighteen ports from here (default 28180)")
    ap.add_argument("--workdir", default="/tmp/keygate-bench", help="configs, logs and raw output")
    ap.add_argument("--doc", default=str(ROOT / "docs" / "benchmarks.md"))
    ap.add_argument("--no-doc", action="store_true", help="print only; leave docs/ alone")
    ap.add_argument("--no-install", action="store_true")
    ap.add_argument("--no-build", action="store_true", help="use target/release/keygate as it is")
    ap.add_argument("--keygate", metavar="PATH", help="a keygate binary to use instead of building one")
    ap.add_argument("--skip", metavar="LIST",
                    help="variants to leave out (nginx-keys,haproxy,keygate-jwt); implies --no-doc")
    ap.add_argument("--jwts", type=int, default=1000, help="JWTs minted for keygate-jwt (default 1000)")
    ap.add_argument("--fresh-rounds", type=int, default=3, help="runs of keygate-jwt-new (default 3; 0: none)")
    ap.add_argument("--fresh-seconds", type=int, default=3, help="seconds per keygate-jwt-new run (default 3)")
    ap.add_argument("--fresh-tokens", type=int, default=150_000,
                    help="never-seen JWTs signed per keygate-jwt-new run (default 150000)")
    ap.add_argument("--baseline", metavar="PATH",
                    help="another keygate binary, run as the variant 'baseline' on the same tokens (an A/B); implies --no-doc")
    ap.add_argument("--baseline-config", metavar="TOML", default="",
                    help="TOML appended to the baseline variant's configuration (with --baseline; the same binary with "
                         "a feature off measures what the feature costs, e.g. '[call_log]\\nenabled = false')")
    ap.add_argument("--baseline-public", action="store_true",
                    help="make the baseline's route public (no token is checked; with --baseline): keygate's proxying "
                         "alone, so that the difference to keygate is what checking, limiting and counting the token costs")
    ap.add_argument("--app-limits", action="store_true",
                    help="give the tokens' app a shared rate limit and quota that never fire (issue 17): every "
                         "request also takes from the app's bucket and counts in its quota (every keygate variant)")
    ap.add_argument("--deny", type=int, default=0, metavar="N",
                    help="put N CIDRs that match no client (of several prefix lengths) in the keygate variant's "
                         "[gateway] deny (issue 17); the baseline variant has none")
    ap.add_argument("--from-results", metavar="JSON", help="rewrite the page and chart from a saved results.json")
    ap.add_argument("--smoke", action="store_true", help="a short run that checks the pieces; implies --no-doc")
    ap.add_argument("--profile", type=int, default=0, metavar="SECONDS",
                    help="after the run, perf-record keygate under load for this long")
    ap.add_argument("--profile-system", type=int, default=0, metavar="SECONDS",
                    help="after the run, perf-record the whole machine under each proxy in turn for this long "
                         "and give µs a request by role (wrk, proxy, upstream) and function")
    args = ap.parse_args()
    if args.smoke:
        args.rounds, args.seconds, args.warmup = 1, 2, 1
        args.latency_rounds, args.latency_seconds = 1, 3
        args.tokens, args.invalid = min(args.tokens, 200), min(args.invalid, 10)
        args.jwts, args.fresh_tokens = min(args.jwts, 20), min(args.fresh_tokens, 5_000)
        args.fresh_rounds, args.fresh_seconds = min(args.fresh_rounds, 1), 1
        args.no_doc = True

    if args.from_results:
        args.suite = json.loads(Path(args.from_results).read_text())["params"].get("suite", "plain")
    VARIANTS[:] = SUITES[args.suite]
    if args.suite == "shared":
        REFERENCE.update(SHARED_REFERENCE)
        if shutil.which("redis-cli") is None:
            sys.exit("--suite shared needs redis-cli (Debian: redis-tools) and a Redis at --redis-url")
    if args.suite != "plain" and (args.baseline or args.skip or args.profile or args.profile_system):
        sys.exit("--baseline, --skip, --profile and --profile-system go with --suite plain only")
    if args.baseline_public and not args.baseline:
        sys.exit("--baseline-public goes with --baseline")
    if args.baseline:
        VARIANTS.append("baseline")
        args.no_doc = True
    if args.skip:
        for v in args.skip.split(","):
            if v in ("direct", "nginx", "keygate") or v not in VARIANTS:
                sys.exit(f"--skip {v}: only nginx-keys, haproxy and keygate-jwt can be left out (the ratios need the others)")
            VARIANTS.remove(v)
        args.no_doc = True

    if args.from_results:
        # Only the report: the table, the chart and the page, from a saved results.json.
        res = json.loads(Path(args.from_results).read_text())
        res["summary"] = summarize(res["throughput"], res["latency"])
    else:
        ensure_tools(not args.no_install, args.profile > 0 or args.profile_system > 0)
        binary = build_keygate(args.no_build, args.keygate)
        atexit.register(PROCS.stop_all)
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            signal.signal(sig, lambda *_: sys.exit(130))
        bench = Bench(args)
        # Last in, first out: keygate-redis stops before its keys are deleted.
        atexit.register(bench.cleanup_redis)
        atexit.register(PROCS.stop_all)
        res = bench.run(binary)
        res["facts"]["command"] = "python3 bench/gateway.py " + " ".join(sys.argv[1:])
        (bench.dir / "results.json").write_text(json.dumps(res, indent=1))
        print_table(res)
        if args.profile:
            bench.profile(args.profile)
        if args.profile_system:
            bench.system_profile(args.profile_system)
        PROCS.stop_all()
        bench.cleanup_redis()
        log(f"raw output and results.json in {bench.dir}")

    if not args.no_doc:
        doc = Path(args.doc)
        if args.suite == "shared":
            update_doc(doc, markdown_shared(res), SHARED_BEGIN, SHARED_END, SHARED_SECTION_TITLE)
            log(f"wrote {doc}")
            return
        if args.suite == "tls":
            chart = doc.parent / "benchmarks-gateway-tls.svg"
            chart.write_text(svg_chart(res))
            update_doc(doc, markdown_tls(res, chart.name), TLS_BEGIN, TLS_END, TLS_SECTION_TITLE)
        else:
            chart = doc.parent / "benchmarks-gateway.svg"
            chart.write_text(svg_chart(res))
            update_doc(doc, markdown(res, chart.name))
        log(f"wrote {doc} and {chart}")


if __name__ == "__main__":
    main()
