"""Request errors that carry their gRPC status and the offending field."""
from __future__ import annotations

import grpc


class RequestError(Exception):
    """A client-visible error; the message always names the field at fault."""

    def __init__(self, code: grpc.StatusCode, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.code = code
        self.field = field


def invalid(field: str, message: str) -> RequestError:
    return RequestError(grpc.StatusCode.INVALID_ARGUMENT, field, message)


def not_found(field: str, message: str) -> RequestError:
    return RequestError(grpc.StatusCode.NOT_FOUND, field, message)


def failed_precondition(field: str, message: str) -> RequestError:
    """A valid request this model cannot serve (e.g. TPT on a bundle without a text tower)."""
    return RequestError(grpc.StatusCode.FAILED_PRECONDITION, field, message)
