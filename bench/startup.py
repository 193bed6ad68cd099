#!/usr/bin/env python3
"""Start-up with many tokens in PostgreSQL: how long `keygate serve` takes to become ready, and
its peak memory, with 1,000,000 tokens in the store (issue 14: ready in at most 10 s).

What it does:

  1. creates a database of its own (`kgbench_<random>`) on the PostgreSQL of `--pg` (trust auth;
     it is dropped at the end), and starts keygate against it once, so that keygate's migrations
     create the schema and its first start the default workspace and app;
  2. creates one token through the admin API (with the gateway bench's rate limit, 1,000,000
     requests per second, no burst) and copies its row `--tokens` − 1 times with one
     `INSERT … SELECT … FROM generate_series` inside PostgreSQL: a unique id
     (`tok_` + 12 base62 characters, from which the gateway takes the token's public id), a unique
     32-byte hash (SHA-256 of a counter: not the keyed hash of any real token, which start-up never
     checks), the template's workspace, app, scopes, state `active`, limit and metadata. Then
     `VACUUM ANALYZE tokens`, so no run pays for setting the new rows' hint bits;
  3. `--runs` times: starts `keygate serve`, polls `GET /readyz` on the admin listener (every
     10 ms) until it answers 200 — readiness needs the token index loaded — and records the time
     from just before the process was spawned, the tokens `/readyz` reports, and `VmHWM` (peak
     RSS) and `VmRSS` from /proc/PID/status at readiness and `--settle` seconds later, and when
     keygate logged "store opened" and "token index loaded" (so the time splits into opening the
     store, loading the index, and the rest) and the CPU time it had used by readiness; then stops
     it (SIGTERM) and waits for it to exit;
  4. times the index's query alone with psql (`COPY (SELECT …) TO STDOUT` into /dev/null), for
     what PostgreSQL and the transfer take without keygate.

The change feed (`token_changes`, `feed_state`) is left as it is: start-up reads `feed_state.seq`
and then every live token (`SELECT … FROM tokens WHERE state <> 'revoked' AND …`), not the feed,
which only matters to nodes that are running while rows change (none are while rows are added).

    python3 bench/startup.py --keygate /tmp/kg-release/keygate
    python3 bench/startup.py --keygate target/release/keygate --tokens 100000 --runs 1   # quick

Needs `psql` on the PATH. Every process and the database it made are removed when it ends,
including on Ctrl-C.
"""

from __future__ import annotations

import argparse
import atexit
import base64
import datetime as dt
import http.client
import json
import os
import random
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CFG = """\
data_dir = "{dir}/data"
database_url = "{url}"

[admin]
listen = "127.0.0.1:{admin}"

[gateway]
listen = "127.0.0.1:{port}"
threads = 2
access_log = false
demo = false

[log]
level = "info"
format = "text"

[cluster]
node_id = "kgbench-startup"

[[routes]]
id = "bench"
path = "/"
upstream = "http://127.0.0.1:9"
"""


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


