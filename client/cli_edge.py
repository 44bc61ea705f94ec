"""`adaptclip edge classify`: classify with an exported bundle, in process, without torch.

The same runner is `python -m adaptclip.compression.edge classify` for devices without grpc.
"""
from __future__ import annotations

import argparse


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    from adaptclip.compression.edge import add_classify_arguments

    p = subparsers.add_parser("edge", help="run an exported ONNX bundle locally (no server, no torch)")
    sub = p.add_subparsers(dest="edge_command", required=True)
    add_classify_arguments(sub.add_parser("classify", help="classify images with a bundle"))


def run(args: argparse.Namespace) -> int:
    from adaptclip.compression.edge import run_classify

    return run_classify(args)
