"""Batch labelling jobs: collect images, classify them (in-process or through a server), append records.

The output file is the job's state: every record is one complete line appended with a single
write(), so a job killed at any point is resumed by re-running it; the torn tail of a write cut
short is dropped on start, and paths already recorded are skipped. See cli_label.py for the CLI.
"""
from __future__ import annotations

import asyncio
import csv
import fcntl
import glob
import hashlib
import io
import json
import os
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from tqdm import tqdm

from adaptclip.adapt.data import IMAGE_SUFFIXES
from adaptclip.client.client import Client, classify_request
from adaptclip.client.records import response_record
from adaptclip.v1 import classifier_pb2 as pb

LIST_SUFFIXES = frozenset({".txt", ".lst"})
CSV_COLUMNS = ("image", "sha256", "model", "label_set_id", "top1", "top1_probability", "top",
               "zero_shot_top1", "zero_shot_top1_probability", "adaptation", "error_code", "error_message")
_STATUS_NAMES = {s.value[0]: s.name for s in grpc.StatusCode}


class LabelError(Exception):
    """A job that cannot start or go on (bad input, output held by another job, server gone)."""


@dataclass
class Job:
    """What every image is asked: the label set, top-k, adaptation, and which served model."""

    labels: list[str]
    templates: list[str] = field(default_factory=list)
    top_k: int = 5
    adaptation: pb.Adaptation | None = None
    model: str = ""  # served model name; "" = the default one
    concurrency: int = 32  # requests in flight (per Ray worker: images per batch)


# -- sources ---------------------------------------------------------------------------------------
def _walk(folder: str) -> Iterator[str]:
    for root, _, files in os.walk(folder):
        yield from (os.path.join(root, f) for f in files if os.path.splitext(f)[1].lower() in IMAGE_SUFFIXES)


def collect_paths(sources: Sequence[str]) -> list[str]:
    """Absolute paths, sorted and de-duplicated. A folder is walked (image suffixes only); a .txt/.lst
    file lists paths, one a line (relative to the working directory, '#' comments); a named file is
    taken whatever its suffix; anything else is a glob pattern (matched folders are walked)."""
    found: set[str] = set()
    for src in sources:
        if os.path.isdir(src):
            found.update(_walk(src))
        elif os.path.isfile(src) and os.path.splitext(src)[1].lower() in LIST_SUFFIXES:
            lines = Path(src).read_text(encoding="utf-8").splitlines()
            found.update(ln.strip() for ln in lines if ln.strip() and not ln.lstrip().startswith("#"))
        elif os.path.lexists(src):
            found.add(src)
        else:
            matches = glob.glob(src, recursive=True)
            if not matches:
                raise LabelError(f"{src}: no such file or folder, and no file matches it as a pattern")
            for m in matches:
                found.update(_walk(m) if os.path.isdir(m) else (m,))
    return sorted({os.path.abspath(p) for p in found})


def read_image(path: str, max_bytes: int) -> tuple[bytes, str | None, tuple[str, str] | None]:
    """(bytes, sha256, None), or (b"", sha256 or None, (code, message)) for a file that cannot be sent."""
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size > max_bytes:  # refused here: a message past the gRPC limit would end the whole stream
                return b"", None, ("INVALID_ARGUMENT", f"image: {size} bytes is over the limit of {max_bytes} bytes")
            data = f.read()
    except OSError as exc:
        return b"", None, ("UNREADABLE", str(exc))
    return data, hashlib.sha256(data).hexdigest(), None


# -- records ---------------------------------------------------------------------------------------
def error_record(path: str, sha: str | None, code: str, message: str, model: str, label_set_id: str) -> dict:
    return {"image": path, "sha256": sha, "model": model, "label_set_id": label_set_id,
            "error": {"code": code, "message": message}}


def record_from_response(path: str, sha: str | None, resp: pb.ClassifyResponse, model: str, label_set_id: str) -> dict:
    """The output record of one answered request (the `classify --json` line, plus hash, minus request id)."""
    if resp.HasField("error"):
        return error_record(path, sha, _STATUS_NAMES.get(resp.error.code, str(resp.error.code)), resp.error.message,
                            model, label_set_id)
    rec = response_record(path, resp)
    del rec["request_id"]
    return {"image": path, "sha256": sha, **{k: v for k, v in rec.items() if k != "image"}}


