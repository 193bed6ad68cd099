#!/usr/bin/env python3
"""Several keygate nodes on one PostgreSQL database and one Redis (issue 14): the combined
throughput of three nodes behind a round-robin client, against one node alone, in one run.

Four keygate processes of one binary form one cluster: the same `database_url` (a database made
for the run, `kgbench_<random>`, dropped at the end), the same pepper (`KEYGATE_PEPPER`, random
for the run), the same `[redis]` (`url`, one `key_prefix` for the run), each with its own data
directory, admin port, gateway port and `[cluster] node_id`, all in front of one upstream (an
nginx with one worker answering `return 200 "ok"`, as in bench/gateway.py):

  solo   gateway.threads = 2: the one node one would run on this machine
  a b c  gateway.threads = 1 each: three nodes on two cores, one thread each

`solo` creates the tokens through its admin API before the others start (10,000, 500 of them then
revoked, each with bench/gateway.py's rate limit of 1,000,000 requests per second, so every
request takes the limiter's path, through Redis, and none is refused). Then three variants are
measured, interleaved round by round (bench/gateway.py's order: rotated, reversed every other
round), the nodes not under load staying up and idle:

  one-2t    `wrk -t2 -c64` against solo
  one-1t    `wrk -t2 -c64` against node a alone
  three-1t  three `wrk -t1 -c21` at once, one per node a, b, c (one wrk talks to one host, so
            round-robin over the three is three clients started together), their rates summed

CPU per request is utime + stime of the nodes under load (all their threads), over the requests
they completed; the idle nodes' own CPU is reported apart. Around each run the nodes' `/metrics`
give the calls to Redis, the requests that waited for a lease and those decided locally.

    python3 bench/nodes.py --keygate /tmp/kg-release/keygate
    python3 bench/nodes.py --keygate target/release/keygate --rounds 1 --seconds 3   # quick

Needs psql, redis-cli, nginx and wrk. Every process, the database and the Redis keys it made are
removed when it ends, including on Ctrl-C.
"""

from __future__ import annotations

import argparse
import atexit
import base64
import json
import os
import random
import re
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.dont_write_bytecode = True  # no bench/__pycache__ from the import below
import gateway as g  # noqa: E402 (the gateway bench's pieces: processes, nginx, wrk script, tokens)

NODES = {"solo": 2, "a": 1, "b": 1, "c": 1}  # name: gateway threads
VARIANTS = {"one-2t": ["solo"], "one-1t": ["a"], "three-1t": ["a", "b", "c"]}

CFG = """\
data_dir = "{dir}/data"
database_url = "{url}"
usage_flush_seconds = 5

[admin]
listen = "127.0.0.1:{admin}"

[gateway]
listen = "127.0.0.1:{port}"
threads = {threads}
access_log = false
demo = false

[log]
level = "warn"
format = "text"

[cluster]
node_id = "kgbench-{name}"

[redis]
url = "{redis}"
key_prefix = "{prefix}"

[[routes]]
id = "bench"
path = "/"
upstream = "http://127.0.0.1:{upstream}"
"""

COUNTERS = dict(g.SHARED_COUNTERS)