class Run:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.db = f"kgbench_{random.SystemRandom().getrandbits(40):010x}"
        self.dir = Path(tempfile.mkdtemp(prefix="kgbench-startup-"))
        self.url = f"{args.pg.rstrip('/')}/{self.db}"
        self.proc: subprocess.Popen | None = None
        self.created = False
        self.env = dict(os.environ, KEYGATE_PEPPER=base64.b64encode(os.urandom(32)).decode())
        self.cfg = self.dir / "keygate.toml"
        self.cfg.write_text(CFG.format(dir=self.dir, url=self.url, admin=args.base_port, port=args.base_port + 1))

    # ---- PostgreSQL ---------------------------------------------------------------------------

    def psql(self, sql: str, db: str | None = None) -> str:
        argv = ["psql", f"{self.args.pg.rstrip('/')}/{db or self.db}", "-v", "ON_ERROR_STOP=1", "-qAt", "-c", sql]
        return subprocess.run(argv, capture_output=True, text=True, check=True).stdout.strip()

    def create_db(self) -> None:
        self.psql(f"CREATE DATABASE {self.db}", db="postgres")
        self.created = True
        log(f"database {self.db} created")

    def drop_db(self) -> None:
        if self.created:
            self.psql(f"DROP DATABASE IF EXISTS {self.db} WITH (FORCE)", db="postgres")
            self.created = False
            log(f"database {self.db} dropped")

    # ---- keygate ------------------------------------------------------------------------------

    def start(self, log_name: str = "keygate.log") -> tuple[subprocess.Popen, float]:
        out = open(self.dir / log_name, "ab")
        self.wall0 = time.time()
        t0 = time.monotonic()
        p = subprocess.Popen([self.args.keygate, "serve", "--config", str(self.cfg)], stdout=out,
                             stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=self.env)
        out.close()
        self.proc = p
        return p, t0

    def wait_ready(self, p: subprocess.Popen, timeout: float = 300) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if p.poll() is not None:
                sys.exit(f"keygate exited with {p.returncode}; see {self.dir / 'keygate.log'}")
            try:
                c = http.client.HTTPConnection("127.0.0.1", self.args.base_port, timeout=timeout)
                c.request("GET", "/readyz")
                r = c.getresponse()
                body = r.read()
                c.close()
                if r.status == 200:
                    return json.loads(body)
            except OSError:
                pass
            time.sleep(0.01)
        sys.exit(f"keygate not ready after {timeout:.0f}s")

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def cleanup(self) -> None:
        self.stop()
        try:
            self.drop_db()
        except subprocess.CalledProcessError as e:
            log(f"could not drop {self.db}: {e.stderr}")
        shutil.rmtree(self.dir, ignore_errors=True)

    # ---- the tokens ---------------------------------------------------------------------------

    def template_token(self) -> str:
        """Starts keygate on the empty database (schema, default workspace and app), creates a root
        key and one token through the admin API; returns the token's id."""
        p, _ = self.start()
        self.wait_ready(p)
        self.stop()
        out = subprocess.run([self.args.keygate, "root-key", "create", "--name", "bench", "--config", str(self.cfg),
                              "--output", "json"], capture_output=True, text=True, check=True, env=self.env)
        key = json.loads(out.stdout)["key"]
        p, _ = self.start()
        self.wait_ready(p)
        c = http.client.HTTPConnection("127.0.0.1", self.args.base_port, timeout=30)
        body = json.dumps({"name": "bench", "rate_limit": {"requests": 1_000_000, "per_seconds": 1, "burst": 0}})
        c.request("POST", "/admin/v1/tokens", body=body,
                  headers={"Authorization": f"Bearer {key}", "Content-Type": "application/json"})
        r = c.getresponse()
        data = json.loads(r.read())
        c.close()
        if r.status != 201:
            sys.exit(f"token creation answered {r.status}: {data}")
        self.stop()
        return data["id"]

    def fill(self, template: str, n: int) -> float:
        """Copies the template's row until the table holds `n` tokens; returns the seconds taken."""
        cols = self.psql("SELECT string_agg(column_name, ', ' ORDER BY ordinal_position) FROM information_schema.columns "
                         "WHERE table_name = 'tokens' AND table_schema = current_schema()").split(", ")
        made = {
            # 12 base62 characters: 'b' and 11 hex digits of the counter.
            "id": "'tok_b' || lpad(to_hex(i), 11, '0')",
            "hash": "sha256(('kgbench-' || i)::bytea)",
            "name": "'bench-' || i",
            "state": "'active'",
            "created_at": "t.created_at + i",
            "updated_at": "t.created_at + i",
        }
        select = ", ".join(made.get(c, f"t.{c}") for c in cols)
        log(f"inserting {n - 1:,} copies of token {template} (columns: {', '.join(cols)})")
        t0 = time.monotonic()
        self.psql(f"INSERT INTO tokens ({', '.join(cols)}) SELECT {select} FROM tokens t, "
                  f"generate_series(1, {n - 1}) AS i WHERE t.id = '{template}'")
        took = time.monotonic() - t0
        self.psql("VACUUM ANALYZE tokens")
        total = int(self.psql("SELECT count(*) FROM tokens WHERE state = 'active'"))
        size = self.psql("SELECT pg_size_pretty(pg_total_relation_size('tokens'))")
        log(f"{total:,} active tokens in {took:.1f}s (table with its indexes: {size}; vacuum "
            f"{time.monotonic() - t0 - took:.1f}s)")
        if total != n:
            sys.exit(f"expected {n} tokens, found {total}")
        return took

    # ---- the measurement ----------------------------------------------------------------------

    def snapshot_query(self) -> float:
        """The index's query alone (the columns keygate reads, the live tokens), through psql into
        /dev/null: what PostgreSQL and the transfer take, without keygate."""
        cols = self.psql("SELECT string_agg(column_name, ', ' ORDER BY ordinal_position) FROM information_schema.columns "
                         "WHERE table_name = 'tokens' AND table_schema = current_schema()")
        now_ms = int(time.time() * 1000)
        sql = (f"COPY (SELECT {cols} FROM tokens WHERE state <> 'revoked' AND (expires_at IS NULL OR expires_at > "
               f"{now_ms})) TO STDOUT (FORMAT binary)")
        t0 = time.monotonic()
        with open(os.devnull, "wb") as null:
            subprocess.run(["psql", self.url, "-qAt", "-c", sql], stdout=null, check=True)
        took = time.monotonic() - t0
        log(f"the snapshot's query alone (psql COPY … TO STDOUT, binary, into /dev/null): {took:.2f}s")
        return took

    def once(self, i: int) -> dict:
        p, t0 = self.start(f"run-{i}.log")
        ready = self.wait_ready(p)
        took = time.monotonic() - t0
        cpu = cpu_seconds(p.pid)
        phases = self.phases(self.dir / f"run-{i}.log", self.wall0)
        at_ready = memory(p.pid)
        time.sleep(self.args.settle)
        later = memory(p.pid)
        self.stop()
        r = {"run": i, "ready_s": took, "tokens": ready["token_index"]["tokens"], "cpu_s": cpu,
             "hwm_mib_at_ready": at_ready[0] / 1024, "rss_mib_at_ready": at_ready[1] / 1024,
             "hwm_mib": later[0] / 1024, "rss_mib": later[1] / 1024, **phases}
        log(f"run {i}: ready after {took:.2f}s with {r['tokens']:,} tokens; VmHWM {r['hwm_mib']:.0f} MiB, "
            f"VmRSS {r['rss_mib']:.0f} MiB ({self.args.settle:g}s after; at readiness {r['hwm_mib_at_ready']:.0f} / "
            f"{r['rss_mib_at_ready']:.0f} MiB); store opened at {r.get('store_opened_s', float('nan')):.2f}s, "
            f"index loaded at {r.get('index_loaded_s', float('nan')):.2f}s; {cpu:.2f}s of CPU (user + sys) by then")
        return r

    @staticmethod
    def phases(logfile: Path, wall0: float) -> dict:
        """When keygate logged "store opened" and "token index loaded", in seconds from the spawn
        (its log timestamps are UTC wall-clock time)."""
        out = {}
        for line in logfile.read_text(errors="replace").splitlines():
            for key, text in (("store_opened_s", "store opened"), ("index_loaded_s", "token index loaded")):
                if text in line and key not in out:
                    stamp = line.split()[0].rstrip("Z")
                    try:
                        at = dt.datetime.fromisoformat(stamp).replace(tzinfo=dt.timezone.utc).timestamp()
                    except ValueError:
                        continue
                    out[key] = at - wall0
        return out