def encode_record(rec: dict, fmt: str) -> bytes:
    """One complete output line. csv: top-1 columns plus the top-k (and adaptation) as JSON strings."""
    if fmt == "jsonl":
        return (json.dumps(rec) + "\n").encode()  # ASCII: file names that are not UTF-8 survive as escapes
    top, zs, err = rec.get("top") or [{}], rec.get("zero_shot_top") or [{}], rec.get("error") or {}
    row = [rec["image"], rec["sha256"] or "", rec["model"], rec["label_set_id"], top[0].get("label", ""),
           top[0].get("probability", ""), json.dumps(rec["top"], ensure_ascii=False) if "top" in rec else "",
           zs[0].get("label", ""), zs[0].get("probability", ""),
           json.dumps(rec["adaptation"]) if "adaptation" in rec else "", err.get("code", ""),
           " ".join(err.get("message", "").split())]  # one physical line per record
    return _csv_line(row)


def _csv_line(row: Sequence[object]) -> bytes:
    buf = io.StringIO()
    csv.writer(buf, lineterminator="\n").writerow(row)
    return buf.getvalue().encode("utf-8", "surrogateescape")  # a non-UTF-8 file name is written as it is


# Errors that a re-run would only repeat; any other (queue full, unavailable, deadline, internal) is retried.
FINAL_ERRORS = frozenset({"UNREADABLE", "INVALID_ARGUMENT"})


def _final(rec: dict) -> bool:
    """Whether a record settles its image: an answer, or an error the input itself causes."""
    code = (rec.get("error") or {}).get("code") if "error" in rec else rec.get("error_code")
    return not code or code in FINAL_ERRORS


def _parse_line(line: bytes, fmt: str, header: list[str] | None) -> dict:
    if fmt == "jsonl":
        rec = json.loads(line)
        if not isinstance(rec, dict) or "image" not in rec:
            raise ValueError("no 'image' field")
        return rec
    row = next(csv.reader([line.decode("utf-8", "surrogateescape")]))
    if header is None or len(row) != len(header):
        raise ValueError(f"{len(row)} columns, expected {len(CSV_COLUMNS)}")
    return dict(zip(header, row))


