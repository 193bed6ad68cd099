#!/usr/bin/env python3
"""Counts what one gateway request costs keygate in instructions and simulated cache misses.

`bench/gateway.py` measures time on a shared machine, where one run differs from the next by a
few percent: more than most single changes to the request path are worth. This script measures
what does not move with the machine: it runs keygate under valgrind (callgrind, with its cache
simulation), sends it a fixed sequence of requests, and reports the instructions (Ir), first-level
data-cache misses (D1) and last-level misses (LL) per request, for the whole process and for the
gateway worker threads alone (the request path, without the background flush and change-feed
tasks). With `--baseline`, two binaries get the same tokens and the same requests, so the
difference is the change's and nothing else's.

It reuses `gateway.py`'s setup (tokens created through the admin API, some revoked; an nginx
upstream answering `return 200 "ok"`), then for each binary runs keygate twice under valgrind:
once with no requests and once with `--requests`, and divides the difference by the requests.

    python3 bench/instructions.py --keygate target/release/keygate --baseline /tmp/keygate-old

Caveats: valgrind hides the SHA extensions from the program, so HMAC-SHA256 runs its portable
code and costs far more instructions here than on the machine (its share is reported apart);
system calls and the kernel's work are not counted; valgrind runs the threads one at a time, so
cache figures are those of one simulated core. Use this for the user-space part of a change,
and `gateway.py` for what the whole machine does.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import gateway as gw  # noqa: E402  (the setup is shared with the throughput benchmark)

EVENTS = ["Ir", "Dr", "D1mr", "DLmr", "Dw", "D1mw", "DLmw"]
WORKER_FN = "keygate_gateway::server::Worker::run::{{closure}}::{{closure}} ["
HMAC_FN = "sha2::sha256::compress256 ["


def drive(port: int, tokens: list[str], n: int, agent: str = "", connections: int = 4) -> dict[int, int]:
    """Sends `n` requests over `connections` keep-alive connections, token i going to connection
    i % connections, in the same order every run; with a `User-Agent` when `agent` is set."""
    codes: dict[int, int] = {}
    lock = threading.Lock()
    failures: list[str] = []

    def worker(w: int) -> None:
        c = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
        mine: dict[int, int] = {}
        try:
            for i in range(w, n, connections):
                headers = {"Authorization": "Bearer " + tokens[i % len(tokens)]}
                if agent:
                    headers["User-Agent"] = agent
                c.request("GET", "/bench", headers=headers)
                r = c.getresponse()
                r.read()
                mine[r.status] = mine.get(r.status, 0) + 1
        except OSError as e:
            failures.append(str(e))
        with lock:
            for k, v in mine.items():
                codes[k] = codes.get(k, 0) + v

    threads = [threading.Thread(target=worker, args=(w,)) for w in range(connections)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if failures:
        raise RuntimeError(f"requests failed: {failures[:3]}")
    return codes


def counts(line: str) -> tuple[list[int], str]:
    """The counts at the start of a `callgrind_annotate` line ("1,234 (0.5%)", or "0" or "." for
    none), and the rest of the line."""
    out, rest = [], line.strip()
    while m := re.match(r"([\d,]+|\.)(?: \([^)]*\))?\s+", rest):
        out.append(0 if m.group(1) == "." else int(m.group(1).replace(",", "")))
        rest = rest[m.end():]
    return out, rest


def inclusive(annotated: str, fn: str) -> list[int]:
    """The inclusive counts of the first line of `callgrind_annotate --inclusive=yes` naming `fn`."""
    for line in annotated.splitlines():
        nums, rest = counts(line)
        if nums and fn in rest:
            return nums
    return []


def run_once(bench: gw.Bench, binary: Path, label: str, n: int, tokens: list[str]) -> dict:
    """keygate under callgrind from a fresh copy of the store, `n` requests, then a graceful stop."""
    d = bench.dir / "runs" / f"{label}-{n}"
    shutil.rmtree(d, ignore_errors=True)
    d.mkdir(parents=True)
    # The store as the tokens were made (by the baseline when there is one: a newer binary
    # migrates an older store forward, not the other way round).
    made_by = "baseline" if (bench.dir / "baseline" / "data").exists() else "keygate"
    shutil.copytree(bench.dir / made_by / "data", d / "data")
    # The variant's own config (a baseline's has --baseline-config), on keygate's ports.
    cfg = (bench.dir / label / "keygate.toml").read_text()
    cfg = cfg.replace(str(bench.dir / label / "data"), str(d / "data"))
    for theirs, ours in zip(bench.keygate_ports(label), bench.keygate_ports("keygate")):
        cfg = cfg.replace(f"127.0.0.1:{theirs}\"", f"127.0.0.1:{ours}\"")
    # No periodic flush while measuring: it would land in one run and not the other.
    cfg = re.sub(r"(?m)^usage_flush_seconds = \d+$", "usage_flush_seconds = 86400", cfg)
    (d / "keygate.toml").write_text(cfg)
    out = d / "callgrind.out"
    env = dict(os.environ)
    env.pop("KEYGATE_PEPPER", None)
    argv = ["valgrind", "--tool=callgrind", "--cache-sim=yes", f"--callgrind-out-file={out}",
            str(binary), "serve", "--config", str(d / "keygate.toml")]
    with open(d / "valgrind.log", "w") as log:
        p = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=env)
        try:
            gw.wait_http(bench.ports.admin, "/admin/v1/health", timeout=600)
            # Let the start-up tasks that run after the listeners open (the JWKS client with its
            # root certificates, the first change-feed poll) finish in both runs alike.
            time.sleep(5)
            codes = drive(bench.ports.keygate, tokens, n, bench.args.user_agent) if n else {}
        finally:
            p.send_signal(signal.SIGTERM)
            p.wait(timeout=600)
    text = subprocess.run(["callgrind_annotate", "--auto=no", "--inclusive=yes", str(out)], capture_output=True, text=True,
                          check=True).stdout
    events = re.search(r"^Events recorded:\s+(.*)$", text, re.M).group(1).split()
    totals = counts(re.search(r"^.*PROGRAM TOTALS.*$", text, re.M).group(0))[0]
    pick = lambda row: {e: row[events.index(e)] if e in events and events.index(e) < len(row) else 0 for e in EVENTS}
    self_text = subprocess.run(["callgrind_annotate", "--auto=no", str(out)], capture_output=True, text=True, check=True).stdout
    functions: dict[str, int] = {}
    for line in self_text.splitlines():
        nums, rest = counts(line)
        if nums and "PROGRAM TOTALS" not in rest and ":" in rest:
            # "file:function [object]": a function inlined into several files is summed.
            name = rest.split(" [")[0].split(":", 1)[-1]
            functions[name] = functions.get(name, 0) + nums[0]
    return {
        "requests": n,
        "codes": codes,
        "total": pick(totals),
        "worker": pick(inclusive(text, WORKER_FN)),
        "hmac": pick(inclusive(text, HMAC_FN)),
        "functions": functions,
    }


def per_request(hi: dict, lo: dict, key: str) -> dict[str, float]:
    n = hi["requests"] - lo["requests"]
    return {e: (hi[key][e] - lo[key][e]) / n for e in EVENTS}


def summary(runs: dict) -> dict:
    lo, hi = runs["0"], runs["n"]
    out = {k: per_request(hi, lo, k) for k in ("total", "worker", "hmac")}
    n = hi["requests"]
    out["functions"] = sorted(
        ((name, (ir - lo["functions"].get(name, 0)) / n) for name, ir in hi["functions"].items()),
        key=lambda x: -x[1],
    )[:20]
    out["codes"] = hi["codes"]
    return out


def show(label: str, s: dict) -> None:
    def misses(r: dict) -> str:
        return f"D1 misses {r['D1mr'] + r['D1mw']:7.1f}, LL misses {r['DLmr'] + r['DLmw']:6.2f}"
    print(f"\n{label}: answers {s['codes']}")
    print(f"  whole process  Ir {s['total']['Ir']:9.0f}   {misses(s['total'])}")
    print(f"  gateway worker Ir {s['worker']['Ir']:9.0f}   {misses(s['worker'])}")
    print(f"    of which HMAC-SHA256 (portable code under valgrind) Ir {s['hmac']['Ir']:7.0f}")
    print(f"    worker without HMAC Ir {s['worker']['Ir'] - s['hmac']['Ir']:9.0f}")
    print("  top functions by own instructions per request:")
    for name, ir in s["functions"][:12]:
        print(f"    {ir:8.0f}  {name[:110]}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--keygate", required=True, help="the keygate binary to measure")
    ap.add_argument("--baseline", help="another keygate binary, measured on the same tokens and requests")
    ap.add_argument("--requests", type=int, default=20_000)
    ap.add_argument("--tokens", type=int, default=3_000)
    ap.add_argument("--invalid", type=int, default=150)
    ap.add_argument("--user-agent", default="", metavar="TEXT",
                    help="a User-Agent for every request (none by default, as wrk sends none)")
    ap.add_argument("--base-port", type=int, default=28380)
    ap.add_argument("--workdir", default="/tmp/keygate-instructions")
    ap.add_argument("--no-install", action="store_true")
    ap.add_argument("--baseline-config", metavar="TOML", default="",
                    help="appended to the baseline's config (as in gateway.py: an A/B of one binary)")
    ap.add_argument("--app-limits", action="store_true", help="as gateway.py's: apps with shared limits")
    ap.add_argument("--deny", type=int, default=0, metavar="N", help="as gateway.py's: a denylist of N networks")
    a = ap.parse_args()
    if not shutil.which("valgrind") or not shutil.which("callgrind_annotate"):
        if a.no_install:
            sys.exit("valgrind is not installed")
        subprocess.run(["apt-get", "update", "-qq"], check=True)
        subprocess.run(["apt-get", "install", "-y", "-qq", "valgrind"], check=True)
    gw.ensure_tools(not a.no_install, False)
    args = argparse.Namespace(
        workdir=a.workdir, base_port=a.base_port, tokens=a.tokens, invalid=a.invalid, workers=2,
        upstream_workers=1, baseline=a.baseline, suite="plain", baseline_config=a.baseline_config, baseline_public=False,
        app_limits=a.app_limits, deny=a.deny, redis_url="", jwts=0, connections=4, wrk_threads=1,
        latency_clients=4, user_agent=a.user_agent,
    )
    bench = gw.Bench(args)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(130))
    try:
        bench.prepare_dir()
        bench.start_upstream()
        binary = Path(a.keygate).resolve()
        bench.start_keygate(binary)
        bench.write_token_files()
        for name in ("keygate", "baseline"):
            if name in bench.pids:
                gw.PROCS.stop(name)
        tokens = [t for t in (bench.dir / "tokens.txt").read_text().split("\n") if t]
        variants = {"keygate": binary}
        if a.baseline:
            variants["baseline"] = Path(a.baseline).resolve()
        results = {}
        for label, b in variants.items():
            gw.log(f"{label}: under callgrind with no requests, then with {a.requests}")
            t0 = time.time()
            runs = {"0": run_once(bench, b, label, 0, tokens), "n": run_once(bench, b, label, a.requests, tokens)}
            gw.log(f"{label}: done in {time.time() - t0:.0f}s")
            results[label] = summary(runs)
    finally:
        gw.PROCS.stop_all()
    for label, s in results.items():
        show(label, s)
    if "baseline" in results:
        k, b = results["keygate"], results["baseline"]
        print("\nkeygate − baseline, per request:")
        for part in ("total", "worker"):
            d = {e: k[part][e] - b[part][e] for e in EVENTS}
            print(f"  {part:7} Ir {d['Ir']:+8.0f}  D1 misses {d['D1mr'] + d['D1mw']:+7.1f}  "
                  f"LL misses {d['DLmr'] + d['DLmw']:+6.2f}")
    (bench.dir / "instructions.json").write_text(json.dumps(results, indent=1))
    gw.log(f"results in {bench.dir / 'instructions.json'}")


if __name__ == "__main__":
    main()
