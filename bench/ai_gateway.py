#!/usr/bin/env python3
"""The AI gateway side by side with LiteLLM's proxy (issue 16), against the same upstream.

The upstream is nginx answering an OpenAI chat completion from memory (`return 200 '…'`, with a
usage object; a second location answers a whole SSE stream), so that what is measured is the
gateway, not a model. Three variants call it:

  direct    the load generator to nginx itself (the floor)
  keygate   an `ai` route with a virtual key (scope llm:*), a budget in dollars and a tokens-per-
            minute limit on (each call estimated, checked, settled from the answer's usage,
            priced), anomaly detection and the call log at their defaults (on)
  litellm   LiteLLM's proxy (`litellm --config`, one worker: how it runs on this machine), a
            master key, the model routed to the same nginx

Throughput: closed-loop `wrk` POSTing a chat completion (rounds interleaved). Latency:
open-loop `h2load --h1 --rps` at a fixed rate every variant sustains (half of LiteLLM's median
throughput, at most 500 req/s), its per-request log read for percentiles; added latency is the
variant's minus direct's; then direct and keygate alone at --fast-rate (500 req/s) for
--fast-seconds (20), thousands of samples for a p99 that is not a handful of calls. Time to first byte of a streamed answer: a Python client timing the
first body byte of sequential requests. CPU per call: the process's utime + stime over the
throughput runs, per completed request.

Usage: python3 bench/ai_gateway.py [--keygate BIN] [--rounds N] [--seconds S] [--no-doc]
Needs: nginx, wrk, h2load (installed with apt-get when missing), LiteLLM in target/ai-venv
(scripts/interop-test makes it, from tests/interop/requirements-ai.txt; made here otherwise).
Results: target/ai-bench/results.json, and docs/benchmarks.md between the ai-bench markers.
"""

import argparse
import json
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "target" / "ai-bench"
AI_VENV = ROOT / "target" / "ai-venv"
BEGIN = "<!-- ai-bench:begin — written by bench/ai_gateway.py; a rerun replaces what is inside -->"
END = "<!-- ai-bench:end -->"
PROVIDER_KEY = "sk-bench-provider"
MASTER_KEY = "sk-bench-litellm-master"

ANSWER = json.dumps({
    "id": "chatcmpl-bench", "object": "chat.completion", "created": 1700000000, "model": "gpt-bench",
    "choices": [{"index": 0, "message": {"role": "assistant", "content": "Hello! How can I help you today?"},
                 "finish_reason": "stop", "logprobs": None}],
    "usage": {"prompt_tokens": 12, "completion_tokens": 9, "total_tokens": 21},
})
CHUNK = lambda d, f=None: json.dumps({  # noqa: E731
    "id": "chatcmpl-bench", "object": "chat.completion.chunk", "created": 1700000000, "model": "gpt-bench",
    "choices": [{"index": 0, "delta": d, "finish_reason": f}]})
STREAM = "".join(f"data: {c}\n\n" for c in [
    CHUNK({"role": "assistant", "content": ""}), CHUNK({"content": "Hello!"}), CHUNK({"content": " How can I help?"}),
    CHUNK({}, "stop"),
    json.dumps({"id": "chatcmpl-bench", "object": "chat.completion.chunk", "created": 1700000000, "model": "gpt-bench",
                "choices": [], "usage": {"prompt_tokens": 12, "completion_tokens": 5, "total_tokens": 17}}),
]) + "data: [DONE]\n\n"
BODY = json.dumps({"model": "bench", "messages": [{"role": "system", "content": "You are helpful."},
                                                  {"role": "user", "content": "Say hello."}], "max_tokens": 50})


def log(msg):
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    p = s.getsockname()[1]
    s.close()
    return p


