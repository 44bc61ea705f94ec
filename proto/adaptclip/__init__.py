"""adaptclip: zero-shot image classification over gRPC with per-request test-time adaptation."""

__version__ = "0.1.0"