# -- output: resume, atomic appends, progress ----------------------------------------------------------
class Recorder:
    """The output file: locked against a second job, torn tail dropped, one write() per record."""

    FSYNC_EVERY_N, FSYNC_EVERY_S = 256, 1.0

    def __init__(self, path: str | Path, fmt: str) -> None:
        self.path, self.fmt = Path(path), fmt
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o644)
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self.fd)
            raise LabelError(f"{self.path} is being written by another labelling job (it holds a lock on it); "
                             f"wait for that job or choose another -o") from None
        self.done: set[str] = set()
        self.label_sets: set[str] = set()
        self.models: set[str] = set()
        try:
            self._recover()
        except BaseException:
            os.close(self.fd)
            raise
        if fmt == "csv" and os.fstat(self.fd).st_size == 0:
            self._write(_csv_line(CSV_COLUMNS))
        self.written = self.errors = 0
        self._unsynced, self._synced_at = 0, time.monotonic()
        self._bar: tqdm | None = None
        self.started_at = self.finished_at = 0.0

    def _recover(self) -> None:
        """Read the records already there; truncate a last line without its newline (a write cut short)."""
        header: list[str] | None = None
        offset = 0
        with open(self.path, "rb") as f:
            for lineno, line in enumerate(f, 1):
                if not line.endswith(b"\n"):
                    head = _csv_line(CSV_COLUMNS) if self.fmt == "csv" else b'{"image": '
                    if offset == 0 and line[:len(head)] != head[:len(line)]:  # never cut into someone else's file
                        raise LabelError(f"{self.path}: not an adaptclip {self.fmt} output; choose another -o")
                    os.ftruncate(self.fd, offset)
                    break
                offset += len(line)
                if self.fmt == "csv" and header is None:
                    header = next(csv.reader([line.decode("utf-8", "surrogateescape")]))
                    if tuple(header) != CSV_COLUMNS:
                        raise LabelError(f"{self.path}: not an adaptclip csv output (header {header[:3]}...)")
                    continue
                try:
                    rec = _parse_line(line, self.fmt, header)
                except (ValueError, UnicodeDecodeError) as exc:
                    raise LabelError(f"{self.path}:{lineno}: not a {self.fmt} record ({exc}); "
                                     f"is --format right, or was the file edited?") from None
                if _final(rec):
                    self.done.add(rec["image"])
                if rec.get("label_set_id"):
                    self.label_sets.add(rec["label_set_id"])
                if rec.get("model"):
                    self.models.add(rec["model"])

    def start(self, total: int, label_set_id: str, model: str | None) -> None:
        """Called once the label set is known: refuse to mix label sets or models in one file (a resumed
        job would skip images another model labelled), then show progress. model=None: the engine learns
        its model's served name only from its records, so emit() checks it."""
        other = self.label_sets - {label_set_id}
        if other:
            raise LabelError(f"{self.path} holds records of label set {sorted(other)[0]}, but these labels and "
                             f"templates make {label_set_id}: choose another -o, or the labels it was made with")
        if model is not None:
            self._check_model(model)
        self.started_at = time.monotonic()
        self._bar = tqdm(total=total, unit="img", desc="label", file=sys.stderr, dynamic_ncols=True, smoothing=0.05,
                         mininterval=0.2 if sys.stderr.isatty() else 30)  # a log file gets a line per 30 s

    def _check_model(self, model: str) -> None:
        other = self.models - {model}
        if other:
            raise LabelError(f"{self.path} holds records of model {sorted(other)[0]!r}, but this job labels with "
                             f"{model!r}: choose another -o, or the model it was made with")
        self.models.add(model)

    def emit(self, rec: dict) -> None:
        """Append one record: one write() of one whole line; fsync'd every N records or S seconds."""
        self._check_model(rec["model"])
        self._write(encode_record(rec, self.fmt))
        self.written += 1
        self.errors += "error" in rec
        self._unsynced += 1
        if self._unsynced >= self.FSYNC_EVERY_N or time.monotonic() - self._synced_at >= self.FSYNC_EVERY_S:
            self._sync()
        if self._bar is not None:
            self._bar.update(1)
            if self.errors:
                self._bar.set_postfix(errors=self.errors, refresh=False)

    def _write(self, data: bytes) -> None:
        view = memoryview(data)
        while view:  # a short write is only possible on a full disk; the re-run drops its torn tail
            view = view[os.write(self.fd, view):]

    def _sync(self) -> None:
        os.fsync(self.fd)
        self._unsynced, self._synced_at = 0, time.monotonic()

    def close(self) -> None:
        self.finished_at = time.monotonic()
        if self._bar is not None:
            self._bar.close()
        self._sync()
        os.close(self.fd)  # releases the lock

    def summary(self, skipped: int) -> str:
        took = self.finished_at - self.started_at if self.started_at else 0.0
        rate = f", {self.written / took:.1f} images/s" if took > 0 else ""
        return (f"label: {self.written} done, {skipped} skipped (already in {self.path}), {self.errors} errors "
                f"in {took:.2f} s{rate}")


Engine = Callable[[Job, list[str], Recorder], None]


def run_job(job: Job, sources: Sequence[str], out: str | Path, fmt: str, engine: Engine) -> Recorder:
    """Collect, skip what `out` already holds, label the rest; print the summary on stderr."""
    paths = collect_paths(sources)
    if not paths:
        raise LabelError(f"no images found in {' '.join(sources)} (folders are searched for {', '.join(sorted(IMAGE_SUFFIXES))})")
    if fmt == "csv" and any("\n" in p or "\r" in p for p in paths):
        raise LabelError("a path holds a line break, which --format csv cannot keep on one line: use --format jsonl")
    rec = Recorder(out, fmt)
    pending = [p for p in paths if p not in rec.done]
    try:
        if pending:
            engine(job, pending, rec)
    finally:
        rec.close()
        print(rec.summary(len(paths) - len(pending)), file=sys.stderr)
    return rec


