"""The labelling job on Ray Data: an actor pool holds the model, the driver appends the records.

Needs the `ray` extra (pip install 'adaptclip[ray]'); only this module imports Ray. Workers read
the files themselves (not ray.data.read_binary_files), so an unreadable file becomes that file's
error record instead of failing the read task; the driver writes every row with the same
Recorder as the local engine, so output format and resume are the same.
"""
from __future__ import annotations

import asyncio
import json
import logging
import threading

import numpy as np
import ray
import ray.data

from adaptclip.client.label import Engine, Job, LabelError, Recorder, label_one, register


class Labeller:
    """One actor: the service pipeline (InProcess) loaded once, on an event loop of its own thread."""

    def __init__(self, cfg, job: Job) -> None:
        from adaptclip.server.app import InProcess

        self.job = job
        self.loop = asyncio.new_event_loop()
        threading.Thread(target=self.loop.run_forever, name="label-loop", daemon=True).start()
        self.svc = self._wait(InProcess(cfg).__aenter__())  # lives as long as the actor
        self.label_set_id = self._wait(register(self.svc, job))

    def _wait(self, coro):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result()

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """A batch of paths, classified concurrently so they share encoder batches -> one JSON record each."""
        async def label_all() -> list[dict]:
            return await asyncio.gather(*(label_one(self.svc, self.job, str(p), self.label_set_id) for p in batch["path"]))

        return {"record": np.array([json.dumps(r) for r in self._wait(label_all())], dtype=object)}


def ray_engine(cfg, address: str | None, workers: int) -> Engine:
    """Run on the Ray cluster at `address` (None: start a local one) with `workers` model actors."""

    def run(job: Job, pending: list[str], rec: Recorder) -> None:
        from adaptclip.server.errors import RequestError
        from adaptclip.server.labels import validate_label_set

        try:  # checked here, before any worker starts; the id is what the workers will get
            label_set_id = validate_label_set(job.labels, job.templates, cfg.limits, "labels").id
        except RequestError as exc:
            raise LabelError(str(exc)) from None
        started = not ray.is_initialized()
        if started:
            ray.init(address=address, include_dashboard=False, logging_level=logging.WARNING)
        try:
            ctx = ray.data.DataContext.get_current()
            ctx.enable_progress_bars = False  # the job's own bar counts records written
            ctx.print_on_execution_start = False
            cpus = ray.cluster_resources().get("CPU", 1.0)
            ds = ray.data.from_items([{"path": p} for p in pending]).map_batches(
                Labeller, fn_constructor_args=(cfg, job), batch_size=job.concurrency, batch_format="numpy",
                compute=ray.data.ActorPoolStrategy(size=workers),
                num_cpus=max(1.0, cpus // workers) if cpus >= workers else cpus / workers)
            rec.start(len(pending), label_set_id, None)  # the clock includes the workers' start-up
            for row in ds.iter_rows():
                rec.emit(json.loads(row["record"]))
        except ray.exceptions.RayError as exc:
            raise LabelError(f"the Ray job failed: {exc}") from None
        finally:
            if started:
                ray.shutdown()

    return run
