#!/usr/bin/env python3
"""keygate's multi-node harness (issue 14): three real `keygate serve` processes on loopback ports.

Started by scripts/cluster-test, which builds the binary and gives this program a temporary
directory. Python's standard library only. Two phases, each with three nodes that share one
pepper, one PostgreSQL database and one Redis key prefix:

  A. the machine's PostgreSQL (a database of our own, dropped at the end) and the machine's Redis
     (a key prefix of our own, its keys deleted at the end):
       sigkill   one node killed with SIGKILL, a token revoked meanwhile, the node restarted (same
                 configuration and data directory): it refuses the token from its first request
                 (first, so that the rest runs on a cluster with a restarted node)
       limiter   a rate limit (and a quota) driven concurrently through the three gateways:
                 admitted <= 1.02 x the GCRA ideal (capacity + refill over the elapsed time)
                 plus the requests a node decided alone (Redis later than redis.wait_ms)
       revoke    >= 200 revocations made on the nodes in turn under steady traffic; for each,
                 pollers on the two other gateways time the admin call to the first 401
                 (p50/p99/max reported; failure only if a node still admits after 10 s)
     then every node stopped with SIGTERM (which writes usage), one started again, and the usage
     of every token read back and compared with the answers counted here (short by at most what
     the SIGKILLed node answered before it died: a crash loses its unwritten minute, by design).
  B. a throwaway PostgreSQL (initdb + pg_ctl on a free port) and a throwaway redis-server (a free
     port), both of which this phase stops and starts:
       redis     Redis stopped: nodes keep serving, each enforces its share, the metrics say
                 keygate_shared_limits_up 0; started: back to 1, no refusals meanwhile, limits
                 shared again
       slow-redis  Redis behind a delay line in this program: 50 ms away (ten times redis.wait_ms),
                 then partitioned (bytes held 5 s), then healed: requests keep being answered, a
                 limit admits at most the limit plus each node's share (decided alone after
                 wait_ms), each node its share while cut off, shared again after the heal
       postgres  PostgreSQL stopped: gateways keep serving, the admin API answers 503
                 store_unavailable; started: a revocation reaches every node
     then the same usage comparison, exact.

Knobs (environment): CLUSTER_TEST_SECONDS (180), CLUSTER_SCENARIOS (a comma-separated subset),
CLUSTER_REVOCATIONS (201), CLUSTER_LOAD_RPS (300, the steady load of `revoke`),
CLUSTER_REDIS_WAIT_MS (5, keygate's default redis.wait_ms), KEYGATE_TEST_POSTGRES_URL and
KEYGATE_TEST_REDIS_URL (the machine's servers); --help for the rest.

One line of figures per scenario ("cluster: <name>: ..."); exit status 1 if a property broke.
The whole run is bounded by --budget seconds (CLUSTER_TEST_SECONDS); every process started here is
stopped on exit, and its pid written to <work>/pids for the shell script's own clean-up.
"""

import argparse
import base64
import glob
import http.client
import json
import math
import os
import queue
import random
import shutil
import signal
import socket
import string
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
from concurrent.futures import ThreadPoolExecutor

T0 = time.monotonic()
METERED = (200, 429)  # answers given after the token was verified: counted in its usage


class Fail(Exception):
    """A broken property (or a harness step that could not be done)."""


class Budget(Exception):
    """CLUSTER_TEST_SECONDS ran out."""


def say(msg):
    print(f"[{time.monotonic() - T0:6.1f}s] {msg}", flush=True)


def figure(name, msg):
    print(f"cluster: {name}: {msg}", flush=True)


def rand(n, alphabet=string.ascii_lowercase + string.digits):
    r = random.SystemRandom()
    return "".join(r.choice(alphabet) for _ in range(n))


def free_ports(n):
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def pct(values, q):
    v = sorted(values)
    return v[int(round((len(v) - 1) * q))]


def wait_until(what, seconds, f, every=0.05):
    deadline = time.monotonic() + seconds
    while True:
        got = f()
        if got:
            return got
        if time.monotonic() > deadline:
            raise Fail(f"{what}: not within {seconds} s")
        time.sleep(every)


# --------------------------------------------------------------------------------------------
# HTTP: one keep-alive connection per thread and port.

_local = threading.local()


def http_call(port, method, path, headers=None, body=None, timeout=15.0, fresh=False):
    """(status, headers, body bytes); status -1 with the error text as body when the connection
    failed. A kept-alive connection the server had closed is retried once on a new one (the
    request never reached the server)."""
    conns = getattr(_local, "conns", None)
    if conns is None:
        conns = _local.conns = {}
    for attempt in range(2):
        conn = conns.get(port)
        reused = conn is not None and not fresh
        if conn is None or fresh:
            if conn is not None:
                conn.close()
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
            conns[port] = conn
        try:
            conn.request(method, path, body=body, headers=headers or {})
            resp = conn.getresponse()
            data = resp.read()
            if resp.getheader("connection", "").lower() == "close":
                conn.close()
                conns.pop(port, None)
            return resp.status, resp, data
        except (http.client.RemoteDisconnected, BrokenPipeError, ConnectionResetError) as e:
            conn.close()
            conns.pop(port, None)
            if reused and attempt == 0:
                continue
            return -1, None, str(e).encode()
        except (OSError, http.client.HTTPException) as e:
            conn.close()
            conns.pop(port, None)
            return -1, None, str(e).encode()
    return -1, None, b"unreachable"


def forget_connections():
    for c in getattr(_local, "conns", {}).values():
        c.close()
    _local.conns = {}


def gw_call(port, secret, fresh=False, timeout=15.0):
    status, _, _ = http_call(port, "GET", "/demo/echo", {"Authorization": f"Bearer {secret}"},
                             fresh=fresh, timeout=timeout)
    return status


# --------------------------------------------------------------------------------------------
# Redis: just enough RESP for PING, SCAN and UNLINK.

class Resp:
    def __init__(self, url):
        u = urllib.parse.urlparse(url)
        if u.scheme != "redis":
            raise Fail(f"the harness speaks plain redis:// only, not {u.scheme}://")
        self.sock = socket.create_connection((u.hostname or "127.0.0.1", u.port or 6379), timeout=5)
        self.f = self.sock.makefile("rb")
        if u.password:
            self.cmd("AUTH", *([urllib.parse.unquote(u.username)] if u.username else []),
                     urllib.parse.unquote(u.password))
        db = (u.path or "/").strip("/")
        if db:
            self.cmd("SELECT", db)

    def cmd(self, *args):
        out = [f"*{len(args)}\r\n".encode()]
        for a in args:
            b = str(a).encode()
            out.append(b"$%d\r\n%s\r\n" % (len(b), b))
        self.sock.sendall(b"".join(out))
        return self._read()

    def _read(self):
        line = self.f.readline().rstrip(b"\r\n")
        kind, rest = line[:1], line[1:]
        if kind == b"+":
            return rest.decode()
        if kind == b"-":
            raise Fail(f"redis: {rest.decode()}")
        if kind == b":":
            return int(rest)
        if kind == b"$":
            n = int(rest)
            if n < 0:
                return None
            data = self.f.read(n + 2)[:-2]
            return data.decode(errors="replace")
        if kind == b"*":
            n = int(rest)
            return None if n < 0 else [self._read() for _ in range(n)]
        raise Fail(f"redis: unexpected answer {line!r}")

    def keys(self, prefix):
        """Every key of keygate's under `prefix` (they look like `{<prefix>:<id>}:t`)."""
        cursor, found = "0", []
        while True:
            cursor, batch = self.cmd("SCAN", cursor, "MATCH", "{" + prefix + ":*", "COUNT", 1000)
            found.extend(batch)
            if cursor == "0":
                return found

    def close(self):
        self.sock.close()


