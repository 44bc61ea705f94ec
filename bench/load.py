"""Load test of a hardened server: N concurrent clients for a fixed time, valid and hostile requests mixed.

One `adaptclip serve` process (bearer tokens on, Prometheus metrics on, cache off so every valid request
computes) is driven by N asyncio clients, each with its own channel, for `--seconds` per phase:

  baseline  valid Classify requests only (zero-shot, and GS-Bias over 8 views)
  mixed     the same valid requests, interleaved with malformed bytes (random, truncated, bit-flipped),
            calls without a token or with a wrong one, and requests over the server's view limit

For each phase: p50/p99 latency of the valid requests (the ratio mixed / baseline says what the hostile
traffic costs them), how many valid requests failed (target: none), the statuses of the rest, and the
server's resident memory sampled every 0.5 s over the whole run (target: flat after warm-up).

    flock /tmp/adaptclip-bench.lock .venv/bin/python bench/load.py --clients 16,64 --seconds 45 -o bench/results/load.json
"""
from __future__ import annotations

import argparse
import asyncio
import collections
import io
import json
import os
import platform
import random
import socket
import subprocess
import sys
import tempfile
import threading
import time

import grpc
import numpy as np
from PIL import Image

from adaptclip.client import AsyncClient, Client
from adaptclip.client.client import classify_request
from adaptclip.v1 import classifier_pb2 as pb

TOKEN = "load-test-token-0123456789abcdef"
LABELS = ["airplane", "car", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
HOSTILE = ("malformed", "no_token", "wrong_token", "over_limit")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def images(n: int) -> list[bytes]:
    rng = np.random.default_rng(0)
    out = []
    for _ in range(n):
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 255, (160, 200, 3), dtype=np.uint8)).save(buf, "JPEG", quality=85)
        out.append(buf.getvalue())
    return out


def mutate(rng: random.Random, good: bytes) -> bytes:
    kind = rng.randrange(3)
    if kind == 0:
        return rng.randbytes(rng.randint(0, 300))
    if kind == 1:
        return good[:rng.randrange(len(good))]
    data = bytearray(good)
    for _ in range(rng.randint(1, 8)):
        data[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
    return bytes(data)


class RssSampler(threading.Thread):
    """The server's resident memory every `every_s` from /proc/PID/statm: (seconds since start, MiB)."""

    def __init__(self, pid: int, every_s: float = 0.5) -> None:
        super().__init__(daemon=True)
        self.pid, self.every_s, self.samples, self.stop = pid, every_s, [], threading.Event()
        self.start_time = time.monotonic()

    def run(self) -> None:
        page = os.sysconf("SC_PAGE_SIZE")
        while not self.stop.wait(self.every_s):
            with open(f"/proc/{self.pid}/statm") as f:
                self.samples.append((time.monotonic() - self.start_time, int(f.read().split()[1]) * page / 2**20))


async def client_loop(target: str, seed: int, until: float, mixed: bool, ref: str, pool: list[bytes],
                      valid_ms: list[float], statuses: collections.Counter) -> None:
    rng = random.Random(seed)
    gs = pb.Adaptation(method=pb.Adaptation.GS_BIAS, views=8, seed=1)
    none = pb.Adaptation(method=pb.Adaptation.NONE)
    async with AsyncClient(target, timeout_s=120, token=TOKEN) as authed, \
            AsyncClient(target, timeout_s=30, token="") as anon, \
            AsyncClient(target, timeout_s=30, token="wrong-token-0123456789abcdef") as wrong:
        raw = authed.channel.unary_unary("/adaptclip.v1.Classifier/Classify")
        while time.monotonic() < until:
            img = rng.choice(pool)
            kind = "valid" if not mixed or rng.random() < 0.6 else rng.choice(HOSTILE)
            req = classify_request(img, label_set_id=ref, adaptation=gs if rng.random() < 0.3 else none)
            started = time.perf_counter()
            try:
                if kind == "valid":
                    await authed.stub.Classify(req, timeout=120)
                    valid_ms.append((time.perf_counter() - started) * 1000)
                elif kind == "malformed":
                    await raw(mutate(rng, req.SerializeToString()), timeout=30)
                elif kind in ("no_token", "wrong_token"):
                    await (anon if kind == "no_token" else wrong).stub.Classify(req, timeout=30)
                else:
                    req.adaptation.CopyFrom(pb.Adaptation(method=pb.Adaptation.GS_BIAS, views=1000))
                    await authed.stub.Classify(req, timeout=30)
                statuses[kind, "OK"] += 1
            except grpc.RpcError as exc:
                statuses[kind, exc.code().name] += 1


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else float("nan")


async def phase(target: str, clients: int, seconds: float, mixed: bool, ref: str, pool: list[bytes]) -> dict:
    valid_ms: list[float] = []
    statuses: collections.Counter = collections.Counter()
    until = time.monotonic() + seconds
    await asyncio.gather(*(client_loop(target, 1000 * clients + i + mixed * 100, until, mixed, ref, pool, valid_ms,
                                       statuses) for i in range(clients)))
    failed = sum(n for (kind, code), n in statuses.items() if kind == "valid" and code != "OK")
    return {"clients": clients, "phase": "mixed" if mixed else "baseline", "seconds": seconds,
            "valid_ok": len(valid_ms), "valid_failed": failed, "valid_per_s": len(valid_ms) / seconds,
            "p50_ms": percentile(valid_ms, 50), "p99_ms": percentile(valid_ms, 99),
            "statuses": {f"{kind}:{code}": n for (kind, code), n in sorted(statuses.items())}}


def requests_by_code(metrics_port: int) -> dict[str, float]:
    """adaptclip_requests_total from the server's /metrics, summed per status code."""
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10) as r:
        text = r.read().decode()
    codes: collections.Counter = collections.Counter()
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == "adaptclip_requests_total":
                codes[s.labels["code"]] += s.value
    return dict(codes)


