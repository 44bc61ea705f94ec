"""The Classifier's method table with request parsers that never fail: bytes that do not parse become a
`Malformed` marker, which the `rpc` decorator (and a stream's item loop) turns into INVALID_ARGUMENT.

grpc runs a method's request deserializer before its handler, and a parse error there leaves as
`UNKNOWN: Unexpected DecodeError`; wrapping each generated `FromString` keeps every status in
server/errors.py. The table itself is the generated one (`add_ClassifierServicer_to_server`), captured
and re-registered with the wrapped parsers, so no method is listed by hand.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import grpc

from adaptclip.v1 import classifier_pb2 as pb
from adaptclip.v1 import classifier_pb2_grpc as pb_grpc

SERVICE = pb.DESCRIPTOR.services_by_name["Classifier"]


@dataclass(frozen=True)
class Malformed:
    """What a handler receives in place of a message whose bytes did not parse."""

    message_type: str  # e.g. adaptclip.v1.ClassifyRequest
    reason: str

    def describe(self) -> str:
        return f"could not be parsed as {self.message_type} ({self.reason})"


def safe_parser(parse: Callable[[bytes], Any], message_type: str) -> Callable[[bytes], Any]:
    def parse_or_mark(data: bytes) -> Any:
        try:
            return parse(data)
        except Exception as exc:  # noqa: BLE001 - DecodeError and whatever else a parser raises on bad bytes
            return Malformed(message_type, type(exc).__name__)
    return parse_or_mark


class _Capture:
    """Stands in for a server to receive the generated method table."""

    handlers: dict[str, grpc.RpcMethodHandler]

    def add_generic_rpc_handlers(self, handlers: Any) -> None:
        pass

    def add_registered_method_handlers(self, service: str, handlers: dict[str, grpc.RpcMethodHandler]) -> None:
        self.handlers = handlers


def add_classifier(servicer: pb_grpc.ClassifierServicer, server: grpc.aio.Server) -> None:
    """`add_ClassifierServicer_to_server`, with every request parser wrapped by `safe_parser`."""
    capture = _Capture()
    pb_grpc.add_ClassifierServicer_to_server(servicer, capture)
    handlers = {name: h._replace(request_deserializer=safe_parser(h.request_deserializer,
                                                                  SERVICE.methods_by_name[name].input_type.full_name))
                for name, h in capture.handlers.items()}
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE.full_name, handlers),))
    server.add_registered_method_handlers(SERVICE.full_name, handlers)
