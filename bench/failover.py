"""Failover: two `adaptclip serve` replicas sharing one redis-server (started here), one client given both
addresses (round robin, gRPC retries for UNAVAILABLE), N requests at a fixed concurrency (zero-shot, or
seeded GS-Bias with --views: both idempotent).
Run 1 (the baseline): nothing happens. Run 2: one replica is SIGKILLed as request N/2 starts. Reported per
run: requests, failures, p50/p99 latency overall and over the requests started in the second around the
kill (kill - 0.5 s .. kill + 0.5 s; the same window of the baseline run), and the calls in flight then.

    .venv/bin/python bench/failover.py --images /tmp/data/test --model M.json --pretrained M.pt
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(Path(__file__).parent))
from redis_server import RedisServer  # noqa: E402
from replicas import Call, Replica, drive  # noqa: E402
from throughput import LABELS, load_images  # noqa: E402

from adaptclip.client import Client  # noqa: E402
from adaptclip.client.client import classify_request  # noqa: E402
from adaptclip.v1 import classifier_pb2 as pb  # noqa: E402


def summarise(what: str, calls: list[Call], mark: float) -> dict:
    """Counts and latency percentiles, overall and for the calls started within 0.5 s of `mark`."""
    def ms(cs: list[Call]) -> tuple[float, float]:
        lat = np.asarray([c.end - c.start for c in cs]) * 1000
        return (float(np.percentile(lat, 50)), float(np.percentile(lat, 99))) if len(lat) else (float("nan"),) * 2

    ok = [c for c in calls if not c.error]
    near = [c for c in ok if abs(c.start - mark) <= 0.5]
    (p50, p99), (near50, near99) = ms(ok), ms(near)
    return {"run": what, "requests": len(calls), "failed": len(calls) - len(ok),
            "in_flight_at_mark": sum(c.start <= mark <= c.end for c in calls),
            "p50_ms": p50, "p99_ms": p99, "near_requests": len(near), "near_p50_ms": near50, "near_p99_ms": near99,
            "max_ms": max((c.end - c.start) * 1000 for c in ok), "answered_by": sorted({c.model for c in ok}),
            "errors": sorted({c.error for c in calls if c.error})[:5]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", required=True, help="folder of images (searched recursively)")
    p.add_argument("--model", required=True)
    p.add_argument("--pretrained", required=True)
    p.add_argument("--n", type=int, default=1000, help="requests per run")
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--views", type=int, default=0, help="GS-Bias views per request (0: zero-shot)")
    p.add_argument("--json", help="also write the results here")
    args = p.parse_args()
    images = load_images(args.images, args.n)
    work = Path(f"/tmp/adaptclip-failover-{time.time_ns()}")
    work.mkdir()
    redis = RedisServer(work).start()
    serve = ["--model", args.model, "--pretrained", args.pretrained, "--device", "cpu", "--redis-url", redis.url,
             "--no-cache"]  # every request computes: cached answers would not be work
    replicas = [Replica(name, serve, work).start() for name in ("a", "b")]
    rows = []
    try:
        for r in replicas:
            r.wait_ready(600)
        target = ",".join(r.target for r in replicas)
        with Client(replicas[0].target) as c:
            ref = c.register_label_set(LABELS)
        A = pb.Adaptation
        adaptation = [A(method=A.GS_BIAS, views=args.views, seed=i) if args.views else A(method=A.NONE)
                      for i in range(args.n)]
        for run, kill in (("baseline (no kill)", None), ("replica b SIGKILLed", replicas[1].kill)):
            reqs = [classify_request(images[i % len(images)], label_set_id=ref.label_set_id, adaptation=adaptation[i])
                    for i in range(args.n)]
            start = time.perf_counter()
            calls, killed = drive(target, reqs, args.concurrency, args.n // 2, kill or (lambda: None))
            rows.append({**summarise(run, calls, killed), "wall_s": time.perf_counter() - start})
    finally:
        for r in replicas:
            r.kill()
        redis.kill()
    base = rows[0]
    print("| run | requests | failed | requests/s | p50 ms | p99 ms | ±0.5 s of the kill: requests | p50 ms | p99 ms "
          "| in flight at the kill | max ms | p99 vs baseline |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['run']} | {r['requests']} | {r['failed']} | {r['requests'] / r['wall_s']:.1f} "
              f"| {r['p50_ms']:.0f} | {r['p99_ms']:.0f} "
              f"| {r['near_requests']} | {r['near_p50_ms']:.0f} | {r['near_p99_ms']:.0f} | {r['in_flight_at_mark']} "
              f"| {r['max_ms']:.0f} | {r['p99_ms'] / base['p99_ms']:.2f}x |")
    for r in rows:
        if r["errors"]:
            print(f"{r['run']}: {r['errors']}")
    if args.json:
        Path(args.json).write_text(json.dumps({"command": " ".join(sys.argv), "machine": platform.platform(),
                                               "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
