"""How a client channel is secured: TLS (the server verified against a CA; a client certificate for mutual
TLS) and the bearer token sent as `authorization` metadata on every call, from `token=` or ADAPTCLIP_TOKEN.

The token goes through a client interceptor rather than call credentials, which grpc refuses on a
plaintext channel (a TLS-terminating proxy in front of the server is common).
"""
from __future__ import annotations

import collections
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import grpc

TOKEN_ENV = "ADAPTCLIP_TOKEN"

_Details = collections.namedtuple("_Details", ("method", "timeout", "metadata", "credentials", "wait_for_ready",
                                               "compression"))


class _CallDetails(_Details, grpc.ClientCallDetails):
    pass


class _Bearer(grpc.UnaryUnaryClientInterceptor, grpc.UnaryStreamClientInterceptor,
              grpc.StreamUnaryClientInterceptor, grpc.StreamStreamClientInterceptor):
    """Adds the token to every call of a blocking channel."""

    def __init__(self, header: tuple[str, str]) -> None:
        self.header = header

    def _intercept(self, continuation: Any, d: grpc.ClientCallDetails, request: Any) -> Any:
        details = _CallDetails(d.method, d.timeout, [*(d.metadata or ()), self.header], d.credentials,
                               d.wait_for_ready, getattr(d, "compression", None))
        return continuation(details, request)

    intercept_unary_unary = intercept_unary_stream = intercept_stream_unary = intercept_stream_stream = _intercept


class _AsyncBearer:
    """Adds the token to every call of an asyncio channel (grpc.aio files an interceptor under one kind
    only, so there is one subclass per kind)."""

    def __init__(self, header: tuple[str, str]) -> None:
        self.header = header

    async def _intercept(self, continuation: Any, d: grpc.aio.ClientCallDetails, request: Any) -> Any:
        metadata = grpc.aio.Metadata(*(d.metadata or ()), self.header)
        return await continuation(grpc.aio.ClientCallDetails(d.method, d.timeout, metadata, d.credentials,
                                                             d.wait_for_ready), request)


class _AsyncUnaryUnary(_AsyncBearer, grpc.aio.UnaryUnaryClientInterceptor):
    intercept_unary_unary = _AsyncBearer._intercept


class _AsyncUnaryStream(_AsyncBearer, grpc.aio.UnaryStreamClientInterceptor):
    intercept_unary_stream = _AsyncBearer._intercept


class _AsyncStreamUnary(_AsyncBearer, grpc.aio.StreamUnaryClientInterceptor):
    intercept_stream_unary = _AsyncBearer._intercept


class _AsyncStreamStream(_AsyncBearer, grpc.aio.StreamStreamClientInterceptor):
    intercept_stream_stream = _AsyncBearer._intercept


def _read(path: str | Path | None) -> bytes | None:
    return None if path is None else Path(path).read_bytes()


def open_channel(target: str, options: Sequence[tuple[str, Any]], *, aio: bool = False, token: str | None = None,
                 tls: bool = False, tls_ca: str | Path | None = None, tls_cert: str | Path | None = None,
                 tls_key: str | Path | None = None) -> grpc.Channel | grpc.aio.Channel:
    """A channel to `target`: TLS when `tls` or any tls_* file is given (no tls_ca: the system's roots;
    tls_cert + tls_key: a client certificate), plaintext otherwise; the token (None: $ADAPTCLIP_TOKEN,
    "": none) on every call."""
    token = (os.environ.get(TOKEN_ENV, "") if token is None else token).strip()  # `$(cat file)` keeps no newline
    if (tls_cert is None) != (tls_key is None):
        raise ValueError("a client certificate needs both tls_cert and tls_key")
    header = ("authorization", f"Bearer {token}")
    creds = (grpc.ssl_channel_credentials(_read(tls_ca), _read(tls_key), _read(tls_cert))
             if tls or tls_ca or tls_cert else None)
    if aio:
        interceptors = [kind(header) for kind in (_AsyncUnaryUnary, _AsyncUnaryStream, _AsyncStreamUnary,
                                                  _AsyncStreamStream)] if token else None
        if creds is None:
            return grpc.aio.insecure_channel(target, options=options, interceptors=interceptors)
        return grpc.aio.secure_channel(target, creds, options=options, interceptors=interceptors)
    channel = grpc.insecure_channel(target, options) if creds is None else grpc.secure_channel(target, creds, options)
    return grpc.intercept_channel(channel, _Bearer(header)) if token else channel