# --------------------------------------------------------------------------------------------
# Processes.

class Harness:
    def __init__(self, args):
        self.args = args
        self.bin = args.keygate
        self.work = args.work
        self.pepper = base64.b64encode(os.urandom(32)).decode()
        self.procs = []  # every Popen started here, for clean-up
        self.cleanups = []  # callables, run last first
        self.failures = []
        self.scenarios_run = 0

    def track(self, proc):
        self.procs.append(proc)
        with open(os.path.join(self.work, "pids"), "a") as f:
            f.write(f"{proc.pid}\n")
        return proc

    def fail(self, scenario, msg):
        self.failures.append(f"{scenario}: {msg}")
        print(f"FAIL {scenario}: {msg}", file=sys.stderr, flush=True)

    def check(self, scenario, ok, msg):
        if not ok:
            self.fail(scenario, msg)
        return ok

    def cleanup(self):
        for p in self.procs:
            if p.poll() is None:
                try:
                    p.kill()
                    p.wait(timeout=10)
                except Exception:
                    pass
        while self.cleanups:
            f = self.cleanups.pop()
            try:
                f()
            except Exception as e:  # keep cleaning
                print(f"clean-up: {e}", file=sys.stderr)


def psql(url, sql):
    r = subprocess.run(["psql", url, "-v", "ON_ERROR_STOP=1", "-qAtc", sql], capture_output=True, text=True,
                       timeout=60)
    if r.returncode != 0:
        raise Fail(f"psql {sql!r}: {r.stderr.strip()}")
    return r.stdout.strip()


def with_database(url, name):
    u = urllib.parse.urlparse(url)
    return urllib.parse.urlunparse(u._replace(path="/" + name))


class OwnPostgres:
    """A PostgreSQL server in a directory of its own, on a free port; run as the `postgres` user
    when we are root (initdb refuses root). Never the machine's server."""

    def __init__(self, h):
        self.h = h
        bins = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
        if not bins:
            initdb = shutil.which("initdb")
            if not initdb:
                raise Fail("no initdb (PostgreSQL server binaries) found")
            bins = [initdb]
        self.bin = os.path.dirname(bins[-1])
        self.root = os.geteuid() == 0
        # Outside the work directory, which is private to root: the postgres user must reach it.
        self.dir = tempfile.mkdtemp(prefix="keygate-cluster-pg.")
        with open(os.path.join(h.work, "pgdir"), "w") as f:
            f.write(self.dir + "\n")
        h.cleanups.append(lambda: shutil.rmtree(self.dir, ignore_errors=True))
        if self.root:
            subprocess.run(["chown", "postgres", self.dir], check=True)
        self.data = os.path.join(self.dir, "data")
        self.port = free_ports(1)[0]
        self._run("initdb", "-D", self.data, "-A", "trust", "-U", "postgres")
        h.cleanups.append(self.kill)

    def _run(self, tool, *args, check=True):
        cmd = [os.path.join(self.bin, tool), *args]
        if self.root:
            cmd = ["runuser", "-u", "postgres", "--", *cmd]
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
        if check and r.returncode != 0:
            raise Fail(f"{tool} failed: {r.stderr.strip() or r.stdout.strip()}")
        return r

    def _ctl(self, *args, check=True):
        opts = f"-p {self.port} -k {self.dir} -c listen_addresses=127.0.0.1"
        return self._run("pg_ctl", "-D", self.data, "-l", os.path.join(self.dir, "log"), "-o", opts, "-w",
                         *args, check=check)

    def start(self):
        self._ctl("start")

    def stop(self):
        self._ctl("-m", "fast", "stop")

    def kill(self):
        if os.path.exists(os.path.join(self.data, "postmaster.pid")):
            self._ctl("-m", "immediate", "stop", check=False)

    def url(self):
        return f"postgres://postgres@127.0.0.1:{self.port}/postgres"


class OwnRedis:
    """A redis-server on a free port, keeping nothing on disk. Never the machine's server."""

    def __init__(self, h):
        self.h = h
        self.port = free_ports(1)[0]
        self.proc = None
        self.dir = os.path.join(h.work, "redis")
        os.makedirs(self.dir, exist_ok=True)

    def start(self):
        exe = shutil.which("redis-server")
        if not exe:
            raise Fail("redis-server is not installed")
        log = open(os.path.join(self.dir, "redis.log"), "ab")
        self.proc = self.h.track(subprocess.Popen(
            [exe, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
             "--dir", self.dir], stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL))
        log.close()

        def answers():
            try:
                r = Resp(self.url())
                ok = r.cmd("PING") == "PONG"
                r.close()
                return ok
            except (OSError, Fail):
                return False

        wait_until("redis-server answers", 10, answers)

    def stop(self):
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(timeout=10)

    def url(self):
        return f"redis://127.0.0.1:{self.port}"


class DelayLine:
    """A TCP relay between the nodes and a Redis that delays every byte by `delay` seconds each way
    (as a slow network would: in order, nothing lost, throughput kept). A long delay is a
    partition as TCP lives it: the bytes wait, and arrive when it heals. Threads, one listener."""

    def __init__(self, h, target_port):
        self.h, self.target = h, target_port
        self.delay = 0.0
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.port = self.sock.getsockname()[1]
        self.closed = threading.Event()
        self.conns = []
        threading.Thread(target=self._accept, daemon=True).start()

    def url(self):
        return f"redis://127.0.0.1:{self.port}"

    def _accept(self):
        while not self.closed.is_set():
            try:
                client, _ = self.sock.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(("127.0.0.1", self.target), timeout=5)
            except OSError:
                client.close()
                continue
            upstream.settimeout(None)
            self.conns += [client, upstream]
            for src, dst in ((client, upstream), (upstream, client)):
                q = queue.Queue()
                threading.Thread(target=self._read, args=(src, q), daemon=True).start()
                threading.Thread(target=self._write, args=(dst, q), daemon=True).start()

    def _read(self, src, q):
        while True:
            try:
                data = src.recv(65536)
            except OSError:
                data = b""
            q.put((time.monotonic() + self.delay, data))
            if not data:
                return

    def _write(self, dst, q):
        while True:
            due, data = q.get()
            while True:
                wait = min(due, time.monotonic() + self.delay) - time.monotonic() if self.delay else 0
                if wait <= 0:
                    break
                time.sleep(min(wait, 0.05))  # a shorter delay set meanwhile releases sooner
            if not data:
                try:
                    dst.shutdown(socket.SHUT_WR)
                except OSError:
                    pass
                return
            try:
                dst.sendall(data)
            except OSError:
                return

    def close(self):
        self.closed.set()
        self.sock.close()
        for c in self.conns:
            try:
                c.close()
            except OSError:
                pass


