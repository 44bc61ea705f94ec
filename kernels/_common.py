"""What the Triton kernels share: where they may run, and the float dtypes they take.

Triton decides at *decoration* time (when a kernel module is imported) whether `@triton.jit`
compiles for the GPU or wraps the kernel for its CPU interpreter: it reads `TRITON_INTERPRET`
then. So a process that wants the kernels on CPU tensors must set `TRITON_INTERPRET=1` before it
imports any `adaptclip.kernels.*` kernel module (importing `triton` itself earlier is harmless),
and a process that wants them compiled for CUDA must not set it.
"""
from __future__ import annotations

import torch
from triton.runtime.interpreter import InterpretedFunction

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def is_interpreted(kernel: object) -> bool:
    """True when `kernel` was decorated under TRITON_INTERPRET=1 (it runs in the CPU interpreter)."""
    return isinstance(kernel, InterpretedFunction)


def check_device(name: str, tensor: torch.Tensor, kernel: object) -> None:
    """ValueError naming `name` unless `kernel` can read `tensor` where it lives.

    Compiled kernels need CUDA tensors; interpreted ones take CPU (or CUDA) tensors.
    """
    if tensor.device.type != "cuda" and not is_interpreted(kernel):
        raise ValueError(f"{name}: Triton kernels need CUDA tensors (or TRITON_INTERPRET=1 set before "
                         f"adaptclip.kernels is imported), got a tensor on {tensor.device}")
