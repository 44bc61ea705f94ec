"""Thin clients over the adaptclip.v1 API: build requests, keep one channel, nothing hidden."""
from __future__ import annotations

from collections.abc import AsyncIterable, AsyncIterator, Iterable, Iterator, Sequence
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from adaptclip.client.targets import channel_target
from adaptclip.client.secure import open_channel
from adaptclip.v1 import classifier_pb2 as pb
from adaptclip.v1 import classifier_pb2_grpc as pb_grpc

MAX_MESSAGE = 64 * 1024 * 1024
PathLike = str | Path | None
_OPTIONS = [("grpc.max_send_message_length", MAX_MESSAGE), ("grpc.max_receive_message_length", MAX_MESSAGE)]


def load_lines(path: str | Path) -> list[str]:
    """Non-empty lines of a labels or templates file (one per line)."""
    return [ln.strip() for ln in Path(path).read_text(encoding="utf-8").splitlines() if ln.strip()]


def _image_bytes(image: bytes | str | Path) -> bytes:
    return image if isinstance(image, bytes) else Path(image).read_bytes()


def classify_request(image: bytes | str | Path, *, labels: Sequence[str] | None = None,
                     templates: Sequence[str] | None = None, label_set_id: str = "", model: str = "",
                     top_k: int = 5, adaptation: pb.Adaptation | None = None, request_id: str = "") -> pb.ClassifyRequest:
    """A ClassifyRequest with inline labels (+ optional templates) or a registered label set id."""
    req = pb.ClassifyRequest(image=_image_bytes(image), model=model, top_k=top_k, request_id=request_id)
    if label_set_id:
        req.label_set_id = label_set_id
    elif labels is not None:
        req.label_set.labels.extend(labels)
        req.label_set.templates.extend(templates or [])
    if adaptation is not None:
        req.adaptation.CopyFrom(adaptation)
    return req


class Client:
    """Blocking client. Use as a context manager, or call close(). `target`: HOST:PORT, several of them
    comma-separated, or dns:///NAME:PORT (balanced round robin, retried on UNAVAILABLE: client/targets.py). `token` (None: $ADAPTCLIP_TOKEN) goes on
    every call; `tls`/`tls_ca`/`tls_cert`/`tls_key` secure the channel (see client/secure.py)."""

    def __init__(self, target: str = "localhost:50051", timeout_s: float | None = 60.0, *, token: str | None = None,
                 tls: bool = False, tls_ca: PathLike = None, tls_cert: PathLike = None, tls_key: PathLike = None) -> None:
        target, balancing = channel_target(target)
        self.channel = open_channel(target, _OPTIONS + balancing, token=token, tls=tls, tls_ca=tls_ca, tls_cert=tls_cert,
                                    tls_key=tls_key)
        self.stub = pb_grpc.ClassifierStub(self.channel)
        self.timeout_s = timeout_s

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.channel.close()

    def wait_ready(self, timeout_s: float = 60.0) -> None:
        """Block until the server reports SERVING (models loaded and warmed up)."""
        import time

        health = health_pb2_grpc.HealthStub(self.channel)
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                status = health.Check(health_pb2.HealthCheckRequest(service="adaptclip.v1.Classifier"), timeout=2).status
                if status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"server not SERVING after {timeout_s:.0f}s")
            time.sleep(0.2)

    def classify(self, image: bytes | str | Path, **kwargs) -> pb.ClassifyResponse:
        return self.stub.Classify(classify_request(image, **kwargs), timeout=self.timeout_s)

    def classify_stream(self, requests: Iterable[pb.ClassifyRequest], timeout_s: float | None = None) -> Iterator[pb.ClassifyResponse]:
        return self.stub.ClassifyStream(iter(requests), timeout=timeout_s)

    def register_label_set(self, labels: Sequence[str], templates: Sequence[str] = ()) -> pb.LabelSetRef:
        return self.stub.RegisterLabelSet(pb.LabelSet(labels=labels, templates=templates), timeout=self.timeout_s)

    def embed(self, images: Sequence[bytes | str | Path] = (), texts: Sequence[str] = (), model: str = "",
              normalize: bool = True) -> pb.EmbedResponse:
        req = pb.EmbedRequest(images=[_image_bytes(i) for i in images], texts=texts, model=model, normalize=normalize)
        return self.stub.Embed(req, timeout=self.timeout_s)

    def model_info(self) -> pb.ModelInfo:
        return self.stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=self.timeout_s)


class AsyncClient:
    """asyncio client over grpc.aio; same methods and connection settings as Client, awaitable."""

    def __init__(self, target: str = "localhost:50051", timeout_s: float | None = 60.0, *, token: str | None = None,
                 tls: bool = False, tls_ca: PathLike = None, tls_cert: PathLike = None, tls_key: PathLike = None) -> None:
        target, balancing = channel_target(target)
        self.channel = open_channel(target, _OPTIONS + balancing, aio=True, token=token, tls=tls, tls_ca=tls_ca, tls_cert=tls_cert,
                                    tls_key=tls_key)
        self.stub = pb_grpc.ClassifierStub(self.channel)
        self.timeout_s = timeout_s

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        await self.channel.close()

    async def classify(self, image: bytes | str | Path, **kwargs) -> pb.ClassifyResponse:
        return await self.stub.Classify(classify_request(image, **kwargs), timeout=self.timeout_s)

    def classify_stream(self, requests: AsyncIterable[pb.ClassifyRequest] | Iterable[pb.ClassifyRequest],
                        timeout_s: float | None = None) -> AsyncIterator[pb.ClassifyResponse]:
        return self.stub.ClassifyStream(requests, timeout=timeout_s)

    async def register_label_set(self, labels: Sequence[str], templates: Sequence[str] = ()) -> pb.LabelSetRef:
        return await self.stub.RegisterLabelSet(pb.LabelSet(labels=labels, templates=templates), timeout=self.timeout_s)

    async def embed(self, images: Sequence[bytes | str | Path] = (), texts: Sequence[str] = (), model: str = "",
                    normalize: bool = True) -> pb.EmbedResponse:
        req = pb.EmbedRequest(images=[_image_bytes(i) for i in images], texts=texts, model=model, normalize=normalize)
        return await self.stub.Embed(req, timeout=self.timeout_s)

    async def model_info(self) -> pb.ModelInfo:
        return await self.stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=self.timeout_s)
