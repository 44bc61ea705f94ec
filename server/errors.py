"""The service's one mapping from exceptions to gRPC statuses, and the request errors that carry theirs.

Compute code raises `FieldError` (bad value, field named), `Unsupported` (valid, but not for this
model) and `TimeoutError` (the request's deadline passed mid-adaptation); the service raises
`RequestError` with its own status. `status_for` turns any exception into (status, message); `rpc`
applies it to a handler, so no exception reaches a client as UNKNOWN: an unexpected one is INTERNAL
naming the request id that is also in the server log, and the server goes on. `rpc` also answers
requests whose bytes did not parse (`wire.Malformed`), and counts and logs every call (server/logs.py).
"""
from __future__ import annotations

import asyncio
import contextlib
import functools
import inspect
import logging
import time
from collections.abc import AsyncIterator, Callable
from typing import Any, TypeVar

import grpc

from adaptclip.adapt.encoder import Unsupported
from adaptclip.adapt.settings import FieldError
from adaptclip.server.logs import REQUEST_ID, current_request_id, finished, new_request_id, request_id_for
from adaptclip.server.wire import Malformed

log = logging.getLogger(__name__)
F = TypeVar("F", bound=Callable[..., Any])


class RequestError(Exception):
    """A client-visible error; the message always names the field at fault."""

    def __init__(self, code: grpc.StatusCode, field: str, message: str, retry_after_ms: int | None = None) -> None:
        super().__init__(f"{field}: {message}")
        self.code = code
        self.field = field
        self.retry_after_ms = retry_after_ms  # sent as trailing metadata `retry-after-ms`


def invalid(field: str, message: str) -> RequestError:
    return RequestError(grpc.StatusCode.INVALID_ARGUMENT, field, message)


def not_found(field: str, message: str) -> RequestError:
    return RequestError(grpc.StatusCode.NOT_FOUND, field, message)


def failed_precondition(field: str, message: str) -> RequestError:
    """A valid request this model cannot serve (e.g. TPT on a bundle without a text tower)."""
    return RequestError(grpc.StatusCode.FAILED_PRECONDITION, field, message)


def parsed(request: Any, field: str = "request") -> Any:
    """`request`, or INVALID_ARGUMENT when its bytes did not parse."""
    if isinstance(request, Malformed):
        raise invalid(field, request.describe())
    return request


def status_for(exc: BaseException, what: str) -> tuple[grpc.StatusCode, str]:
    """The status and message a client gets for `exc` raised while serving `what` (an RPC name)."""
    if isinstance(exc, RequestError):
        return exc.code, str(exc)
    if isinstance(exc, FieldError):
        return grpc.StatusCode.INVALID_ARGUMENT, str(exc)
    if isinstance(exc, Unsupported):
        return grpc.StatusCode.FAILED_PRECONDITION, str(exc)
    if isinstance(exc, TimeoutError):
        return grpc.StatusCode.DEADLINE_EXCEEDED, f"adaptation: {str(exc) or 'deadline passed'}"
    request_id = current_request_id()
    log.error("%s failed (request id %s)", what, request_id, exc_info=exc)
    return grpc.StatusCode.INTERNAL, f"internal error (request id {request_id}, in the server log)"


def _trailers(request_id: str, exc: BaseException | None = None) -> tuple[tuple[str, str], ...]:
    retry = getattr(exc, "retry_after_ms", None)
    return (("x-request-id", request_id),) + ((("retry-after-ms", str(retry)),) if retry is not None else ())


def _ended(context: grpc.aio.ServicerContext) -> grpc.StatusCode:
    """The status of a call that ended without an answer (abort, cancel, deadline)."""
    code = context.code() if hasattr(context, "code") else None
    if isinstance(code, grpc.StatusCode):
        return code
    remaining = context.time_remaining()
    return grpc.StatusCode.DEADLINE_EXCEEDED if remaining is not None and remaining <= 0 else grpc.StatusCode.CANCELLED


@contextlib.asynccontextmanager
async def _served(service: Any, name: str, request_id: str, context: grpc.aio.ServicerContext) -> AsyncIterator[None]:
    """One call: its id on this task and in the trailers, every exception as its status, counted and logged."""
    started, peer = time.perf_counter(), context.peer()
    REQUEST_ID.set(request_id)
    context.set_trailing_metadata(_trailers(request_id))
    code, counted = grpc.StatusCode.OK, False
    try:
        yield
    except (grpc.aio.AbortError, asyncio.CancelledError, GeneratorExit):
        code = _ended(context)
        raise
    except Exception as exc:  # noqa: BLE001 - the one mapping
        code, message = status_for(exc, name)
        counted = True  # before abort: the client may read the metrics the moment it has the status
        finished(service.metrics, name, code, started, request_id, peer)
        await context.abort(code, message, trailing_metadata=_trailers(request_id, exc))
    finally:
        if not counted:
            finished(service.metrics, name, code, started, request_id, peer)


def rpc(handler: F) -> F:
    """Wrap a unary or server-streaming servicer method: every exception leaves as its mapped status, and
    each call is counted and logged once under its request id (also sent back as `x-request-id`)."""
    name = handler.__name__
    if inspect.isasyncgenfunction(handler):

        @functools.wraps(handler)
        async def stream(self, request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
            async with _served(self, name, new_request_id(), context):
                async for item in handler(self, request, context):
                    yield item
        return stream  # type: ignore[return-value]

    @functools.wraps(handler)
    async def unary(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        async with _served(self, name, request_id_for(request), context):
            return await handler(self, parsed(request), context)
    return unary  # type: ignore[return-value]