class Node:
    def __init__(self, h, cluster, index):
        self.h = h
        self.cluster = cluster
        self.name = f"{cluster.name}{index + 1}"
        self.admin_port, self.gw_port = free_ports(2)
        self.dir = os.path.join(h.work, self.name)
        os.makedirs(self.dir, exist_ok=True)
        self.config = os.path.join(self.dir, "keygate.toml")
        self.log = os.path.join(self.dir, "keygate.log")
        self.proc = None
        self.write_config()

    def write_config(self):
        c = self.cluster
        redis = ""
        if c.redis_url:
            redis = (f'[redis]\nurl = "{c.redis_url}"\nkey_prefix = "{c.prefix}"\n'
                     f"wait_ms = {self.h.args.redis_wait_ms}\n")
        with open(self.config, "w") as f:
            f.write(f"""# written by tests/cluster/harness.py
data_dir = "{self.dir}/data"
shutdown_grace_seconds = 2

[admin]
listen = "127.0.0.1:{self.admin_port}"

[gateway]
listen = "127.0.0.1:{self.gw_port}"
threads = 1
demo = true
access_log = false

[log]
level = "warn"
format = "json"

[cluster]
node_id = "harness-{self.name}"
propagation_timeout_ms = 1000

{redis}""")

    def env(self):
        e = dict(os.environ)
        e.update({"KEYGATE_PEPPER": self.h.pepper, "KEYGATE_DATABASE_URL": self.cluster.db_url, "NO_COLOR": "1",
                  "KEYGATE_LOG_FORMAT": "json"})
        for k in ("KEYGATE_CONFIG", "KEYGATE_REDIS_URL", "KEYGATE_NODE_ID", "KEYGATE_ADMIN_LISTEN",
                  "KEYGATE_GATEWAY_LISTEN", "KEYGATE_DATA_DIR", "KEYGATE_LOG"):
            e.pop(k, None)
        return e

    def start(self):
        with open(self.log, "ab") as log:
            log.write(f"--- start at {time.monotonic() - T0:.1f}s\n".encode())
            log.flush()
            self.proc = self.h.track(subprocess.Popen(
                [self.h.bin, "serve", "--config", self.config], env=self.env(), stdout=log,
                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL))

    def alive(self):
        return self.proc is not None and self.proc.poll() is None

    def ready(self):
        if not self.alive():
            raise Fail(f"node {self.name} exited with status {self.proc.returncode}: {self.tail()}")
        status, _, body = http_call(self.admin_port, "GET", "/readyz", timeout=5)
        return status == 200 and json.loads(body)

    def wait_ready(self, seconds=60):
        return wait_until(f"node {self.name} ready", seconds, self.ready)

    def readyz(self):
        status, _, body = http_call(self.admin_port, "GET", "/readyz", timeout=5)
        return status, (json.loads(body) if status > 0 else None)

    def position(self):
        status, body = self.readyz()
        return body["token_index"]["position"] if body else -1

    def metrics(self):
        status, _, body = http_call(self.admin_port, "GET", "/metrics", timeout=10)
        if status != 200:
            raise Fail(f"node {self.name}: /metrics answered {status}")
        values = {}
        for line in body.decode().splitlines():
            if line and not line.startswith("#"):
                k, _, v = line.rpartition(" ")
                try:
                    values[k] = float(v)
                except ValueError:
                    pass
        return values

    def admin(self, method, path, body=None, timeout=15.0):
        headers = {"Authorization": f"Bearer {self.cluster.root_key}"}
        data = None
        if body is not None:
            headers["Content-Type"] = "application/json"
            data = json.dumps(body).encode()
        status, _, raw = http_call(self.admin_port, method, path, headers, data, timeout=timeout)
        try:
            parsed = json.loads(raw) if raw else None
        except ValueError:
            parsed = raw.decode(errors="replace")
        return status, parsed

    def live_nodes(self):
        status, body = self.admin("GET", "/admin/v1/nodes")
        return body.get("live") if status == 200 and isinstance(body, dict) else None

    def sigkill(self):
        self.proc.kill()
        self.proc.wait(timeout=10)

    def sigterm(self, seconds=30):
        """Graceful stop (writes usage); its exit status."""
        if not self.alive():
            return self.proc.returncode if self.proc else None
        self.proc.terminate()
        try:
            return self.proc.wait(timeout=seconds)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            return "killed after %d s" % seconds

    def tail(self, n=15):
        try:
            with open(self.log, errors="replace") as f:
                return "".join(f.readlines()[-n:])
        except OSError:
            return ""


class Cluster:
    """Three nodes sharing one database, one pepper and one Redis key prefix."""

    def __init__(self, h, name, db_url, redis_url, prefix):
        self.h = h
        self.name = name
        self.db_url = db_url
        self.redis_url = redis_url
        self.prefix = prefix
        self.root_key = None
        self.nodes = []
        self.metered = {}  # token id -> answers counted in its usage (200 and 429)
        self.lock = threading.Lock()

    def create_root_key(self):
        env = {**os.environ, "KEYGATE_PEPPER": self.h.pepper, "NO_COLOR": "1"}
        env.pop("KEYGATE_CONFIG", None)
        r = subprocess.run(
            [self.h.bin, "root-key", "create", "--name", "admin", "--database-url", self.db_url,
             "--data-dir", os.path.join(self.h.work, f"rootkey-{self.name}"), "--output", "json"],
            env=env, capture_output=True, text=True, timeout=120)
        if r.returncode != 0:
            raise Fail(f"keygate root-key create: {r.stderr.strip()}")
        self.root_key = json.loads(r.stdout)["key"]

    def start(self):
        self.create_root_key()  # also runs the migrations, before three nodes start at once
        self.nodes = [Node(self.h, self, i) for i in range(3)]
        for n in self.nodes:
            n.start()
        for n in self.nodes:
            n.wait_ready()
        # Every node knows the three are live: shares and leases are computed from that.
        wait_until("three live nodes", 20, lambda: self.nodes[0].live_nodes() == 3)
        if self.redis_url:
            wait_until("every node divides by three", 20,
                       lambda: all(n.metrics().get("keygate_shared_limits_nodes") == 3 for n in self.nodes))

    def stop(self):
        codes = {}
        if self.h.args.stop_one_by_one:
            return {n.name: n.sigterm() for n in self.nodes}
        with ThreadPoolExecutor(3) as ex:
            for n, code in zip(self.nodes, ex.map(lambda n: n.sigterm(), self.nodes)):
                codes[n.name] = code
        return codes

    def create_token(self, body, node=0):
        status, t = self.nodes[node].admin("POST", "/admin/v1/tokens", body)
        if status != 201:
            raise Fail(f"create token: {status} {t}")
        with self.lock:
            self.metered.setdefault(t["id"], 0)
        return t["id"], t["token"]

    def count(self, token_id, status, n=1):
        if status in METERED:
            with self.lock:
                self.metered[token_id] = self.metered.get(token_id, 0) + n

    def sync(self, seconds=10):
        """Waits until every node's token index has applied the feed as far as the furthest."""
        target = max(n.position() for n in self.nodes if n.alive())
        wait_until("every node caught up with the change feed", seconds,
                   lambda: all(n.position() >= target for n in self.nodes if n.alive()))

    def usage_totals(self, ids, node):
        def one(token_id):
            status, body = node.admin("GET", f"/admin/v1/tokens/{token_id}/usage?granularity=day")
            if status != 200:
                raise Fail(f"usage of {token_id}: {status} {body}")
            return token_id, body["total"]["requests"]

        with ThreadPoolExecutor(4) as ex:
            return dict(ex.map(one, ids))

    def check_usage(self, scenario, may_lose=None):
        """Stops every node gracefully, starts the first again and compares each token's usage in
        the database with the answers counted here. `may_lose`: token id -> answers a node that
        was SIGKILLed had counted before it died (a crash loses its unwritten minute, by design)."""
        may_lose = may_lose or {}
        codes = self.stop()
        bad = {k: v for k, v in codes.items() if v != 0}
        self.h.check(scenario, not bad, f"graceful stops did not exit 0: {bad}")
        node = self.nodes[0]
        forget_connections()
        node.start()
        node.wait_ready()
        got = self.usage_totals(list(self.metered), node)
        node.sigterm()
        sent = sum(self.metered.values())
        metered = sum(got.values())
        wrong = []
        for tid, n in self.metered.items():
            low = n - may_lose.get(tid, 0)
            if not (low <= got[tid] <= n):
                wrong.append(f"{tid}: {got[tid]} metered, {n} answered" + (f" (may lose {may_lose[tid]})" if tid in may_lose else ""))
        self.h.check(scenario, not wrong, f"usage of {len(wrong)} tokens differs from the answers counted: "
                     + "; ".join(wrong[:5]))
        return sent, metered, len(self.metered), len(wrong)