def ensure_tools():
    missing = [pkg for tool, pkg in {"nginx": "nginx", "wrk": "wrk", "h2load": "nghttp2-client"}.items()
               if shutil.which(tool) is None]
    if missing:
        log(f"installing {' '.join(missing)}")
        env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
        sudo = [] if os.geteuid() == 0 else ["sudo"]
        subprocess.run(sudo + ["apt-get", "update", "-qq"], check=True, env=env)
        subprocess.run(sudo + ["apt-get", "install", "-y", "-qq", *missing], check=True, env=env)
    if not (AI_VENV / "bin" / "litellm").exists():
        log("making target/ai-venv (LiteLLM, pinned)")
        subprocess.run([sys.executable, "-m", "venv", str(AI_VENV)], check=True)
        subprocess.run([str(AI_VENV / "bin" / "pip"), "install", "--quiet", "--disable-pip-version-check", "-r",
                        str(ROOT / "tests" / "interop" / "requirements-ai.txt")], check=True)


def wait_http(url, seconds=60, headers=None):
    deadline = time.time() + seconds
    while time.time() < deadline:
        try:
            with urllib.request.urlopen(urllib.request.Request(url, headers=headers or {}), timeout=2):
                return
        except urllib.error.HTTPError:
            return
        except OSError:
            time.sleep(0.2)
    raise RuntimeError(f"{url} did not answer")


def cpu_seconds(pid):
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def children_cpu(pid):
    """CPU of a process and its descendants (LiteLLM's proxy runs in a child process)."""
    total = 0.0
    pids = [pid]
    while pids:
        p = pids.pop()
        try:
            total += cpu_seconds(p)
            pids += [int(c) for c in Path(f"/proc/{p}/task/{p}/children").read_text().split()]
        except OSError:
            pass
    return total


def pct(sorted_values, q):
    if not sorted_values:
        return None
    k = min(len(sorted_values) - 1, max(0, round(q / 100 * (len(sorted_values) - 1))))
    return sorted_values[k]


