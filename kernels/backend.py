"""Which implementation an op runs, its torch reference or its Triton kernel, decided without triton.

Why a module of its own: deciding `auto` must not import the kernel modules where they cannot run.
Compiled Triton kernels need CUDA tensors; on a CPU they only run in Triton's interpreter
(TRITON_INTERPRET=1 set before triton is first imported, see adaptclip.kernels._common), which is
for tests: it is orders of magnitude slower than the torch path. So:

- `torch`: the torch path, always.
- `triton`: the kernels, as asked; on a CPU device only under the interpreter (a caller that cannot
  run them says why, `unavailable`).
- `auto`: the kernels on a CUDA device when triton imports and the interpreter is off, else torch.
"""
from __future__ import annotations

import functools
import importlib.util
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # torch is imported where a device is looked at: the CLI's flags import BACKENDS alone
    import torch

BACKENDS = ("auto", "torch", "triton")


def check_backend(backend: str, what: str = "backend") -> str:
    """`backend` if it is one of BACKENDS, else ValueError naming `what`."""
    if backend not in BACKENDS:
        raise ValueError(f"{what} must be one of {', '.join(BACKENDS)}, got {backend!r}")
    return backend


def interpreted() -> bool:
    """True when this process runs Triton kernels in the CPU interpreter (read at triton's first import)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@functools.cache
def _triton_found() -> bool:
    return importlib.util.find_spec("triton") is not None


def unavailable(device: torch.device | str) -> str | None:
    """Why the Triton kernels cannot run on tensors of `device`, or None when they can."""
    import torch

    device = torch.device(device)
    if not _triton_found():
        return "triton is not installed"
    if device.type != "cuda" and not interpreted():
        return (f"Triton kernels need a CUDA device, this one runs on {device} (TRITON_INTERPRET=1 runs them in "
                f"the CPU interpreter, for tests only: far slower than torch)")
    return None


def resolve(backend: str, device: torch.device | str) -> str:
    """'torch' or 'triton' for `backend` on tensors of `device` (`auto`: see the module docstring)."""
    if check_backend(backend) != "auto":
        return backend
    import torch

    device = torch.device(device)
    return "triton" if device.type == "cuda" and not interpreted() and _triton_found() else "torch"


@dataclass(frozen=True)
class KernelBackends:
    """What one served model runs for each hot path: 'triton' or 'torch' ('none' for token selection
    when the model has no token compression), what was asked, and why anything fell back."""

    requested: str = "torch"
    views: str = "torch"
    gs_bias: str = "torch"
    tokens: str = "torch"
    notes: tuple[str, ...] = ()