# --------------------------------------------------------------------------------------------
# Traffic.

def drive(cluster, token_id, secret, seconds=None, total=None, threads_per_node=2, nodes=None):
    """Sends requests with `secret` from threads_per_node threads per gateway, for `seconds` or
    until `total` were sent. Returns per-node status counts and the time from the first request
    sent to the last answer."""
    nodes = nodes or cluster.nodes
    counts = [dict() for _ in nodes]
    lock = threading.Lock()
    left = [total if total is not None else float("inf")]
    stop_at = time.monotonic() + seconds if seconds else float("inf")
    first, last = [None], [None]

    def worker(i):
        forget_connections()
        port = nodes[i].gw_port
        while True:
            with lock:
                if left[0] <= 0 or time.monotonic() > stop_at:
                    return
                left[0] -= 1
                if first[0] is None:
                    first[0] = time.monotonic()
            s = gw_call(port, secret)
            with lock:
                counts[i][s] = counts[i].get(s, 0) + 1
                last[0] = time.monotonic()
            cluster.count(token_id, s)

    ths = [threading.Thread(target=worker, args=(k % len(nodes),), daemon=True)
           for k in range(threads_per_node * len(nodes))]
    for t in ths:
        t.start()
    for t in ths:
        t.join()
    elapsed = (last[0] - first[0]) if first[0] else 0.0
    return counts, elapsed


class Steady:
    """Background traffic with one token through every gateway, `rps` requests a second in all."""

    def __init__(self, cluster, token_id, secret, rps, threads=3):
        self.cluster, self.token_id, self.secret = cluster, token_id, secret
        self.rps, self.nthreads = rps, threads
        self.stop_ev = threading.Event()
        self.counts = {}
        self.lock = threading.Lock()
        self.threads = []

    def _run(self, k):
        forget_connections()
        interval = self.nthreads / self.rps
        nxt = time.monotonic()
        i = k
        while not self.stop_ev.is_set():
            node = self.cluster.nodes[i % 3]
            i += 1
            if not node.alive():
                self.stop_ev.wait(0.01)
                continue
            s = gw_call(node.gw_port, self.secret)
            self.cluster.count(self.token_id, s)
            with self.lock:
                self.counts[s] = self.counts.get(s, 0) + 1
            nxt += interval
            delay = nxt - time.monotonic()
            if delay > 0:
                self.stop_ev.wait(delay)
            else:
                nxt = time.monotonic()

    def __enter__(self):
        self.threads = [threading.Thread(target=self._run, args=(k,), daemon=True) for k in range(self.nthreads)]
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc):
        self.stop_ev.set()
        for t in self.threads:
            t.join()
        return False

    def sent(self):
        with self.lock:
            return sum(self.counts.values())


def load_worker(args):
    """`harness.py load`: steady traffic from a process of its own (so that it does not take the
    GIL from the revocation pollers), until its stdin closes; prints its counts as JSON."""
    secret = os.environ["KG_LOAD_TOKEN"]
    ports = [int(p) for p in args.ports.split(",")]
    stop_ev = threading.Event()
    counts, lock = {}, threading.Lock()

    def run(k):
        interval = args.threads / args.rps
        nxt = time.monotonic()
        i = k
        while not stop_ev.is_set():
            s = gw_call(ports[i % len(ports)], secret)
            i += 1
            with lock:
                counts[s] = counts.get(s, 0) + 1
            nxt += interval
            delay = nxt - time.monotonic()
            if delay > 0:
                stop_ev.wait(delay)
            else:
                nxt = time.monotonic()

    ths = [threading.Thread(target=run, args=(k,), daemon=True) for k in range(args.threads)]
    for t in ths:
        t.start()
    sys.stdin.read()
    stop_ev.set()
    for t in ths:
        t.join()
    print(json.dumps({str(k): v for k, v in counts.items()}), flush=True)


# --------------------------------------------------------------------------------------------
# Scenarios.

def limiter(h, c):
    name = "limiter"
    req, per = h.args.limit, 60
    body = {"name": "limiter", "rate_limit": {"requests": req, "per_seconds": per}}
    tid, secret = c.create_token(body)
    c.sync()
    before = [n.metrics() for n in c.nodes]
    counts, elapsed = drive(c, tid, secret, seconds=h.args.limit_seconds, threads_per_node=2)
    after = [n.metrics() for n in c.nodes]
    admitted = sum(x.get(200, 0) for x in counts)
    refused = sum(x.get(429, 0) for x in counts)
    other = {s: n for x in counts for s, n in x.items() if s not in (200, 429)}
    ideal = req + math.floor(elapsed * req / per)
    ratio = admitted / ideal

    def delta(key):
        return int(sum(a.get(key, 0) - b.get(key, 0) for a, b in zip(after, before)))

    local = delta("keygate_shared_limits_local_decisions_total")
    waits = delta("keygate_shared_limits_waits_total")
    calls = delta("keygate_shared_limits_calls_total")
    per_node = "/".join(str(x.get(200, 0)) for x in counts)
    # A quota through the three nodes as well.
    q = h.args.limit
    qid, qsecret = c.create_token({"name": "quota", "quota": {"requests": q, "period": "day"}})
    c.sync()
    qbefore = [n.metrics() for n in c.nodes]
    qcounts, _ = drive(c, qid, qsecret, total=3 * q, threads_per_node=2)
    qafter = [n.metrics() for n in c.nodes]
    qlocal = int(sum(a.get("keygate_shared_limits_local_decisions_total", 0)
                     - b.get("keygate_shared_limits_local_decisions_total", 0) for a, b in zip(qafter, qbefore)))
    qadmitted = sum(x.get(200, 0) for x in qcounts)
    qother = {s: n for x in qcounts for s, n in x.items() if s not in (200, 429)}
    r = Resp(c.redis_url)
    keys = len(r.keys(c.prefix))
    r.close()
    figure(name, f"rate limit {req}/{per}s, {admitted} admitted ({per_node} per node) of "
                 f"{admitted + refused} in {elapsed:.1f} s through 3 nodes, GCRA ideal {ideal}: "
                 f"{ratio:.3f}x (max 1.02); {waits} lease waits, {local} decided locally, {calls} Redis calls; "
                 f"quota {q}/day: {qadmitted} admitted of {3 * q} ({qadmitted / q:.3f}x, {qlocal} decided locally); "
                 f"{keys} keys under the prefix in Redis")
    h.check(name, keys > 0, f"no key under the prefix {c.prefix} in Redis")
    h.check(name, not other, f"unexpected answers: {other}")
    h.check(name, not qother, f"unexpected answers (quota): {qother}")
    # The bound the design states (crates/keygate-gateway/src/shared.rs): the limit plus the leases
    # (1%), plus each request a node decided alone because Redis did not answer within
    # redis.wait_ms (charged to the shared bucket afterwards, so it is slack within this short
    # window only). On a loaded two-core machine a Redis round trip can miss the 5 ms now and then.
    h.check(name, admitted <= math.floor(ideal * 1.02) + local,
            f"{admitted} admitted, over 1.02 x the ideal {ideal} plus {local} decided locally")
    h.check(name, qadmitted <= math.floor(q * 1.02) + qlocal,
            f"quota: {qadmitted} admitted, over 1.02 x {q} plus {qlocal} decided locally")
    h.check(name, admitted >= 1 and qadmitted >= 1, "nothing admitted")


