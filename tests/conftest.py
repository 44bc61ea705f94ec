"""Shared fixtures: a tiny open_clip model saved as a real checkpoint, images, an in-process server."""
from __future__ import annotations

import os

import torch

# Triton kernels run on the CPU under the interpreter, which triton fixes when it is first imported
# (open_clip and kornia import it through torch._dynamo): so before anything else imports them.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import asyncio
import io
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import open_clip
import pytest
from PIL import Image

from adaptclip.client import Client
from adaptclip.server.app import App
from adaptclip.compression.models import ModelSpec
from adaptclip.server.config import ServerConfig
from adaptclip.compression.models import TorchModel, load_model

TINY_CONFIG = Path(__file__).parent / "models" / "tiny-vit.json"
TINY_NAME = TINY_CONFIG.stem
LABELS = ["cat", "dog", "car", "tree", "boat", "house", "bird", "plane"]


def make_image(seed: int, size: tuple[int, int] = (48, 40), fmt: str = "PNG") -> bytes:
    """A deterministic picture (noise + a rectangle) encoded as `fmt`."""
    rng = np.random.default_rng(seed)
    arr = rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)
    y, x = size[1] // 4, size[0] // 4
    arr[y:3 * y, x:3 * x] = rng.integers(0, 255, 3, dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format=fmt)
    return buf.getvalue()


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random-init tiny model saved as a state dict: served through the real --pretrained PATH route."""
    torch.manual_seed(0)
    open_clip.add_model_config(TINY_CONFIG)
    model = open_clip.create_model(TINY_NAME)
    path = tmp_path_factory.mktemp("ckpt") / "tiny.pt"
    torch.save(model.state_dict(), path)
    return path


@pytest.fixture(scope="session")
def tiny_spec(tiny_checkpoint: Path) -> ModelSpec:
    return ModelSpec(model=str(TINY_CONFIG), pretrained=str(tiny_checkpoint), device="cpu")


@pytest.fixture(scope="module")
def one_thread() -> Iterator[None]:
    """Many tiny forward/backward passes: on a busy 2-core machine two threads are far slower than one."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def hosted(tiny_spec: ModelSpec) -> TorchModel:
    """The tiny model loaded as the server loads it (outside any server)."""
    return load_model(tiny_spec)


class ServerThread:
    """An App on its own event loop in a thread, so tests can use the blocking client."""

    def __init__(self, cfg: ServerConfig, models: list[TorchModel]) -> None:
        self.cfg, self.models = cfg, models
        self.app: App | None = None
        self.port = 0
        self._ready = threading.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._thread = threading.Thread(target=lambda: asyncio.run(self._main()), daemon=True)
        self._error: BaseException | None = None

    async def _main(self) -> None:
        try:
            self._loop, self._stop = asyncio.get_running_loop(), asyncio.Event()
            self.app = App(self.cfg)
            self.port = await self.app.start()
            await self.app.load(self.models)
        except BaseException as exc:  # surfaced by start()
            self._error = exc
            self._ready.set()
            raise
        self._ready.set()
        await self._stop.wait()
        await self.app.stop(1.0)

    def start(self) -> ServerThread:
        self._thread.start()
        self._ready.wait(60)
        if self._error:
            raise self._error
        return self

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def call(self, coro) -> object:
        """Run a coroutine on the server's loop (to inspect or poke its state)."""
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(30)

    def stop(self) -> None:
        self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(30)


def start_server(spec: ModelSpec, **overrides) -> ServerThread:
    cfg = ServerConfig(host="127.0.0.1", port=0, models=[spec])
    for key, value in overrides.items():
        section, _, attr = key.partition("__")
        setattr(getattr(cfg, section), attr, value) if attr else setattr(cfg, key, value)
    return ServerThread(cfg, [load_model(spec)]).start()


@pytest.fixture(scope="session")
def server(tiny_spec: ModelSpec) -> Iterator[ServerThread]:
    srv = start_server(tiny_spec, cache__enabled=False)  # cache behaviour has its own servers (test_cache.py)
    yield srv
    srv.stop()


@pytest.fixture()
def client(server: ServerThread) -> Iterator[Client]:
    with Client(server.target, timeout_s=30) as c:
        yield c