class Bench:
    def __init__(self, args):
        self.args = args
        self.work = Path(tempfile.mkdtemp(prefix="keygate-ai-bench."))
        self.procs = []

    def spawn(self, argv, log_name, env=None):
        f = open(self.work / log_name, "w")
        p = subprocess.Popen(argv, stdout=f, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        self.procs.append(p)
        return p

    def stop(self):
        for p in self.procs:
            try:
                os.killpg(p.pid, signal.SIGTERM)
            except OSError:
                pass
        for p in self.procs:
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)

    def start(self):
        w = self.work
        self.up = free_port()
        (w / "nginx.conf").write_text(f"""
worker_processes 1;
daemon off;
pid {w}/nginx.pid;
error_log {w}/nginx-error.log;
events {{ worker_connections 4096; }}
http {{
  access_log off;
  client_body_temp_path {w};
  proxy_temp_path {w}; fastcgi_temp_path {w}; uwsgi_temp_path {w}; scgi_temp_path {w};
  keepalive_requests 1000000;
  server {{
    listen 127.0.0.1:{self.up};
    location = /v1/chat/completions {{ default_type application/json; return 200 '{ANSWER}'; }}
    location = /sse/v1/chat/completions {{ default_type text/event-stream; return 200 '{STREAM}'; }}
  }}
}}
""")
        self.spawn(["nginx", "-c", str(w / "nginx.conf")], "nginx.log")
        wait_http(f"http://127.0.0.1:{self.up}/none", 20)

        # keygate
        self.kg_admin, self.kg_gw = free_port(), free_port()
        (w / "keygate.toml").write_text(f"""
data_dir = "{w}/kg-data"
[admin]
listen = "127.0.0.1:{self.kg_admin}"
[gateway]
listen = "127.0.0.1:{self.kg_gw}"
access_log = false
demo = false
[log]
level = "warn"

[[providers]]
id = "mock"
kind = "openai"
base_url = "http://127.0.0.1:{self.up}/v1"
api_key_env = "BENCH_PROVIDER_KEY"
[providers.prices]
"gpt-bench" = {{ input = 0.15, output = 0.60 }}

[[providers]]
id = "mocksse"
kind = "openai"
base_url = "http://127.0.0.1:{self.up}/sse/v1"
api_key_env = "BENCH_PROVIDER_KEY"
[providers.prices]
"gpt-bench" = {{ input = 0.15, output = 0.60 }}

[[routes]]
id = "llm"
path = "/llm"
kind = "ai"
[routes.ai]
tokens_per_minute = 4000000000
budget = {{ usd = 1000000.0, period = "month" }}
[routes.ai.models]
bench = ["mock/gpt-bench"]
bench-stream = ["mocksse/gpt-bench"]
""")
        env = dict(os.environ, BENCH_PROVIDER_KEY=PROVIDER_KEY, NO_COLOR="1")
        out = subprocess.run([self.args.keygate, "root-key", "create", "--name", "bench", "--config",
                              str(w / "keygate.toml"), "--output", "json"], capture_output=True, text=True, env=env,
                             check=True)
        root = json.loads(out.stdout)["key"]
        self.kg = self.spawn([self.args.keygate, "serve", "--config", str(w / "keygate.toml")], "keygate.log", env)
        wait_http(f"http://127.0.0.1:{self.kg_admin}/admin/v1/health", 60)
        req = urllib.request.Request(f"http://127.0.0.1:{self.kg_admin}/admin/v1/tokens", method="POST",
                                     data=json.dumps({"name": "bench", "scopes": ["llm:*"]}).encode(),
                                     headers={"authorization": f"Bearer {root}", "content-type": "application/json"})
        with urllib.request.urlopen(req, timeout=10) as r:
            self.vk = json.load(r)["token"]

        # LiteLLM's proxy
        self.ll = free_port()
        (w / "litellm.yaml").write_text(f"""
model_list:
  - model_name: bench
    litellm_params:
      model: openai/gpt-bench
      api_base: http://127.0.0.1:{self.up}/v1
      api_key: {PROVIDER_KEY}
  - model_name: bench-stream
    litellm_params:
      model: openai/gpt-bench
      api_base: http://127.0.0.1:{self.up}/sse/v1
      api_key: {PROVIDER_KEY}
litellm_settings:
  telemetry: false
""")
        env = dict(os.environ, LITELLM_MASTER_KEY=MASTER_KEY, LITELLM_LOCAL_MODEL_COST_MAP="True",
                   LITELLM_TELEMETRY="False", LITELLM_LOG="ERROR")
        self.litellm = self.spawn([str(AI_VENV / "bin" / "litellm"), "--config", str(w / "litellm.yaml"), "--host",
                                   "127.0.0.1", "--port", str(self.ll)], "litellm.log", env)
        wait_http(f"http://127.0.0.1:{self.ll}/health/liveliness", 120)

        self.variants = {
            "direct": (f"http://127.0.0.1:{self.up}/v1/chat/completions", PROVIDER_KEY, None),
            "keygate": (f"http://127.0.0.1:{self.kg_gw}/llm/v1/chat/completions", self.vk, self.kg.pid),
            "litellm": (f"http://127.0.0.1:{self.ll}/v1/chat/completions", MASTER_KEY, self.litellm.pid),
        }
        for name, (url, key, _) in self.variants.items():
            status, body = self.post(url, key, BODY)
            if status != 200 or "Hello!" not in body:
                raise RuntimeError(f"{name} does not answer a chat completion: {status} {body[:300]}")
        (w / "body.json").write_text(BODY)

    def post(self, url, key, body):
        req = urllib.request.Request(url, data=body.encode(), method="POST",
                                     headers={"authorization": f"Bearer {key}", "content-type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=30) as r:
                return r.status, r.read().decode()
        except urllib.error.HTTPError as e:
            return e.code, e.read().decode()

    def wrk(self, name):
        url, key, pid = self.variants[name]
        lua = self.work / "post.lua"
        lua.write_text(f'wrk.method = "POST"\nwrk.body = {json.dumps(BODY)}\n'
                       f'wrk.headers["Content-Type"] = "application/json"\n'
                       f'wrk.headers["Authorization"] = "Bearer {key}"\n')
        cpu0 = children_cpu(pid) if pid else None
        out = subprocess.run(["wrk", "-t2", f"-c{self.args.connections}", f"-d{self.args.seconds}s", "--timeout", "30s",
                              "-s", str(lua), url], capture_output=True, text=True, check=True).stdout
        cpu = children_cpu(pid) - cpu0 if pid else None
        reqs = int(re.search(r"(\d+) requests in", out).group(1))
        rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))
        non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
        return {"rps": rps, "requests": reqs, "non_2xx": int(non2xx.group(1)) if non2xx else 0,
                "cpu_us_per_req": cpu / reqs * 1e6 if cpu is not None and reqs else None}

    def h2load(self, name, rate, seconds=None):
        url, key, _ = self.variants[name]
        clients = 4
        logf = self.work / f"h2load-{name}-{rate}.tsv"
        argv = ["h2load", "--h1", "-t1", f"-c{clients}", f"--rps={max(1, round(rate / clients))}",
                f"-D{seconds or self.args.seconds}", "--warm-up-time=1", "-d", str(self.work / "body.json"),
                "-H", f"Authorization: Bearer {key}", "-H", "Content-Type: application/json", f"--log-file={logf}", url]
        out = subprocess.run(argv, capture_output=True, text=True)
        if out.returncode != 0:
            raise RuntimeError(f"h2load against {name}: {out.stdout}{out.stderr}")
        rows = [tuple(int(x) for x in line.split("\t")[:3]) for line in logf.read_text().splitlines() if line.count("\t") >= 2]
        first = min(r[0] for r in rows)
        kept = sorted(r[2] for r in rows if r[0] >= first + 1_000_000)
        return {"requests": len(rows), "non_2xx": sum(1 for r in rows if not 200 <= r[1] < 300),
                "p50_us": pct(kept, 50), "p99_us": pct(kept, 99), "p999_us": pct(kept, 99.9)}

    def ttfb(self, name, n=200):
        """Time to the first body byte of a streamed answer, over one keep-alive connection."""
        import http.client
        url, key, _ = self.variants[name]
        # Direct: nginx's streamed answer; the gateways: the model routed to it.
        m = re.match(r"http://([^/]+)(/.*)", url.replace("/v1/chat", "/sse/v1/chat") if name == "direct" else url)
        host, path = m.group(1), m.group(2)
        body = json.dumps(dict(json.loads(BODY), model="bench-stream", stream=True))
        conn = http.client.HTTPConnection(host, timeout=30)
        times = []
        for i in range(n + 10):
            t0 = time.perf_counter_ns()
            conn.request("POST", path, body=body, headers={"authorization": f"Bearer {key}",
                                                           "content-type": "application/json"})
            r = conn.getresponse()
            r.read(1)
            t1 = time.perf_counter_ns()
            rest = r.read()
            if r.status != 200 or (b"Hello" not in rest and i == 0):
                raise RuntimeError(f"{name} stream: {r.status} {rest[:200]}")
            if i >= 10:
                times.append((t1 - t0) / 1000)
        conn.close()
        times.sort()
        return {"p50_us": pct(times, 50), "p99_us": pct(times, 99)}

    def run(self):
        self.start()
        names = ["direct", "keygate", "litellm"]
        thr = {n: [] for n in names}
        for r in range(self.args.rounds):
            for n in names:
                log(f"throughput round {r + 1}: {n}")
                thr[n].append(self.wrk(n))
        med = {n: statistics.median(x["rps"] for x in thr[n]) for n in names}
        rate = int(min(500, med["litellm"] / 2))
        lat = {}
        for n in names:
            log(f"latency at {rate} req/s: {n}")
            lat[n] = self.h2load(n, rate)
        # The gateway's own overhead measured with many more samples than LiteLLM's rate gives
        # (a p99 of a few hundred calls is their third-slowest): direct and keygate only.
        fast = {}
        for n in ["direct", "keygate"]:
            log(f"latency at {self.args.fast_rate} req/s: {n}")
            fast[n] = self.h2load(n, self.args.fast_rate, self.args.fast_seconds)
        ttfb = {}
        for n in names:
            log(f"time to first streamed byte: {n}")
            ttfb[n] = self.ttfb(n)
        return {"throughput": thr, "median_rps": med, "latency_rate": rate, "latency": lat, "ttfb": ttfb,
                "fast_rate": self.args.fast_rate, "fast_latency": fast,
                "cpu": {n: statistics.median(x["cpu_us_per_req"] for x in thr[n]) if thr[n][0]["cpu_us_per_req"]
                        else None for n in names}}


