"""Who may call: bearer tokens (a server interceptor) and TLS / mutual TLS credentials for the port.

Every Classifier RPC needs `authorization: Bearer <token>` metadata with a token from the token file;
health and reflection stay open (load balancers and grpcurl). Tokens are kept only as SHA-256 digests,
compared in constant time against every accepted one, and never logged or echoed. The file is re-read
on SIGHUP; a file that cannot be read or holds no valid token keeps the tokens already loaded.
"""
from __future__ import annotations

import hashlib
import hmac
import logging
import os
import stat
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import grpc

from adaptclip.server.config import SecurityConfig
from adaptclip.server.logs import finished, new_request_id
from adaptclip.server.metrics import Metrics

log = logging.getLogger(__name__)
MIN_TOKEN_CHARS = 16  # shorter tokens are accepted, with a warning
SCHEME = "bearer"


class AuthConfigError(ValueError):
    """A token file or TLS file that cannot be used (the message names which and why, never a token)."""


def read_tokens(path: str | Path) -> list[bytes]:
    """The tokens of a token file (one a line; blank lines and `#` comments skipped) as SHA-256 digests."""
    try:
        text = Path(path).read_text(encoding="ascii")
    except (OSError, UnicodeDecodeError) as exc:
        raise AuthConfigError(f"token file {path}: cannot read it ({type(exc).__name__}: {exc.args[-1]})") from None
    digests, short = [], 0
    for number, line in enumerate(text.splitlines(), 1):
        token = line.strip()
        if not token or token.startswith("#"):
            continue
        if any(not 0x21 <= ord(c) <= 0x7E for c in token):
            raise AuthConfigError(f"token file {path}, line {number}: a token is printable ASCII without spaces")
        short += len(token) < MIN_TOKEN_CHARS
        digests.append(hashlib.sha256(token.encode()).digest())
    if not digests:
        raise AuthConfigError(f"token file {path}: holds no token (one a line; `#` starts a comment)")
    if short:
        log.warning("token file %s: %d token(s) shorter than %d characters", path, short, MIN_TOKEN_CHARS)
    if os.stat(path).st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        log.warning("token file %s is readable by group or others: chmod 600 it", path)
    return digests


class TokenStore:
    """The accepted tokens, from a file, replaced whole by `reload()`."""

    def __init__(self, path: str | Path, metrics: Metrics) -> None:
        self.path = path
        self.metrics = metrics
        self._digests = read_tokens(path)
        metrics.auth_tokens.set(len(self._digests))

    def reload(self) -> bool:
        """Re-read the file (SIGHUP); on any problem keep the current tokens and log why. True when replaced."""
        try:
            digests = read_tokens(self.path)
        except AuthConfigError as exc:
            self.metrics.auth_reloads.labels("error").inc()
            log.error("token reload failed, keeping the %d token(s) loaded before: %s", len(self._digests), exc)
            return False
        self._digests = digests
        self.metrics.auth_reloads.labels("ok").inc()
        self.metrics.auth_tokens.set(len(digests))
        log.info("token file %s reloaded: %d token(s)", self.path, len(digests))
        return True

    def accepts(self, token: str) -> bool:
        """Constant time in the token and over every accepted one (no early exit on a match)."""
        given = hashlib.sha256(token.encode("utf-8", "surrogatepass")).digest()
        ok = False
        for digest in self._digests:
            ok |= hmac.compare_digest(given, digest)
        return ok

    def problem(self, metadata: tuple[tuple[str, Any], ...] | None) -> str | None:
        """Why a call's metadata is not authorised (None: it is); says what is wrong, never the token."""
        values = [v for k, v in metadata or () if k == "authorization"]
        if not values:
            return "no `authorization` metadata: send `authorization: Bearer <token>`"
        value = values[0] if isinstance(values[0], str) else values[0].decode("utf-8", "replace")
        scheme, _, token = value.strip().partition(" ")
        if scheme.lower() != SCHEME or not token.strip():
            return "`authorization` metadata is not of the form `Bearer <token>`"
        if not self.accepts(token.strip()):
            return "bearer token not accepted"
        return None


def _denied(handler: grpc.RpcMethodHandler, rpc: str, message: str, metrics: Metrics) -> grpc.RpcMethodHandler:
    """A handler of `handler`'s kind that answers UNAUTHENTICATED (and leaves the request unparsed)."""

    async def deny(request: Any, context: grpc.aio.ServicerContext) -> None:
        started, request_id = time.perf_counter(), new_request_id()
        finished(metrics, rpc, grpc.StatusCode.UNAUTHENTICATED, started, request_id, context.peer())
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, message, trailing_metadata=(("x-request-id", request_id),))

    kind = {(False, False): grpc.unary_unary_rpc_method_handler, (False, True): grpc.unary_stream_rpc_method_handler,
            (True, False): grpc.stream_unary_rpc_method_handler, (True, True): grpc.stream_stream_rpc_method_handler}
    return kind[handler.request_streaming, handler.response_streaming](
        deny, response_serializer=handler.response_serializer)


class AuthInterceptor(grpc.aio.ServerInterceptor):
    """Bearer-token check on the methods of `service` (e.g. `adaptclip.v1.Classifier`); others pass."""

    def __init__(self, tokens: TokenStore, service: str, metrics: Metrics) -> None:
        self.tokens, self.prefix, self.metrics = tokens, f"/{service}/", metrics

    async def intercept_service(self, continuation: Callable[[grpc.HandlerCallDetails], Awaitable[Any]],
                                details: grpc.HandlerCallDetails) -> Any:
        handler = await continuation(details)
        if handler is None or not details.method.startswith(self.prefix):
            return handler
        problem = self.tokens.problem(details.invocation_metadata)
        if problem is None:
            return handler
        return _denied(handler, details.method[len(self.prefix):], problem, self.metrics)


def _read(path: str, what: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise AuthConfigError(f"security.{what} {path}: cannot read it ({exc.strerror})") from None


def server_credentials(sec: SecurityConfig) -> grpc.ServerCredentials | None:
    """TLS credentials for the port (mutual TLS with `tls_client_ca`), or None for plaintext."""
    if not (sec.tls_cert or sec.tls_key or sec.tls_client_ca):
        return None
    if not (sec.tls_cert and sec.tls_key):
        raise AuthConfigError("security: TLS needs both tls_cert and tls_key (--tls-cert, --tls-key)")
    ca = _read(sec.tls_client_ca, "tls_client_ca") if sec.tls_client_ca else None
    return grpc.ssl_server_credentials([(_read(sec.tls_key, "tls_key"), _read(sec.tls_cert, "tls_cert"))],
                                       root_certificates=ca, require_client_auth=ca is not None)