class Poller(threading.Thread):
    """Calls one gateway with a token from the moment it is given one until the first 401."""

    def __init__(self, c, node):
        super().__init__(daemon=True)
        self.c, self.node = c, node
        self.jobs, self.results = queue.Queue(), queue.Queue()

    def run(self):
        forget_connections()
        while True:
            job = self.jobs.get()
            if job is None:
                return
            tid, secret, t0, deadline = job
            ok, other, took = 0, {}, None
            while True:
                s = gw_call(self.node.gw_port, secret)
                now = time.perf_counter()
                if s == 401:
                    took = now - t0
                    break
                if s == 200:
                    ok += 1
                else:
                    other[s] = other.get(s, 0) + 1
                if now > deadline:
                    break
            self.c.count(tid, 200, ok)
            self.results.put((took, ok, other))


def revoke_under_load(h, c):
    name = "revoke"
    n_rev = h.args.revocations
    say(f"revoke: creating {n_rev} tokens")
    with ThreadPoolExecutor(3) as ex:
        tokens = list(ex.map(lambda i: c.create_token({"name": f"rev{i}"}, node=i % 3), range(n_rev)))
    load_id, load_secret = c.create_token({"name": "load"})
    c.sync()
    pollers = [Poller(c, n) for n in c.nodes]
    for p in pollers:
        p.start()
    load = subprocess.Popen(
        [sys.executable, os.path.abspath(__file__), "load", "--ports", ",".join(str(n.gw_port) for n in c.nodes),
         "--rps", str(h.args.load_rps), "--threads", "3"],
        env={**os.environ, "KG_LOAD_TOKEN": load_secret}, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    h.track(load)
    time.sleep(0.5)
    times, calls, unacked, missing, other, self_served = [], [], [], 0, {}, 0
    prop_elapsed = []
    t_loop = time.monotonic()
    try:
        for i, (tid, secret) in enumerate(tokens):
            on = c.nodes[i % 3]
            watch = [pollers[(i + k) % 3] for k in (1, 2)]
            t0 = time.perf_counter()
            for p in watch:
                p.jobs.put((tid, secret, t0, t0 + h.args.reach_seconds))
            status, body = on.admin("POST", f"/admin/v1/tokens/{tid}/revoke", {})
            calls.append((time.perf_counter() - t0) * 1000)
            if status != 200:
                raise Fail(f"revoke {tid} on {on.name}: {status} {body}")
            p = body.get("propagation") or {}
            prop_elapsed.append(p.get("elapsed_ms", -1))
            if (p.get("nodes"), p.get("applied")) != (3, 3):
                unacked.append(p)
            # The node that made the change refuses the token once it has answered.
            s = gw_call(on.gw_port, secret)
            if s != 401:
                self_served += 1
                c.count(tid, s)
            for w in watch:
                took, _, oth = w.results.get(timeout=h.args.reach_seconds + 30)
                for k, v in oth.items():
                    other[k] = other.get(k, 0) + v
                if took is None:
                    missing += 1
                else:
                    times.append(took * 1000)
    finally:
        loop_s = time.monotonic() - t_loop
        load.stdin.close()
        out = load.stdout.read()
        load.wait(timeout=30)
        for p in pollers:
            p.jobs.put(None)
    load_counts = {int(k): v for k, v in json.loads(out or "{}").items()}
    c.count(load_id, 200, load_counts.get(200, 0))
    c.count(load_id, 429, load_counts.get(429, 0))
    load_total = sum(load_counts.values())
    figure(name, f"{n_rev} revocations (load average {os.getloadavg()[0]:.1f}), {len(times)} measurements on the other nodes under "
                 f"{load_total} requests of load in {loop_s:.1f} s: first refusal "
                 f"p50 {pct(times, 0.5):.1f} ms, p99 {pct(times, 0.99):.1f} ms, max {max(times):.1f} ms "
                 f"(goal p99 <= 100 ms: {'met' if pct(times, 0.99) <= 100 else 'NOT met'}); admin call p50 "
                 f"{pct(calls, 0.5):.1f} ms, p99 {pct(calls, 0.99):.1f} ms; acknowledged 3/3: "
                 f"{n_rev - len(unacked)}/{n_rev}, propagation elapsed_ms p50 {pct(prop_elapsed, 0.5)}, "
                 f"max {max(prop_elapsed)}")
    h.check(name, missing == 0, f"{missing} times a node still admitted a revoked token after {h.args.reach_seconds} s")
    h.check(name, self_served == 0, f"{self_served} times the revoking node admitted the token after its answer")
    h.check(name, not other, f"unexpected answers while polling: {other}")
    h.check(name, set(load_counts) <= {200}, f"the load got other answers than 200: {load_counts}")
    if unacked:
        say(f"revoke: {len(unacked)} answers said applied < nodes: {unacked[:3]}")


def sigkill(h, c, lost):
    name = "sigkill"
    a, b, victim = c.nodes
    kid, ksecret = c.create_token({"name": "killed-while-revoked"})
    lid, lsecret = c.create_token({"name": "revoked-after-restart"})
    wid, wsecret = c.create_token({"name": "served-by-the-killed-node"})
    c.sync()
    pre = {}
    for tid, secret, n in ((kid, ksecret, 1), (lid, lsecret, 1), (wid, wsecret, 30)):
        for _ in range(n):
            s = gw_call(victim.gw_port, secret)
            c.count(tid, s)
            pre[s] = pre.get(s, 0) + 1
    h.check(name, set(pre) == {200}, f"{victim.name} answered {pre} before the kill")
    # The killed node's unwritten usage dies with it (documented: a crash loses the running
    # minute): what it answered before the kill bounds what the usage check may find missing.
    lost.update({tid: n for tid, n in c.metered.items() if n})
    t_kill = time.monotonic()
    victim.sigkill()
    forget_connections()
    status, body = a.admin("POST", f"/admin/v1/tokens/{kid}/revoke", {})
    if status != 200:
        raise Fail(f"revoke while {victim.name} is down: {status} {body}")
    prop = body.get("propagation") or {}
    s_b = gw_call(b.gw_port, ksecret)
    h.check(name, s_b == 401, f"{b.name} answered {s_b} for the revoked token")
    t_start = time.monotonic()
    victim.start()
    victim.wait_ready()
    ready_s = time.monotonic() - t_start
    first = gw_call(victim.gw_port, ksecret, fresh=True)
    h.check(name, first == 401, f"restarted {victim.name} answered {first} to the token revoked while it was down")
    for tid, secret, n in ((lid, lsecret, 1), (wid, wsecret, 10)):
        for _ in range(n):
            s = gw_call(victim.gw_port, secret)
            c.count(tid, s)
            h.check(name, s == 200, f"restarted {victim.name} answered {s} to a live token")
    wait_until("three live nodes after the restart", 20, lambda: a.live_nodes() == 3)
    status, body2 = b.admin("POST", f"/admin/v1/tokens/{lid}/revoke", {})
    prop2 = (body2 or {}).get("propagation") or {}
    after = gw_call(victim.gw_port, lsecret)
    h.check(name, (prop2.get("nodes"), prop2.get("applied")) == (3, 3),
            f"a revocation after the restart was acknowledged {prop2}")
    h.check(name, after == 401, f"restarted {victim.name} answered {after} after a revocation acknowledged 3/3")
    figure(name, f"{victim.name} SIGKILLed; a revocation on {a.name} meanwhile answered "
                 f"{prop.get('applied')}/{prop.get('nodes')} applied in {prop.get('elapsed_ms')} ms, refused on "
                 f"{b.name}: {s_b}; {victim.name} restarted, ready in {ready_s:.1f} s "
                 f"({time.monotonic() - t_kill:.1f} s after the kill), first request with the revoked token: {first}; "
                 f"a revocation after the restart: {prop2.get('applied')}/{prop2.get('nodes')} applied in "
                 f"{prop2.get('elapsed_ms')} ms, then {after} on {victim.name}")


def redis_outage(h, c, redis):
    name = "redis"
    sid, ssecret = c.create_token({"name": "steady"})
    lim = {"requests": 60, "per_seconds": 60}
    before_id, before_secret = c.create_token({"name": "before", "rate_limit": lim})
    during_id, during_secret = c.create_token({"name": "during", "rate_limit": lim})
    back_id, back_secret = c.create_token({"name": "recovery", "rate_limit": {"requests": 6000, "per_seconds": 60}})
    after_id, after_secret = c.create_token({"name": "after", "rate_limit": lim})
    c.sync()
    counts, _ = drive(c, before_id, before_secret, total=15, threads_per_node=1)
    h.check(name, sum(x.get(200, 0) for x in counts) == 15, f"before the outage: {counts}")
    r = Resp(redis.url())
    keys = len(r.keys(c.prefix))
    r.close()
    h.check(name, keys > 0, f"no key under the prefix {c.prefix} in Redis after limited requests")
    redis.stop()
    t_down = time.monotonic()
    with Steady(c, sid, ssecret, rps=60) as steady:
        counts, elapsed = drive(c, during_id, during_secret, total=300, threads_per_node=2)
        admitted = [x.get(200, 0) for x in counts]
        other = {s: n for x in counts for s, n in x.items() if s not in (200, 429)}
        share = math.ceil(60 / 3)
        share_ideal = share + math.floor(elapsed * share / 60)
        ideal = 3 * share_ideal
        mets = [n.metrics() for n in c.nodes]
        ups = [m.get("keygate_shared_limits_up") for m in mets]
        node_counts = [m.get("keygate_shared_limits_nodes") for m in mets]
        time.sleep(max(0.0, 2.0 - (time.monotonic() - t_down)))
        steady_down = dict(steady.counts)
        redis.start()
        t_up = time.monotonic()
        refusals, polls = 0, 0

        def recovered():
            nonlocal refusals, polls
            for n in c.nodes:
                s = gw_call(n.gw_port, back_secret)
                c.count(back_id, s)
                polls += 1
                if s != 200:
                    refusals += 1
            return all(n.metrics().get("keygate_shared_limits_up") == 1 for n in c.nodes)

        wait_until("keygate_shared_limits_up 1 on every node after Redis is back", 15, recovered, every=0.1)
        recovery_s = time.monotonic() - t_up
        time.sleep(1.0)
        steady_all = dict(steady.counts)
    before_m = [n.metrics() for n in c.nodes]
    acounts, aelapsed = drive(c, after_id, after_secret, total=300, threads_per_node=2)
    after_m = [n.metrics() for n in c.nodes]
    a_admitted = sum(x.get(200, 0) for x in acounts)
    a_ideal = 60 + math.floor(aelapsed * 60 / 60)
    local = int(sum(a.get("keygate_shared_limits_local_decisions_total", 0)
                    - b.get("keygate_shared_limits_local_decisions_total", 0) for a, b in zip(after_m, before_m)))
    figure(name, f"Redis stopped: limit 60/60s through 3 nodes admitted {sum(admitted)} "
                 f"({'/'.join(map(str, admitted))} per node; share {share}, ideal {ideal} over {elapsed:.1f} s); "
                 f"keygate_shared_limits_up {ups}, nodes {node_counts}; steady token {steady_down.get(200, 0)} "
                 f"served of {sum(steady_down.values())}; Redis started: up on every node after {recovery_s:.1f} s, "
                 f"{refusals} refusals in {polls} requests meanwhile; then limit 60 shared again: {a_admitted} "
                 f"admitted (ideal {a_ideal}, {a_admitted / a_ideal:.3f}x), {local} decided locally")
    h.check(name, not other, f"unexpected answers while Redis was down: {other}")
    h.check(name, all(x <= math.floor(share_ideal * 1.02) for x in admitted),
            f"a node admitted more than its share {share_ideal}: {admitted}")
    h.check(name, sum(admitted) <= math.floor(ideal * 1.02), f"{sum(admitted)} admitted over {ideal}")
    h.check(name, all(u == 0 for u in ups), f"keygate_shared_limits_up while Redis was down: {ups}")
    h.check(name, all(x == 3 for x in node_counts), f"keygate_shared_limits_nodes: {node_counts}")
    h.check(name, set(steady_all) <= {200}, f"the steady token got other answers than 200: {steady_all}")
    h.check(name, refusals == 0, f"{refusals} refusals while Redis came back")
    # Right after the connection comes back, a first call per lease can take longer than wait_ms
    # (a new connection, the scripts loaded into the new Redis); those requests are decided by the
    # node alone and charged to the shared bucket with its next call: within this short window
    # they can come on top of the limit, never more than their number.
    h.check(name, a_admitted <= math.floor(a_ideal * 1.02) + local,
            f"after Redis came back: {a_admitted} admitted, ideal {a_ideal}, {local} decided locally")


def slow_redis(h, c, line):
    """Redis behind a delay line: slow (50 ms round trip, ten times redis.wait_ms), then cut off
    (bytes held 5 s, a partition as TCP lives it), then healed."""
    name = "slow-redis"
    lim = {"requests": 60, "per_seconds": 60}
    slow_id, slow_secret = c.create_token({"name": "slow", "rate_limit": lim})
    cut_id, cut_secret = c.create_token({"name": "partitioned", "rate_limit": lim})
    sid, ssecret = c.create_token({"name": "steady-slow", "rate_limit": {"requests": 6000, "per_seconds": 60}})
    c.sync()
    share = math.ceil(60 / 3)

    def local_total():
        return sum(n.metrics().get("keygate_shared_limits_local_decisions_total", 0) for n in c.nodes)

    line.delay = 0.025
    local0 = local_total()
    t = time.monotonic()
    lat = []
    for i in range(30):  # one request at a time: what the delay costs a caller
        t1 = time.monotonic()
        s = gw_call(c.nodes[i % 3].gw_port, ssecret)
        lat.append((time.monotonic() - t1) * 1000)
        c.count(sid, s)
        h.check(name, s == 200, f"a token without limits answered {s} while Redis was slow")
    counts, elapsed = drive(c, slow_id, slow_secret, total=300, threads_per_node=2)
    slow_admitted = sum(x.get(200, 0) for x in counts)
    slow_other = {k: v for x in counts for k, v in x.items() if k not in (200, 429)}
    slow_ideal = 60 + math.floor(elapsed * 60 / 60)
    slow_local = int(local_total() - local0)
    slow_s = time.monotonic() - t

    line.delay = 5.0
    with Steady(c, sid, ssecret, rps=60) as steady:
        # The first limited requests wait for leases that do not come; after the backend's call
        # bound (1 s) every node marks Redis down and decides alone with its share.
        counts2, elapsed2 = drive(c, cut_id, cut_secret, total=300, threads_per_node=2)
        wait_until("keygate_shared_limits_up 0 on every node during the partition", 10,
                   lambda: all(n.metrics().get("keygate_shared_limits_up") == 0 for n in c.nodes), every=0.1)
        line.delay = 0.0
        t_heal = time.monotonic()

        def healed():
            for n in c.nodes:
                c.count(cut_id, gw_call(n.gw_port, cut_secret))  # a call to Redis, to learn it is back
            return all(n.metrics().get("keygate_shared_limits_up") == 1 for n in c.nodes)

        wait_until("keygate_shared_limits_up 1 on every node after the partition heals", 20, healed, every=0.2)
        heal_s = time.monotonic() - t_heal
        steady_all = dict(steady.counts)
    cut = [x.get(200, 0) for x in counts2]
    cut_other = {k: v for x in counts2 for k, v in x.items() if k not in (200, 429)}
    share_ideal = share + math.floor(elapsed2 * share / 60)
    figure(name, f"Redis 50 ms away: single requests p50 {pct(lat, 0.5):.1f} ms, max {max(lat):.1f} ms "
                 f"(redis.wait_ms {h.args.redis_wait_ms}); limit 60/60s through 3 nodes admitted {slow_admitted} "
                 f"(ideal {slow_ideal}, {slow_admitted / slow_ideal:.2f}x; bound: limit plus each node's share "
                 f"decided alone), {slow_local} decided locally in {slow_s:.1f} s; partitioned (bytes held 5 s): "
                 f"{sum(cut)} admitted ({'/'.join(map(str, cut))} per node, share {share}), steady token "
                 f"{steady_all.get(200, 0)} served of {sum(steady_all.values())}; healed: shared again after "
                 f"{heal_s:.1f} s")
    h.check(name, not slow_other and not cut_other, f"unexpected answers: {slow_other} {cut_other}")
    h.check(name, slow_admitted <= math.floor((slow_ideal + 3 * share) * 1.02),
            f"slow Redis: {slow_admitted} admitted, more than the limit plus the nodes' shares")
    h.check(name, all(x <= math.floor(share_ideal * 1.02) for x in cut),
            f"partitioned: a node admitted more than its share {share_ideal}: {cut}")
    h.check(name, set(steady_all) <= {200}, f"the steady token got other answers than 200: {steady_all}")


def postgres_outage(h, c, pg):
    name = "postgres"
    uid, usecret = c.create_token({"name": "through-the-outage"})
    vid, vsecret = c.create_token({"name": "revoked-after-the-outage"})
    c.sync()
    for n in c.nodes:
        s = gw_call(n.gw_port, vsecret)
        c.count(vid, s)
    with Steady(c, uid, usecret, rps=60) as steady:
        time.sleep(0.5)
        t_stop = time.monotonic()
        pg.stop()
        stop_s = time.monotonic() - t_stop
        time.sleep(0.5)

        def admin_down(n):
            t = time.monotonic()
            status, body = n.admin("GET", "/admin/v1/tokens?limit=1", timeout=30)
            return status, (body or {}).get("error", {}).get("code") if isinstance(body, dict) else body, \
                time.monotonic() - t

        with ThreadPoolExecutor(3) as ex:
            downs = list(ex.map(admin_down, c.nodes))
        with ThreadPoolExecutor(3) as ex:
            readys = list(ex.map(lambda n: n.readyz(), c.nodes))
        served_down = {}
        for n in c.nodes:
            s = gw_call(n.gw_port, vsecret)
            c.count(vid, s)
            served_down[n.name] = s
        time.sleep(1.0)
        during = dict(steady.counts)
        t_start = time.monotonic()
        pg.start()
        wait_until("the admin API answers after PostgreSQL is back", 30,
                   lambda: c.nodes[1].admin("GET", "/admin/v1/tokens?limit=1")[0] == 200, every=0.1)
        admin_back_s = time.monotonic() - t_start
        # Pollers on every gateway from the admin call to the first refusal, as in `revoke`.
        pollers = [Poller(c, n) for n in c.nodes]
        for p in pollers:
            p.start()
        t0 = time.perf_counter()
        for p in pollers:
            p.jobs.put((vid, vsecret, t0, t0 + h.args.reach_seconds))
        status, body = c.nodes[1].admin("POST", f"/admin/v1/tokens/{vid}/revoke", {})
        call_ms = (time.perf_counter() - t0) * 1000
        reach, other = {}, {}
        for n, p in zip(c.nodes, pollers):
            took, _, oth = p.results.get(timeout=h.args.reach_seconds + 30)
            p.jobs.put(None)
            reach[n.name] = None if took is None else round(took * 1000, 1)
            other.update(oth)
        if status != 200:
            raise Fail(f"revoke after PostgreSQL came back: {status} {body}")
        prop = body.get("propagation") or {}
        time.sleep(0.5)
        total = dict(steady.counts)
    figure(name, f"PostgreSQL stopped ({stop_s:.1f} s to stop): admin answered "
                 f"{[(d[0], d[1], round(d[2], 2)) for d in downs]} (status, code, s); /readyz {[r[0] for r in readys]}; "
                 f"gateways {served_down}; steady token {during.get(200, 0)} served of {sum(during.values())} "
                 f"by then; started: admin back after {admin_back_s:.1f} s, a revocation answered in {call_ms:.0f} ms "
                 f"with {prop.get('applied')}/{prop.get('nodes')} applied, first refusal on each node after {reach} ms; "
                 f"steady token {total.get(200, 0)} served of {sum(total.values())} in all")
    h.check(name, all(d[0] == 503 and d[1] == "store_unavailable" for d in downs),
            f"the admin API while PostgreSQL was down: {downs}")
    h.check(name, all(r[0] == 200 for r in readys), f"/readyz while PostgreSQL was down: {[r[0] for r in readys]}")
    h.check(name, all(v == 200 for v in served_down.values()), f"gateways while PostgreSQL was down: {served_down}")
    h.check(name, set(total) <= {200}, f"the steady token got other answers than 200: {total}")
    h.check(name, all(v is not None for v in reach.values()), f"a node never refused the revoked token: {reach}")
    h.check(name, not other, f"unexpected answers while polling: {other}")


# --------------------------------------------------------------------------------------------


def run_scenario(h, name, f, *args):
    if time.monotonic() - T0 > h.args.budget:
        raise Budget()
    if h.args.only and name not in h.args.only.split(","):
        return
    say(f"scenario {name}")
    h.scenarios_run += 1
    try:
        f(h, *args)
    except Fail as e:
        h.fail(name, str(e))


def phase_a(h):
    base = h.args.postgres_url
    db = "kgharness_" + rand(10)
    psql(base, f'CREATE DATABASE "{db}"')
    h.cleanups.append(lambda: psql(base, f'DROP DATABASE IF EXISTS "{db}" WITH (FORCE)'))
    with open(os.path.join(h.work, "databases"), "a") as f:
        f.write(f"{base} {db}\n")
    prefix = "kgh" + rand(12)

    def drop_keys():
        r = Resp(h.args.redis_url)
        keys = r.keys(prefix)
        for i in range(0, len(keys), 500):
            r.cmd("UNLINK", *keys[i:i + 500])
        r.close()

    h.cleanups.append(drop_keys)
    say(f"phase A: the machine's PostgreSQL (database {db}) and Redis (key prefix {prefix})")
    c = Cluster(h, "a", with_database(base, db), h.args.redis_url, prefix)
    c.start()
    lost = {}
    # First, so that the limiter and the revocations run on a cluster with a restarted node, and
    # so that what the SIGKILL may lose is only what this scenario sent the node before it.
    run_scenario(h, "sigkill", sigkill, c, lost)
    run_scenario(h, "limiter", limiter, c)
    run_scenario(h, "revoke", revoke_under_load, c)
    say("phase A: stopping the nodes (SIGTERM writes usage), one started again to read it")
    sent, metered, ntok, wrong = c.check_usage("usage-a", may_lose=lost)
    figure("usage-a", f"{metered} requests metered of {sent} answered (200 or 429) with {ntok} tokens in phase A, "
                      f"{sent - metered} missing; the SIGKILLed node had answered {sum(lost.values())} before its "
                      f"death (a crash may lose its unwritten minute, by design); "
                      + ("every other count exact" if not wrong else f"{wrong} tokens outside that bound"))


def phase_b(h):
    say("phase B: a throwaway PostgreSQL and redis-server")
    pg = OwnPostgres(h)
    pg.start()
    redis = OwnRedis(h)
    redis.start()
    h.cleanups.append(redis.stop)
    line = DelayLine(h, redis.port)  # no delay until slow-redis sets one
    h.cleanups.append(line.close)
    c = Cluster(h, "b", pg.url(), line.url(), "kgh" + rand(12))
    c.start()
    run_scenario(h, "redis", redis_outage, c, redis)
    run_scenario(h, "slow-redis", slow_redis, c, line)
    run_scenario(h, "postgres", postgres_outage, c, pg)
    say("phase B: stopping the nodes (SIGTERM writes usage), one started again to read it")
    sent, metered, ntok, wrong = c.check_usage("usage-b")
    figure("usage-b", f"{metered} requests metered of {sent} answered (200 or 429) with {ntok} tokens through "
                      f"the Redis and PostgreSQL outages, {sent - metered} missing"
                      + (f" ({wrong} tokens differ)" if wrong else ", every count exact"))


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd")
    lw = sub.add_parser("load")
    lw.add_argument("--ports", required=True)
    lw.add_argument("--rps", type=float, default=300)
    lw.add_argument("--threads", type=int, default=3)
    p.add_argument("--keygate", default="target/debug/keygate")
    p.add_argument("--work")
    p.add_argument("--budget", type=float, default=float(os.environ.get("CLUSTER_TEST_SECONDS", "180")))
    p.add_argument("--postgres-url", default=os.environ.get("KEYGATE_TEST_POSTGRES_URL",
                                                            "postgres://postgres@127.0.0.1:5432/postgres"))
    p.add_argument("--redis-url", default=os.environ.get("KEYGATE_TEST_REDIS_URL", "redis://127.0.0.1:6379"))
    p.add_argument("--revocations", type=int, default=int(os.environ.get("CLUSTER_REVOCATIONS", "201")))
    p.add_argument("--load-rps", type=float, default=float(os.environ.get("CLUSTER_LOAD_RPS", "300")))
    p.add_argument("--limit", type=int, default=100)
    p.add_argument("--limit-seconds", type=float, default=4.0)
    p.add_argument("--reach-seconds", type=float, default=10.0)
    p.add_argument("--redis-wait-ms", type=int, default=int(os.environ.get("CLUSTER_REDIS_WAIT_MS", "5")))
    p.add_argument("--phases", default="ab", help="a, b or ab")
    p.add_argument("--stop-one-by-one", action="store_true",
                   help="stop the nodes one after the other rather than at once (diagnosis)")
    p.add_argument("--only", default=os.environ.get("CLUSTER_SCENARIOS", ""),
                   help="comma-separated scenarios to run (default: all)")
    args = p.parse_args()
    if args.cmd == "load":
        return load_worker(args)
    sys.setswitchinterval(0.0005)
    own_work = args.work is None
    if own_work:
        args.work = tempfile.mkdtemp(prefix="keygate-cluster.")
    args.keygate = os.path.abspath(args.keygate)
    h = Harness(args)

    def on_alarm(*_):
        raise Budget()

    def on_term(*_):
        raise KeyboardInterrupt()

    signal.signal(signal.SIGALRM, on_alarm)
    signal.signal(signal.SIGTERM, on_term)
    signal.alarm(int(args.budget))
    status = 0
    try:
        if "a" in args.phases:
            phase_a(h)
        if "b" in args.phases:
            phase_b(h)
    except Budget:
        h.failures.append(f"the time budget of {args.budget:.0f} s (CLUSTER_TEST_SECONDS) ran out")
        print(f"FAIL: the time budget of {args.budget:.0f} s ran out", file=sys.stderr)
    except KeyboardInterrupt:
        h.failures.append("interrupted")
        status = 130
    except Fail as e:
        h.failures.append(str(e))
        print(f"FAIL: {e}", file=sys.stderr)
    finally:
        signal.alarm(0)
        if h.failures:
            for n in sorted(glob.glob(os.path.join(args.work, "*", "keygate.log"))):
                with open(n, errors="replace") as f:
                    lines = [x for x in f if '"level":"ERROR"' in x or '"level":"WARN"' in x or "error" in x]
                if lines:
                    print(f"--- {os.path.basename(os.path.dirname(n))}: its last warnings and errors", file=sys.stderr)
                    sys.stderr.write("".join(x[:600] + ("\n" if len(x) > 600 else "") for x in lines[-8:]))
        h.cleanup()
        if own_work:
            shutil.rmtree(args.work, ignore_errors=True)
    took = time.monotonic() - T0
    load = "/".join(f"{x:.1f}" for x in os.getloadavg())
    print(f"cluster: {h.scenarios_run} scenarios run, {len(h.failures)} failures, {took:.0f} s "
          f"(load average {load})")
    if h.failures:
        return status or 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