def machine():
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), "?")
    return f"{os.cpu_count()} cores ({cpu})"


def render(res, args):
    m, lat, tt, cpu = res["median_rps"], res["latency"], res["ttfb"], res["cpu"]
    d = lat["direct"]
    add = lambda n, k: (lat[n][k] - d[k]) / 1000  # noqa: E731
    addt = lambda n, k: (tt[n][k] - tt["direct"][k]) / 1000  # noqa: E731
    lines = [
        BEGIN,
        f"Run of {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} on {machine()}, all processes on one machine; "
        f"{args.rounds} rounds of `wrk -t2 -c{args.connections} -d{args.seconds}s` (POST of a chat completion), "
        f"latency with `h2load --h1 -c4 --rps` at {res['latency_rate']} req/s, time to first byte over 200 sequential "
        "streamed calls.",
        "",
        "| variant | throughput, req/s (median) | × LiteLLM | p50 latency | p99 latency | added p99 | CPU per call | "
        "first streamed byte, p50 / p99 | added p99 |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for n in ["direct", "keygate", "litellm"]:
        c = f"{cpu[n]:.0f} µs" if cpu.get(n) else "—"
        added = "—" if n == "direct" else f"{add(n, 'p99_us'):.2f} ms"
        added_t = "—" if n == "direct" else f"{addt(n, 'p99_us'):.2f} ms"
        lines.append(
            f"| {n} | {m[n]:,.0f} | {m[n] / m['litellm']:.1f} | {lat[n]['p50_us'] / 1000:.2f} ms | "
            f"{lat[n]['p99_us'] / 1000:.2f} ms | {added} | {c} | "
            f"{tt[n]['p50_us'] / 1000:.2f} / {tt[n]['p99_us'] / 1000:.2f} ms | {added_t} |")
    f = res.get("fast_latency")
    if f:
        fd, fk = f["direct"], f["keygate"]
        lines += [
            "",
            f"The gateway's own overhead with more samples: at {res['fast_rate']} req/s for {args.fast_seconds} s "
            f"({fk['requests']:,} calls, direct and keygate only), keygate p50 {fk['p50_us'] / 1000:.2f} ms, "
            f"p99 {fk['p99_us'] / 1000:.2f} ms, p99.9 {fk['p999_us'] / 1000:.2f} ms; direct p50 "
            f"{fd['p50_us'] / 1000:.2f} ms, p99 {fd['p99_us'] / 1000:.2f} ms: **added p50 "
            f"{(fk['p50_us'] - fd['p50_us']) / 1000:.2f} ms, added p99 {(fk['p99_us'] - fd['p99_us']) / 1000:.2f} ms**.",
        ]
    lines += ["", END]
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--keygate", default=str(ROOT / "target" / "release" / "keygate"))
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--seconds", type=int, default=10)
    ap.add_argument("--connections", type=int, default=32)
    ap.add_argument("--fast-rate", type=int, default=500)
    ap.add_argument("--fast-seconds", type=int, default=20)
    ap.add_argument("--no-doc", action="store_true")
    args = ap.parse_args()
    ensure_tools()
    b = Bench(args)
    try:
        res = b.run()
    finally:
        b.stop()
        OUT.mkdir(parents=True, exist_ok=True)
        for f in ["keygate.log", "litellm.log"]:
            if (b.work / f).exists():
                shutil.copy2(b.work / f, OUT / f)
        shutil.rmtree(b.work, ignore_errors=True)
    (OUT / "results.json").write_text(json.dumps(res, indent=2))
    table = render(res, args)
    print(table)
    if not args.no_doc:
        doc = ROOT / "docs" / "benchmarks.md"
        text = doc.read_text()
        if BEGIN in text:
            text = text[:text.index(BEGIN)] + table + text[text.index(END) + len(END):]
        else:
            text += "\n## The AI gateway against LiteLLM's proxy\n\n" + table + "\n"
        doc.write_text(text)


if __name__ == "__main__":
    main()