def serve(args: argparse.Namespace, folder: str) -> tuple[subprocess.Popen, str, int, str]:
    tokens = os.path.join(folder, "tokens")
    with open(tokens, "w") as f:
        f.write(TOKEN + "\n")
    os.chmod(tokens, 0o600)
    port, metrics = _free_port(), _free_port()
    model = ["--model", args.model] + (["--pretrained", args.pretrained] if args.pretrained else ["--random-init"])
    log_path = os.path.join(folder, "server.log")
    proc = subprocess.Popen([sys.executable, "-m", "adaptclip.client.cli", "serve", *model, "--host", "127.0.0.1",
                             "--port", str(port), "--auth-token-file", tokens, "--metrics-port", str(metrics),
                             "--metrics-host", "127.0.0.1", "--no-cache", "--log-json", "--device", "cpu"],
                            stdout=open(log_path, "w"), stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    return proc, f"127.0.0.1:{port}", metrics, log_path


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--clients", default="16,64", help="comma-separated client counts")
    p.add_argument("--seconds", type=float, default=45.0, help="per phase")
    p.add_argument("--model", default="ViT-B-32")
    p.add_argument("--pretrained", help="checkpoint; default: random init (a speed model)")
    p.add_argument("-o", "--output", help="JSON results")
    args = p.parse_args()
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory() as folder:
        proc, target, metrics_port, log_path = serve(args, folder)
        try:
            with Client(target, token=TOKEN) as c:
                c.wait_ready(300)
                ref = c.register_label_set(LABELS).label_set_id
            rss = RssSampler(proc.pid)
            rss.start()
            pool = images(32)
            rows = []
            for n in (int(x) for x in args.clients.split(",")):
                for mixed in (False, True):
                    first = len(rss.samples)
                    rows.append(asyncio.run(phase(target, n, args.seconds, mixed, ref, pool)))
                    during = [mib for _, mib in rss.samples[first:]]
                    rows[-1]["rss_mib"] = {"min": min(during), "mean": sum(during) / len(during), "max": max(during)}
                    print(json.dumps(rows[-1]), flush=True)
            rss.stop.set()
            rss.join()
            scraped_codes = requests_by_code(metrics_port)
        finally:
            proc.terminate()
            proc.wait(60)
        with open(log_path) as f:
            request_lines = sum(1 for line in f if '"adaptclip.requests"' in line)
        server_codes = scraped_codes
    samples = rss.samples
    warm = [mib for t, mib in samples if t >= args.seconds]  # after the first phase
    slope = float(np.polyfit([t for t, _ in samples if t >= args.seconds], warm, 1)[0] * 60) if len(warm) > 2 else 0.0
    summary = {"machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs",
               "load_before": load_before, "load_after": os.getloadavg(), "model": args.model,
               "pretrained": args.pretrained or "random init", "rows": rows,
               "rss_mib": {"first": samples[0][1], "after_warm_up": warm[0] if warm else None,
                           "end": samples[-1][1], "max": max(m for _, m in samples),
                           "slope_after_warm_up_mib_per_min": slope,
                           "samples": [(round(t, 1), round(m, 1)) for t, m in samples]},
               "server_request_log_lines": request_lines, "server_requests_total": server_codes}
    print(json.dumps({k: v for k, v in summary.items() if k != "rows"} | {"rss_mib": {
        k: v for k, v in summary["rss_mib"].items() if k != "samples"}}, indent=1))
    if args.output:
        with open(args.output, "w") as f:
            json.dump(summary, f, indent=1)
    print("\n| clients | phase | valid ok | valid failed | valid/s | p50 ms | p99 ms | server RSS min / mean / max (MiB) "
          "| others |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        others = ", ".join(f"{k} {v}" for k, v in r["statuses"].items() if not k.startswith("valid:"))
        m = r["rss_mib"]
        print(f"| {r['clients']} | {r['phase']} | {r['valid_ok']} | {r['valid_failed']} | {r['valid_per_s']:.1f} | "
              f"{r['p50_ms']:.0f} | {r['p99_ms']:.0f} | {m['min']:.0f} / {m['mean']:.0f} / {m['max']:.0f} | "
              f"{others or '-'} |")

if __name__ == "__main__":
    main()
