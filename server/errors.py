"""The service's one mapping from exceptions to gRPC statuses, and the request errors that carry theirs.

Compute code raises `FieldError` (bad value, field named) and `Unsupported` (valid, but not for this
model); the service raises `RequestError` with its own status. `status_for` turns any exception into
(status, message); `rpc` applies it to a handler, so no exception reaches a client as UNKNOWN: an
unexpected one is INTERNAL with an error id that is also in the server log, and the server goes on.
"""
from __future__ import annotations

import functools
import inspect
import logging
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any, TypeVar

import grpc

from adaptclip.adapt.encoder import Unsupported
from adaptclip.adapt.settings import FieldError

log = logging.getLogger(__name__)
F = TypeVar("F", bound=Callable[..., Any])


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


def status_for(exc: BaseException, what: str) -> tuple[grpc.StatusCode, str]:
    """The status and message a client gets for `exc` raised while serving `what` (an RPC name)."""
    if isinstance(exc, RequestError):
        return exc.code, str(exc)
    if isinstance(exc, FieldError):
        return grpc.StatusCode.INVALID_ARGUMENT, str(exc)
    if isinstance(exc, Unsupported):
        return grpc.StatusCode.FAILED_PRECONDITION, str(exc)
    error_id = uuid.uuid4().hex[:16]
    log.error("%s failed (error id %s)", what, error_id, exc_info=exc)
    return grpc.StatusCode.INTERNAL, f"internal error (error id {error_id}, in the server log)"


def rpc(handler: F) -> F:
    """Wrap a unary or server-streaming servicer method: every exception leaves as its mapped status."""
    name = handler.__name__
    if inspect.isasyncgenfunction(handler):

        @functools.wraps(handler)
        async def stream(self, request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
            try:
                async for item in handler(self, request, context):
                    yield item
            except grpc.aio.AbortError:
                raise
            except Exception as exc:  # noqa: BLE001 - the one mapping
                await context.abort(*status_for(exc, name))
        return stream  # type: ignore[return-value]

    @functools.wraps(handler)
    async def unary(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        try:
            return await handler(self, request, context)
        except grpc.aio.AbortError:
            raise
        except Exception as exc:  # noqa: BLE001 - the one mapping
            await context.abort(*status_for(exc, name))
    return unary  # type: ignore[return-value]
