"""What the Triton kernels share: where they may run, and the float dtypes they take.

Triton decides at *decoration* time whether `@triton.jit` compiles for the GPU or wraps the
function for its CPU interpreter: it reads `TRITON_INTERPRET` then. That happens both when a
kernel module here is imported and when `triton.language` itself is (its standard library, e.g.
`tl.sum`, is `@triton.jit` code), and the two must agree. So a process that wants the kernels on
CPU tensors must set `TRITON_INTERPRET=1` before the first `import triton` anywhere in it, and
keep it set; note that importing `torch._dynamo` (kornia, open_clip, ONNX export do) imports
triton. `import torch` alone does not. A process that wants the kernels compiled must not set it.
"""
from __future__ import annotations

import functools
import threading
from collections.abc import Callable
from typing import Any

import torch
import triton.language as tl
from triton.runtime.interpreter import InterpretedFunction

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# Triton's CPU interpreter keeps the running grid in process-wide state: two threads launching at
# once (the server renders views on its pool while the encoder thread selects tokens) corrupt each
# other's program ids ("x >= grid_dim[0]"). Interpreted launches take turns; compiled ones need not.
_INTERPRETER = threading.Lock()


def is_interpreted(kernel: object) -> bool:
    """True when `kernel` was decorated under TRITON_INTERPRET=1 (it runs in the CPU interpreter)."""
    return isinstance(kernel, InterpretedFunction)


def check_device(name: str, tensor: torch.Tensor, kernel: object) -> None:
    """Raise unless `kernel` can run on `tensor` where it lives.

    ValueError naming `name` for a CPU tensor and a compiled kernel (compiled kernels need CUDA
    tensors; interpreted ones take CPU or CUDA tensors); RuntimeError when the kernel and
    triton.language were decorated under different TRITON_INTERPRET settings.
    """
    if is_interpreted(kernel) != is_interpreted(tl.sum):
        raise RuntimeError("TRITON_INTERPRET changed between the import of triton.language and of "
                           "adaptclip.kernels: set it before the first `import triton` in the process "
                           "(torch._dynamo, imported by kornia and open_clip, imports triton)")
    if tensor.device.type != "cuda" and not is_interpreted(kernel):
        raise ValueError(f"{name}: Triton kernels need CUDA tensors (or TRITON_INTERPRET=1 set before "
                         f"triton is first imported), got a tensor on {tensor.device}")


def launch(kernel: Any, grid: tuple[int, ...]) -> Callable[..., Any]:
    """`kernel[grid]`, serialised across threads when `kernel` runs in the interpreter."""
    run = kernel[grid]
    if not is_interpreted(kernel):
        return run

    @functools.wraps(run)
    def serial(*args: Any, **kwargs: Any) -> Any:
        with _INTERPRETER:
            return run(*args, **kwargs)
    return serial
