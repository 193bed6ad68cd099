#!/usr/bin/env python3
"""Checks deploy/compose.yaml against what the nodes need (run by scripts/deploy-check).

Parsed with PyYAML (merge keys included); checks that every keygate node builds from
deploy/Containerfile, needs the same pepper and the same database, mounts a data volume of its own
where the image keeps its state, shares one Redis, sets only documented KEYGATE_* variables, and that whatever is
published goes to the host's loopback only; that HAProxy's configuration names every node.
"""

import re
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]
failures: list[str] = []


def expect(cond: bool, what: str) -> None:
    if not cond:
        failures.append(what)


def main() -> int:
    path = Path(sys.argv[1] if len(sys.argv) > 1 else ROOT / "deploy" / "compose.yaml")
    doc = yaml.safe_load(path.read_text())
    services = doc.get("services") or {}
    documented = set(re.findall(r"KEYGATE_[A-Z_]+", (ROOT / "docs" / "configuration.md").read_text()))
    containerfile = (ROOT / "deploy" / "Containerfile").read_text()
    data_dir = re.search(r"KEYGATE_DATA_DIR=(\S+)", containerfile)
    expect(data_dir is not None, "deploy/Containerfile sets KEYGATE_DATA_DIR")
    data_dir = data_dir.group(1) if data_dir else "/var/lib/keygate"
    expect(f'VOLUME ["{data_dir}"]' in containerfile, f"the image declares {data_dir} a volume")
    expect(re.search(r"^USER 10001", containerfile, re.M) is not None, "the image runs as uid 10001")

    nodes = sorted(n for n in services if n.startswith("keygate-"))
    expect(len(nodes) == 3, f"three keygate nodes (found {nodes})")
    expect("postgres" in services and "haproxy" in services and "redis" in services, "postgres, redis and haproxy services")
    peppers, databases, volumes, redises = set(), set(), set(), set()
    for name in nodes:
        s = services[name]
        build = s.get("build") or {}
        expect(build.get("dockerfile") == "deploy/Containerfile", f"{name} builds from deploy/Containerfile")
        env = s.get("environment") or {}
        for key in env:
            expect(key in documented, f"{name}: {key} is documented in docs/configuration.md")
        pepper = str(env.get("KEYGATE_PEPPER", ""))
        expect(pepper.startswith("${KEYGATE_PEPPER:?"), f"{name}: KEYGATE_PEPPER is required from the environment")
        peppers.add(pepper)
        db = str(env.get("KEYGATE_DATABASE_URL", ""))
        expect(db.startswith("postgres://") and "@postgres:5432/" in db, f"{name}: KEYGATE_DATABASE_URL names the postgres service")
        databases.add(db)
        expect("postgres" in (s.get("depends_on") or {}), f"{name} waits for postgres")
        redis = str(env.get("KEYGATE_REDIS_URL", ""))
        expect(redis.startswith("redis://redis:6379"), f"{name}: KEYGATE_REDIS_URL names the redis service")
        redises.add(redis)
        mounts = [v for v in s.get("volumes") or [] if str(v).endswith(f":{data_dir}")]
        expect(len(mounts) == 1, f"{name} mounts one volume at {data_dir}")
        for m in mounts:
            vol = str(m).split(":")[0]
            expect(vol in (doc.get("volumes") or {}), f"{name}: volume {vol} is declared")
            volumes.add(vol)
    expect(len(peppers) == 1, "every node has the same pepper")
    expect(len(databases) == 1, "every node has the same database")
    expect(len(redises) == 1, "every node shares the same Redis")
    expect(len(volumes) == len(nodes), "each node has a data volume of its own")

    for name, s in services.items():
        for p in s.get("ports") or []:
            expect(str(p).startswith("127.0.0.1:"), f"{name}: {p} is published on the host's loopback only")

    haproxy = (ROOT / "deploy" / "haproxy.cfg").read_text()
    for name in nodes:
        expect(re.search(rf"^\s*server {name} {name}:8080\b", haproxy, re.M) is not None, f"haproxy.cfg balances over {name}")

    for f in failures:
        print(f"compose: {f}", file=sys.stderr)
    if not failures:
        print(f"compose: {len(services)} services, {len(nodes)} keygate nodes: ok")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
