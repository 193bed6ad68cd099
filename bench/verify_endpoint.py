#!/usr/bin/env python3
"""Latency of the verification endpoint, `POST /admin/v1/verify`, at a fixed request rate.

Starts keygate (a release build by default, or --bin) on free loopback ports with a new data
directory, creates a root key with every permission and one with tokens:verify alone (through the
CLI), creates --tokens tokens through the admin API (each with a scope, a rate limit that never
fires and a monthly quota, so the limiter and the quota counts are on the path), then sends
--requests verifications from --connections keep-alive connections at --rate requests per second
in total, each connection on its own fixed schedule (open loop: a late answer does not delay the
next request's scheduled time, and its latency counts from when it was due).

Reports p50, p90, p99, p99.9 and max, measured by the client from the scheduled send time to the
last byte of the answer, and the same without the wait before sending (the time the server and the
loopback took). The client is Python (standard library, raw sockets, one thread per connection):
its own cost per request (tens of microseconds) is inside the figures, so they are an upper bound
of what keygate adds. A baseline round at the same rate against `GET /admin/v1/health` (the same
listener and HTTP stack, no root key, no verification) shows what the client, the loopback and
axum cost by themselves.

    python3 bench/verify_endpoint.py                          # release build, 20,000 requests
    python3 bench/verify_endpoint.py --bin target/debug/keygate --requests 2000 --rate 500
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def api(url: str, key: str, method: str, path: str, body: dict | None = None) -> dict:
    req = urllib.request.Request(
        url + path,
        data=json.dumps(body).encode() if body is not None else None,
        method=method,
        headers={"Authorization": "Bearer " + key, "Content-Type": "application/json"},
    )
    with urllib.request.urlopen(req, timeout=10) as resp:
        return json.load(resp)


def root_key(binary: str, config: str, name: str, perms: list[str]) -> str:
    args = [binary, "root-key", "create", "--name", name, "--config", config, "--output", "json"]
    for p in perms:
        args += ["--permission", p]
    out = subprocess.run(args, check=True, capture_output=True, text=True).stdout
    return json.loads(out)["key"]


def read_answer(sock: socket.socket, buf: bytearray) -> tuple[int, bytes]:
    """Reads one HTTP/1.1 answer with a Content-Length; returns (status, body)."""
    while b"\r\n\r\n" not in buf:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError("connection closed")
        buf += chunk
    head_end = buf.index(b"\r\n\r\n") + 4
    head = bytes(buf[:head_end]).decode("latin-1")
    status = int(head.split(" ", 2)[1])
    length = 0
    for line in head.split("\r\n")[1:]:
        name, _, value = line.partition(":")
        if name.strip().lower() == "content-length":
            length = int(value.strip())
    while len(buf) < head_end + length:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError("connection closed")
        buf += chunk
    body = bytes(buf[head_end : head_end + length])
    del buf[: head_end + length]
    return status, body


def worker(port: int, requests: list[bytes], start: float, interval: float, out: list, errors: list) -> None:
    sock = socket.create_connection(("127.0.0.1", port))
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    buf = bytearray()
    for i, req in enumerate(requests):
        due = start + i * interval
        now = time.perf_counter()
        if due > now:
            time.sleep(due - now)
        sent = time.perf_counter()
        sock.sendall(req)
        status, body = read_answer(sock, buf)
        done = time.perf_counter()
        if status != 200 or (req.startswith(b"POST") and b'"valid":true' not in body):
            errors.append((status, body[:200]))
        out.append((done - max(due, start), done - sent))
    sock.close()


def pct(values: list[float], p: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, int(p / 100 * len(s)))]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bin", help="a keygate binary (default: build and use target/release/keygate)")
    ap.add_argument("--tokens", type=int, default=1000)
    ap.add_argument("--requests", type=int, default=20000)
    ap.add_argument("--connections", type=int, default=4)
    ap.add_argument("--rate", type=float, default=2000.0, help="requests per second, all connections together")
    ap.add_argument("--warmup", type=int, default=2000, help="requests sent first and not counted")
    ap.add_argument("--keep", action="store_true", help="keep the work directory")
    ap.add_argument("--no-baseline", action="store_true",
                    help="skip the baseline round (GET /admin/v1/health: the same listener, no key, no verification)")
    args = ap.parse_args()

    binary = args.bin
    if not binary:
        subprocess.run(["cargo", "build", "--release", "-p", "keygate"], check=True, cwd=ROOT)
        binary = os.path.join(ROOT, "target", "release", "keygate")
    binary = os.path.abspath(binary)

    work = tempfile.mkdtemp(prefix="keygate-verify-bench.")
    admin_port, gateway_port = free_port(), free_port()
    config = os.path.join(work, "keygate.toml")
    with open(config, "w") as f:
        f.write(
            f'data_dir = "{work}/data"\nshutdown_grace_seconds = 2\n'
            f'[admin]\nlisten = "127.0.0.1:{admin_port}"\n'
            f'[gateway]\nlisten = "127.0.0.1:{gateway_port}"\n'
            '[log]\nlevel = "warn"\nformat = "json"\n'
        )
    full = root_key(binary, config, "bench-admin", ["*"])
    verify_key = root_key(binary, config, "bench-verify", ["tokens:verify"])
    log = open(os.path.join(work, "keygate.log"), "w")
    proc = subprocess.Popen([binary, "serve", "--config", config], stdout=log, stderr=log)
    url = f"http://127.0.0.1:{admin_port}"
    try:
        for _ in range(600):
            try:
                urllib.request.urlopen(url + "/admin/v1/health", timeout=1).read()
                break
            except OSError:
                if proc.poll() is not None:
                    sys.exit(f"keygate exited; see {work}/keygate.log")
                time.sleep(0.1)
        t0 = time.perf_counter()
        tokens = []
        for i in range(args.tokens):
            t = api(url, full, "POST", "/admin/v1/tokens", {
                "name": f"bench-{i}",
                "scopes": ["orders:read", "orders:write"],
                "rate_limit": {"requests": 1_000_000, "per_seconds": 1},
                "quota": {"requests": 1_000_000_000, "period": "month"},
            })
            tokens.append(t["token"])
        print(f"{args.tokens} tokens created in {time.perf_counter() - t0:.1f} s", file=sys.stderr)

        def request(i: int) -> bytes:
            body = json.dumps({"token": tokens[i % len(tokens)], "scope": "orders:read", "ip": "10.0.0.1"}).encode()
            return (
                f"POST /admin/v1/verify HTTP/1.1\r\nHost: 127.0.0.1:{admin_port}\r\n"
                f"Authorization: Bearer {verify_key}\r\nContent-Type: application/json\r\n"
                f"Content-Length: {len(body)}\r\n\r\n"
            ).encode() + body

        health = f"GET /admin/v1/health HTTP/1.1\r\nHost: 127.0.0.1:{admin_port}\r\n\r\n".encode()

        def run(n: int, make=request) -> tuple[list, list, float]:
            per = [[make(c + k * args.connections) for k in range(n // args.connections)] for c in range(args.connections)]
            interval = args.connections / args.rate
            outs: list[list] = [[] for _ in per]
            errors: list = []
            start = time.perf_counter() + 0.05
            threads = [
                threading.Thread(target=worker, args=(admin_port, reqs, start + c * interval / args.connections, interval, outs[c], errors))
                for c, reqs in enumerate(per)
            ]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            return [x for o in outs for x in o], errors, time.perf_counter() - start

        if args.warmup:
            run(args.warmup)
        results, errors, elapsed = run(args.requests)
        base = None if args.no_baseline else run(args.requests, lambda _i: health)
        if errors:
            print(f"{len(errors)} answers were not valid; first: {errors[0]}", file=sys.stderr)
        total = [r[0] * 1e3 for r in results]
        service = [r[1] * 1e3 for r in results]
        print(f"keygate {binary}")
        print(f"{len(results)} verifications, {args.connections} connections, target {args.rate:.0f}/s, "
              f"achieved {len(results) / elapsed:.0f}/s, {len(errors)} not valid")
        print(f"{'ms':<22}{'p50':>8}{'p90':>8}{'p99':>8}{'p99.9':>8}{'max':>8}")
        rows = [("from scheduled time", total), ("from send", service)]
        if base is not None:
            rows.append(("baseline: health", [r[0] * 1e3 for r in base[0]]))
        for name, v in rows:
            print(f"{name:<22}" + "".join(f"{pct(v, p):>8.3f}" for p in (50, 90, 99, 99.9)) + f"{max(v):>8.3f}")
        return 1 if errors else 0
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()
        if args.keep:
            print(f"work directory: {work}", file=sys.stderr)
        else:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