# -- engines ---------------------------------------------------------------------------------------
async def label_one(svc, job: Job, path: str, label_set_id: str) -> dict:
    """Read and classify one file in-process (local engine and Ray workers); never raises for the file."""
    data, sha, err = await asyncio.to_thread(read_image, path, svc.cfg.limits.max_image_bytes)
    if err is not None:
        return error_record(path, sha, *err, job.model or svc.default_model, label_set_id)
    req = classify_request(data, label_set_id=label_set_id, model=job.model, top_k=job.top_k, adaptation=job.adaptation)
    return record_from_response(path, sha, await svc.classify_or_error(req), job.model or svc.default_model, label_set_id)


async def register(svc, job: Job) -> str:
    """Register the job's label set in-process; a bad label set is the job's error."""
    from adaptclip.server.errors import RequestError

    try:
        ref = await svc.register_label_set(pb.LabelSet(labels=job.labels, templates=job.templates))
    except RequestError as exc:
        raise LabelError(str(exc)) from None
    return ref.label_set_id


def local_engine(cfg) -> Engine:
    """The service pipeline in this process (InProcess); up to job.concurrency requests share encoder batches."""

    async def main(job: Job, pending: list[str], rec: Recorder) -> None:
        from adaptclip.compression.models import ModelLoadError
        from adaptclip.server.app import InProcess

        try:
            ctx = InProcess(cfg)
            svc = await ctx.__aenter__()
        except (ModelLoadError, ValueError) as exc:
            raise LabelError(str(exc)) from None
        try:
            label_set_id = await register(svc, job)
            rec.start(len(pending), label_set_id, job.model or svc.default_model)
            slots = asyncio.Semaphore(job.concurrency)
            window: asyncio.Queue[asyncio.Task | None] = asyncio.Queue()

            async def feed() -> None:
                for path in pending:
                    await slots.acquire()
                    window.put_nowait(asyncio.ensure_future(label_one(svc, job, path, label_set_id)))
                window.put_nowait(None)

            feeder = asyncio.ensure_future(feed())
            try:
                while (task := await window.get()) is not None:  # in input order
                    rec.emit(await task)
                    slots.release()
            finally:
                feeder.cancel()
                while not window.empty():
                    if (task := window.get_nowait()) is not None:
                        task.cancel()
        finally:
            await ctx.__aexit__(None, None, None)

    return lambda job, pending, rec: asyncio.run(main(job, pending, rec))


def server_engine(target: str, ready_timeout_s: float = 30.0, **connection) -> Engine:
    """Stream through a running service's ClassifyStream with at most job.concurrency requests outstanding;
    `connection`: Client's token and TLS settings."""

    def run(job: Job, pending: list[str], rec: Recorder) -> None:
        with Client(target, timeout_s=60, **connection) as client:
            try:
                client.wait_ready(ready_timeout_s)
                info = client.model_info()
                ref = client.register_label_set(job.labels, job.templates)
            except TimeoutError:
                raise LabelError(f"the server at {target} is not SERVING after {ready_timeout_s:.0f} s: is it running?") from None
            except grpc.RpcError as exc:
                raise LabelError(f"{target}: {exc.code().name}: {exc.details()}") from None
            model = job.model or info.default_model
            rec.start(len(pending), ref.label_set_id, model)
            slots, stop = threading.Semaphore(job.concurrency), threading.Event()
            sent: dict[str, tuple[str, str | None, tuple[str, str] | None]] = {}

            def requests() -> Iterator[pb.ClassifyRequest]:
                for i, path in enumerate(pending):
                    slots.acquire()
                    if stop.is_set():
                        return
                    data, sha, err = read_image(path, info.limits.max_image_bytes)
                    sent[str(i)] = (path, sha, err)  # an unsendable file goes as empty bytes; its own error is kept
                    yield classify_request(data, label_set_id=ref.label_set_id, model=job.model, top_k=job.top_k,
                                           request_id=str(i), adaptation=job.adaptation)

            try:
                for resp in client.classify_stream(requests()):
                    path, sha, err = sent.pop(resp.request_id)
                    rec.emit(error_record(path, sha, *err, model, ref.label_set_id) if err
                             else record_from_response(path, sha, resp, model, ref.label_set_id))
                    slots.release()
            except grpc.RpcError as exc:
                raise LabelError(f"{target}: the stream failed ({exc.code().name}: {exc.details()}); "
                                 f"re-run the same command to go on") from None
            finally:
                stop.set()
                slots.release(job.concurrency)

    return run
