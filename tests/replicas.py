"""`adaptclip serve` replica processes and a failover drive, for tests/test_replicas.py and bench/failover.py."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import grpc

from adaptclip.client import Client
from adaptclip.v1 import classifier_pb2 as pb
from redis_server import free_port


class Replica:
    """One `adaptclip serve` process on a fixed free port; `--name` tells which replica answered."""

    def __init__(self, name: str, args: Sequence[str], workdir: Path) -> None:
        self.name, self.args, self.port = name, list(args), free_port()
        self.log = workdir / f"{name}.log"
        self.proc: subprocess.Popen | None = None

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> Replica:
        cmd = [sys.executable, "-m", "adaptclip.client.cli", "serve", "--host", "127.0.0.1", "--port", str(self.port),
               "--name", self.name, "--log-level", "INFO", *self.args]
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env=env)
        return self

    def wait_ready(self, timeout_s: float = 120.0) -> Replica:
        with Client(self.target) as c:
            try:
                c.wait_ready(timeout_s)
            except TimeoutError:
                raise RuntimeError(f"replica {self.name} not SERVING (exit {self.proc.poll()}):\n"
                                   f"{self.log.read_text()[-3000:]}") from None
        return self

    def _signal(self, sig: int) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)
            self.proc.wait(60)

    def stop(self) -> None:
        """SIGTERM: the graceful shutdown a deploy does."""
        self._signal(signal.SIGTERM)

    def kill(self) -> None:
        """SIGKILL: a crash; in-flight calls see their connection reset."""
        self._signal(signal.SIGKILL)


@dataclass
class Call:
    index: int
    start: float  # time.perf_counter()
    end: float
    model: str  # which replica answered ("" when the call failed)
    error: str  # "" when it succeeded


def drive(target: str, requests: Sequence[pb.ClassifyRequest], concurrency: int, kill_at: int,
          kill: Callable[[], None], timeout_s: float = 60.0) -> tuple[list[Call], float]:
    """Send `requests` over one client at `concurrency`; call `kill` as request `kill_at` starts.
    Returns every call and the time of the kill."""
    calls: list[Call] = []
    killed_at = [0.0]
    lock = threading.Lock()
    with Client(target, timeout_s=timeout_s) as client:

        def one(i: int) -> None:
            if i == kill_at:
                killed_at[0] = time.perf_counter()
                kill()
            start = time.perf_counter()
            try:
                resp = client.stub.Classify(requests[i], timeout=timeout_s)
                model, error = resp.model, ""
            except grpc.RpcError as exc:
                model, error = "", f"{exc.code().name}: {exc.details()}"
            with lock:
                calls.append(Call(i, start, time.perf_counter(), model, error))

        with ThreadPoolExecutor(concurrency) as pool:
            list(pool.map(one, range(len(requests))))
    return sorted(calls, key=lambda c: c.index), killed_at[0]