def cpu_seconds(pid: int) -> float:
    """User + system time of the process (all its threads) so far, in seconds."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    fields = stat[stat.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def memory(pid: int) -> tuple[int, int]:
    """(VmHWM, VmRSS) of the process, in KiB."""
    hwm = rss = 0
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            hwm = int(line.split()[1])
        elif line.startswith("VmRSS:"):
            rss = int(line.split()[1])
    return hwm, rss


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--keygate", required=True, help="the keygate binary (a release build)")
    ap.add_argument("--pg", default="postgres://postgres@127.0.0.1:5432",
                    help="the PostgreSQL server, without a database name (default postgres://postgres@127.0.0.1:5432)")
    ap.add_argument("--tokens", type=int, default=1_000_000, help="tokens in the store (default 1000000)")
    ap.add_argument("--runs", type=int, default=3, help="start-ups measured (default 3)")
    ap.add_argument("--settle", type=float, default=3.0, help="seconds after readiness to read memory again (default 3)")
    ap.add_argument("--base-port", type=int, default=28300, help="admin port; the gateway's is the next (default 28300)")
    ap.add_argument("--json", metavar="PATH", help="also write the results there")
    args = ap.parse_args()
    if shutil.which("psql") is None:
        sys.exit("psql is missing (Debian: postgresql-client)")
    args.keygate = str(Path(args.keygate).resolve())

    run = Run(args)
    atexit.register(run.cleanup)
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, lambda *_: sys.exit(130))
    version = subprocess.run([args.keygate, "--version"], capture_output=True, text=True).stdout.strip()
    pg = subprocess.run(["psql", f"{args.pg.rstrip('/')}/postgres", "-qAt", "-c", "SHOW server_version"],
                        capture_output=True, text=True).stdout.strip()
    log(f"{version}, PostgreSQL {pg}, {os.cpu_count()} cores, load average {os.getloadavg()[0]:.2f}")
    run.create_db()
    template = run.template_token()
    fill_s = run.fill(template, args.tokens)
    results = [run.once(i + 1) for i in range(args.runs)]
    query_s = run.snapshot_query()
    med = {k: statistics.median(r[k] for r in results) for k in ("ready_s", "hwm_mib", "rss_mib", "cpu_s")}
    print()
    print(f"{'run':>4} {'ready s':>8} {'tokens':>10} {'VmHWM MiB':>10} {'VmRSS MiB':>10} {'store s':>8} {'index s':>8}")
    for r in results:
        print(f"{r['run']:>4} {r['ready_s']:>8.2f} {r['tokens']:>10,} {r['hwm_mib']:>10.0f} {r['rss_mib']:>10.0f} "
              f"{r.get('store_opened_s', float('nan')):>8.2f} {r.get('index_loaded_s', float('nan')):>8.2f}")
    print(f"{'med':>4} {med['ready_s']:>8.2f} {'':>10} {med['hwm_mib']:>10.0f} {med['rss_mib']:>10.0f}")
    print(f"\n{'MET    ' if med['ready_s'] <= 10 else 'NOT MET'}  ready within 10 s with {args.tokens:,} tokens: "
          f"median {med['ready_s']:.2f}s")
    if args.json:
        Path(args.json).write_text(json.dumps({"version": version, "postgres": pg, "tokens": args.tokens,
                                               "fill_s": fill_s, "runs": results, "median": med, "query_s": query_s,
                                               "load_after": os.getloadavg()}, indent=1))


if __name__ == "__main__":
    main()
