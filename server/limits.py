"""Compute limits: per-request caps on views and steps, and one bound on the views in flight across requests.

The protocol allows 1,024 views and 100 steps; a server caps them lower (`limits.max_views`,
`limits.max_steps`, both in GetModelInfo) so one client cannot hold the encoder for minutes. Every
request being computed reserves its views from one `ViewBudget`; past the bound it is refused at once
with RESOURCE_EXHAUSTED and a retry hint (`retry-after-ms`, estimated from how fast views have been
finishing), instead of joining a queue that grows without end.
"""
from __future__ import annotations

import collections
import contextlib
import math
import time
from collections.abc import Iterator

import grpc

from adaptclip.adapt.settings import AdaptSettings
from adaptclip.server.config import Limits
from adaptclip.server.errors import RequestError, invalid

RATE_WINDOW_S = 10.0  # finished views counted over this long for the retry hint
RETRY_MS = (10, 30_000)  # the hint's bounds; 1 s when nothing finished lately


def check_limits(limits: Limits) -> None:
    """A configuration where the largest allowed request could never run is an error (ValueError)."""
    if min(limits.max_views, limits.max_views_in_flight) < 1 or limits.max_steps < 0:
        raise ValueError("limits: max_views and max_views_in_flight must be >= 1, max_steps >= 0")
    if limits.max_views_in_flight < limits.max_views:
        raise ValueError(f"limits.max_views_in_flight ({limits.max_views_in_flight}) is below limits.max_views "
                         f"({limits.max_views}): a request of max_views could never run")


def check_settings(s: AdaptSettings, limits: Limits, prefix: str = "adaptation") -> None:
    """INVALID_ARGUMENT when the settings ask for more views or steps than this server allows."""
    if s.method != "none" and s.views > limits.max_views:
        raise invalid(f"{prefix}.views", f"{s.views} views is over this server's limit of {limits.max_views} "
                                         f"(GetModelInfo limits.max_views)")
    if s.method in ("gs_bias", "tpt") and s.steps > limits.max_steps:
        raise invalid(f"{prefix}.steps", f"{s.steps} steps is over this server's limit of {limits.max_steps} "
                                         f"(GetModelInfo limits.max_steps)")


def views_needed(s: AdaptSettings) -> int:
    """Views a request may encode: all of them when it adapts (the gate may still skip), else one."""
    return 1 if s.method == "none" else s.views


class ViewBudget:
    """Views reserved by the requests being computed (on one event loop; `in_flight` is exported)."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.in_flight = 0
        self._finished: collections.deque[tuple[float, int]] = collections.deque()

    def retry_after_ms(self, n: int) -> int:
        """How long until `n` more views would fit, at the rate views finished over the last RATE_WINDOW_S."""
        now = time.monotonic()
        while self._finished and self._finished[0][0] < now - RATE_WINDOW_S:
            self._finished.popleft()
        done = sum(k for _, k in self._finished)
        if not done:
            return 1000
        excess = self.in_flight + n - self.limit
        return min(max(math.ceil(excess / (done / RATE_WINDOW_S) * 1000), RETRY_MS[0]), RETRY_MS[1])

    @contextlib.contextmanager
    def hold(self, n: int, field: str = "adaptation.views") -> Iterator[None]:
        """Reserve `n` views for the block; RESOURCE_EXHAUSTED (with retry_after_ms) when they do not fit."""
        if self.in_flight + n > self.limit:
            ms = self.retry_after_ms(n)
            raise RequestError(grpc.StatusCode.RESOURCE_EXHAUSTED, field,
                               f"server busy: {self.in_flight} views in flight, limit {self.limit} "
                               f"(this request needs {n}); retry after {ms} ms", retry_after_ms=ms)
        self.in_flight += n
        try:
            yield
        finally:
            self.in_flight -= n
            self._finished.append((time.monotonic(), n))