class Cluster:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.dir = Path(args.workdir)
        rnd = random.SystemRandom()
        self.db = f"kgbench_{rnd.getrandbits(40):010x}"
        self.prefix = f"kgbench-nodes-{rnd.getrandbits(32):08x}"
        self.url = f"{args.pg.rstrip('/')}/{self.db}"
        self.env = dict(os.environ, KEYGATE_PEPPER=base64.b64encode(os.urandom(32)).decode())
        self.upstream = args.base_port
        self.ports = {n: (args.base_port + 1 + 2 * i, args.base_port + 2 + 2 * i) for i, n in enumerate(NODES)}
        self.pids: dict[str, int] = {}
        self.db_made = False

    def sh(self, argv: list[str]) -> str:
        return subprocess.run(argv, capture_output=True, text=True, check=True, timeout=120).stdout

    def psql(self, sql: str) -> str:
        return self.sh(["psql", f"{self.args.pg.rstrip('/')}/postgres", "-v", "ON_ERROR_STOP=1", "-qAt", "-c", sql])

    # ---- setup --------------------------------------------------------------------------------

    def prepare(self) -> None:
        marker = self.dir / ".keygate-bench"
        if self.dir.exists() and any(self.dir.iterdir()):
            if not marker.exists():
                sys.exit(f"{self.dir} is not empty and was not made by this script; choose another --workdir")
            shutil.rmtree(self.dir)
        for sub in ["raw", "upstream/tmp", *NODES]:
            (self.dir / sub).mkdir(parents=True, exist_ok=True)
        marker.touch()
        self.psql(f"CREATE DATABASE {self.db}")
        self.db_made = True
        g.log(f"database {self.db}; Redis key prefix {self.prefix}")

    def config(self, name: str) -> Path:
        port, admin = self.ports[name]
        cfg = self.dir / name / "keygate.toml"
        cfg.write_text(CFG.format(dir=self.dir / name, url=self.url, admin=admin, port=port, threads=NODES[name],
                                  name=name, redis=self.args.redis_url, prefix=self.prefix, upstream=self.upstream))
        return cfg

    def spawn(self, name: str) -> None:
        p = g.PROCS.start(name, [self.args.keygate, "serve", "--config", str(self.config(name))],
                          self.dir / name / "stdout.log", self.env)
        self.pids[name] = p.pid
        status = g.wait_http(self.ports[name][1], "/readyz", timeout=60)
        if status != 200:
            sys.exit(f"node {name} is not ready ({status})")

    def start(self) -> None:
        up = self.dir / "upstream"
        (up / "nginx.conf").write_text(g.NGINX_COMMON.format(
            workers=1, dir=up, body=g.UPSTREAM_BODY.format(port=self.upstream)))
        p = g.PROCS.start("upstream", ["nginx", "-c", str(up / "nginx.conf"), "-p", str(up)], up / "stdout.log")
        self.pids["upstream"] = p.pid
        g.wait_http(self.upstream)
        out = subprocess.run([self.args.keygate, "root-key", "create", "--name", "bench", "--config",
                              str(self.config("solo")), "--output", "json"],
                             capture_output=True, text=True, check=True, env=self.env).stdout
        key = json.loads(out)["key"]
        self.spawn("solo")
        # The gateway bench's token maker, on this node's admin listener.
        made = SimpleNamespace(args=self.args, valid=[], invalid=[])
        g.Bench.create_tokens(made, key, self.ports["solo"][1])
        self.valid, self.invalid = made.valid, made.invalid
        pool = self.valid + self.invalid
        random.Random(7).shuffle(pool)
        (self.dir / "tokens.txt").write_text("\n".join(pool) + "\n")
        (self.dir / "tokens.lua").write_text(g.WRK_LUA)
        for name in ["a", "b", "c"]:
            self.spawn(name)
        for name in NODES:
            port = self.ports[name][0]
            got = tuple(g.get_status(port, t) for t in (self.valid[0], self.invalid[0], None))
            if got != (200, 401, 401):
                sys.exit(f"node {name} answered {got} (valid, revoked, none); expected (200, 401, 401)")
        nodes = {n: self.metrics(n).get("keygate_shared_limits_nodes") for n in NODES}
        g.log(f"every node answers as expected; live nodes each one counts: {nodes}")

    # ---- measuring ----------------------------------------------------------------------------

    def metrics(self, name: str) -> dict[str, float]:
        c = g.connection(self.ports[name][1])
        c.request("GET", "/metrics")
        r = c.getresponse()
        text = r.read().decode()
        c.close()
        out = {}
        for line in text.splitlines():
            if line and not line.startswith("#"):
                k, _, v = line.rpartition(" ")
                try:
                    out[k] = float(v)
                except ValueError:
                    pass
        return out

    def counters(self, nodes: list[str]) -> dict[str, float]:
        total = dict.fromkeys(COUNTERS, 0.0)
        for n in nodes:
            m = self.metrics(n)
            for k, name in COUNTERS.items():
                total[k] += m.get(name, 0.0)
        return total

    def run_once(self, variant: str, seconds: int, tag: str) -> dict:
        nodes = VARIANTS[variant]
        idle = [n for n in NODES if n not in nodes]
        conns = self.args.connections if len(nodes) == 1 else self.args.connections // len(nodes)
        threads = self.args.wrk_threads if len(nodes) == 1 else 1
        env = dict(os.environ, KG_BENCH_TOKENS=str(self.dir / "tokens.txt"), KG_BENCH_THREADS=str(threads))
        argvs = [["wrk", f"-t{threads}", f"-c{conns}", f"-d{seconds}s", "--timeout", "5s", "-s",
                  str(self.dir / "tokens.lua"), f"http://127.0.0.1:{self.ports[n][0]}/bench"] for n in nodes]
        pids = [p for n in nodes for p in g.process_tree(self.pids[n])]
        idle_pids = [p for n in idle for p in g.process_tree(self.pids[n])]
        up_pids = g.process_tree(self.pids["upstream"])
        c0 = self.counters(nodes)
        redis0 = g.cpu_ticks(self.redis_pids)
        busy0, (u0, s0), i0, up0 = g.machine_busy_ticks(), g.cpu_split(pids), g.cpu_ticks(idle_pids), g.cpu_ticks(up_pids)
        kids0 = resource.getrusage(resource.RUSAGE_CHILDREN)
        t0 = time.time()
        procs = [subprocess.Popen(a, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for a in argvs]
        outs = [p.communicate()[0] for p in procs]
        wall = time.time() - t0
        kids1 = resource.getrusage(resource.RUSAGE_CHILDREN)
        (u1, s1), i1, up1, busy1 = g.cpu_split(pids), g.cpu_ticks(idle_pids), g.cpu_ticks(up_pids), g.machine_busy_ticks()
        redis1 = g.cpu_ticks(self.redis_pids)
        c1 = self.counters(nodes)
        hwm = [g.memory_kib(g.process_tree(self.pids[n]))[0] for n in nodes]
        runs = []
        for n, a, out, p in zip(nodes, argvs, outs, procs):
            (self.dir / "raw" / f"{tag}-{variant}-{n}.txt").write_text(" ".join(a) + "\n\n" + out)
            m = re.search(r"^KGBENCH (\{.*\})$", out, re.M)
            if p.returncode != 0 or not m:
                raise RuntimeError(f"wrk against node {n} failed:\n{out}")
            runs.append(json.loads(m.group(1)))
        reqs = sum(r["requests"] for r in runs)
        tick_us = 1e6 / g.CLK_TCK / reqs
        load = round((kids1.ru_utime + kids1.ru_stime - kids0.ru_utime - kids0.ru_stime) * g.CLK_TCK)
        return {
            "variant": variant,
            "requests": reqs,
            "rps": sum(r["requests"] / (r["duration_us"] / 1e6) for r in runs),
            "per_node_rps": [r["requests"] / (r["duration_us"] / 1e6) for r in runs],
            "non_2xx": sum(r["non_2xx"] for r in runs),
            "socket_errors": sum(r["connect_errors"] + r["read_errors"] + r["write_errors"] + r["timeouts"] for r in runs),
            "p50_us": max(r["p50_us"] for r in runs),
            "p99_us": max(r["p99_us"] for r in runs),
            "cpu_us_per_req": (u1 - u0 + s1 - s0) * tick_us,
            "user_us_per_req": (u1 - u0) * tick_us,
            "sys_us_per_req": (s1 - s0) * tick_us,
            "idle_nodes_cores": (i1 - i0) / g.CLK_TCK / wall,
            "upstream_us_per_req": (up1 - up0) * tick_us,
            "redis_us_per_req": (redis1 - redis0) * tick_us,
            "wrk_us_per_req": load * tick_us,
            "machine_busy_cores": (busy1 - busy0) / g.CLK_TCK / wall,
            "hwm_mib": [h / 1024 for h in hwm],
            "shared": {k: c1[k] - c0[k] for k in COUNTERS},
        }

    def run(self) -> dict:
        a = self.args
        facts = g.machine_facts(Path(a.keygate))
        facts["load_before"] = os.getloadavg()
        facts["postgres"] = self.sh(["psql", f"{a.pg.rstrip('/')}/postgres", "-qAt", "-c", "SHOW server_version"]).strip()
        info = self.sh(["redis-cli", "-u", a.redis_url, "INFO", "server"])
        facts["redis"] = (re.findall(r"redis_version:(\S+)", info) or ["?"])[0]
        # The Redis server's CPU time is read around each run (when it runs on this machine).
        self.redis_pids = [int(x) for x in re.findall(r"process_id:(\d+)", info) if Path(f"/proc/{x}/stat").exists()]
        started = time.time()
        self.prepare()
        self.start()
        names = list(VARIANTS)
        g.log(f"warm-up: {a.warmup}s per variant")
        for v in names:
            self.run_once(v, a.warmup, "warmup")
        thr: dict[str, list[dict]] = {v: [] for v in names}
        for rnd in range(a.rounds):
            order = g.interleave(names, rnd)
            for v in order:
                r = self.run_once(v, a.seconds, f"r{rnd + 1}")
                r["round"] = rnd + 1
                thr[v].append(r)
            g.log(f"round {rnd + 1}/{a.rounds} ({'→'.join(order)}): " + "  ".join(
                f"{v}={thr[v][-1]['rps']:,.0f} (waits {thr[v][-1]['shared']['waits']:,.0f}, "
                f"local {thr[v][-1]['shared']['local']:,.0f})" for v in names))
        after = {}
        for n in NODES:
            m = self.metrics(n)
            after[n] = {
                "limiter_allowed": m.get('keygate_gateway_limiter_decisions_total{decision="allowed"}', 0.0),
                "limiter_refused": m.get('keygate_gateway_limiter_decisions_total{decision="refused"}', 0.0),
                "up": m.get("keygate_shared_limits_up", float("nan")),
                "nodes": m.get("keygate_shared_limits_nodes", float("nan")),
                **{k: m.get(name, float("nan")) for k, name in COUNTERS.items()},
            }
            g.log(f"node {n}: " + ", ".join(f"{k} {x:,.0f}" for k, x in after[n].items()))
        facts["load_after"] = os.getloadavg()
        facts["minutes"] = (time.time() - started) / 60
        summary = {}
        for v in names:
            runs = thr[v]
            ratios = [x["rps"] / y["rps"] for x, y in zip(runs, thr["one-2t"])]
            summary[v] = {
                "rps": statistics.median(r["rps"] for r in runs),
                "vs_one_2t": statistics.median(ratios),
                "vs_one_2t_range": [min(ratios), max(ratios)],
                **{k: statistics.median(r[k] for r in runs) for k in (
                    "cpu_us_per_req", "user_us_per_req", "sys_us_per_req", "p50_us", "p99_us", "idle_nodes_cores",
                    "upstream_us_per_req", "redis_us_per_req", "wrk_us_per_req", "machine_busy_cores")},
                "non_2xx_share": sum(r["non_2xx"] for r in runs) / sum(r["requests"] for r in runs),
                "socket_errors": sum(r["socket_errors"] for r in runs),
                "shared": {k: sum(r["shared"][k] for r in runs) for k in COUNTERS},
                "requests": sum(r["requests"] for r in runs),
            }
        return {"facts": facts, "params": {k: v for k, v in vars(a).items()}, "throughput": thr,
                "summary": summary, "after": after, "db": self.db, "prefix": self.prefix}

    # ---- cleaning up --------------------------------------------------------------------------

    def cleanup(self) -> None:
        g.PROCS.stop_all()
        if self.db_made:
            try:
                self.psql(f"DROP DATABASE IF EXISTS {self.db} WITH (FORCE)")
                self.db_made = False
                g.log(f"database {self.db} dropped")
            except subprocess.CalledProcessError as e:
                g.log(f"could not drop {self.db}: {e.stderr}")
        try:
            keys = [k for k in self.sh(["redis-cli", "-u", self.args.redis_url, "--scan", "--pattern",
                                        f"{{{self.prefix}:*"]).split() if k]
            for i in range(0, len(keys), 500):
                self.sh(["redis-cli", "-u", self.args.redis_url, "DEL", *keys[i : i + 500]])
            g.log(f"deleted {len(keys)} Redis keys of prefix {self.prefix}")
        except (OSError, subprocess.SubprocessError) as e:
            g.log(f"could not delete the Redis keys {{{self.prefix}:*: {e}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--keygate", required=True, help="the keygate binary (a release build)")
    ap.add_argument("--pg", default="postgres://postgres@127.0.0.1:5432", help="PostgreSQL server, no database name")
    ap.add_argument("--redis-url", default="redis://127.0.0.1:6379")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--seconds", type=int, default=8)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--tokens", type=int, default=10_000)
    ap.add_argument("--invalid", type=int, default=500)
    ap.add_argument("--connections", type=int, default=64, help="in all; split evenly over the nodes (default 64)")
    ap.add_argument("--wrk-threads", type=int, default=2, help="wrk threads against one node (default 2)")
    ap.add_argument("--base-port", type=int, default=28400, help="nine ports from here (default 28400)")
    ap.add_argument("--workdir", default="/tmp/keygate-bench-nodes")
    args = ap.parse_args()
    for tool in ("psql", "redis-cli", "nginx", "wrk"):
        if shutil.which(tool) is None:
            sys.exit(f"{tool} is missing")
    args.keygate = str(Path(args.keygate).resolve())
    cluster = Cluster(args)
    atexit.register(cluster.cleanup)
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, lambda *_: sys.exit(130))
    res = cluster.run()
    res["facts"]["command"] = "python3 bench/nodes.py " + " ".join(sys.argv[1:])
    (cluster.dir / "results.json").write_text(json.dumps(res, indent=1))
    s = res["summary"]
    print()
    print(f"{'variant':<10} {'req/s':>9} {'×one-2t':>8} {'cpu µs':>7} {'user':>6} {'sys':>6} {'p99 ms':>7} "
          f"{'redis':>6} {'calls':>8} {'waits':>7} {'local':>7} {'idle cores':>10}")
    for v, r in s.items():
        print(f"{v:<10} {r['rps']:>9,.0f} {r['vs_one_2t']:>8.2f} {r['cpu_us_per_req']:>7.1f} {r['user_us_per_req']:>6.1f} "
              f"{r['sys_us_per_req']:>6.1f} {r['p99_us'] / 1000:>7.2f} {r['redis_us_per_req']:>6.1f} {r['shared']['calls']:>8,.0f} "
              f"{r['shared']['waits']:>7,.0f} {r['shared']['local']:>7,.0f} {r['idle_nodes_cores']:>10.2f}")
    print()
    g.log(f"results.json and raw output in {cluster.dir}")


if __name__ == "__main__":
    main()
