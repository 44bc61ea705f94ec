"""Where a client connects: one address, several (`host1:port,host2:port`) or a DNS name with several records
(`dns:///name:port`), all through gRPC's own machinery: a target it resolves to every address, the
`round_robin` policy over the ones whose health service says SERVING, and its retry policy for UNAVAILABLE.

Every unary RPC of adaptclip.v1.Classifier is safe to send twice, so each is retried on UNAVAILABLE (what a
call gets when its replica died, is shutting down or still loading models) on the next address: Classify
answers the same for the same request (its views are seeded: seed 0 unless the request sets one),
RegisterLabelSet's id is a content hash, Embed and GetModelInfo only read. ClassifyStream is retried the
same way until the first answer arrives (gRPC commits a stream then); a stream cut after that fails with
UNAVAILABLE and its caller re-sends the requests that got no answer (`adaptclip label` does on a re-run).
"""
from __future__ import annotations

import ipaddress
import json
import socket
from typing import Any

SERVICE = "adaptclip.v1.Classifier"
SCHEMES = ("dns:", "ipv4:", "ipv6:", "unix:", "unix-abstract:", "vsock:", "xds:")  # gRPC resolves these itself
RETRY_BUFFER = 64 * 1024 * 1024  # a request is retried only while it fits here: room for the largest image
RETRY_POLICY = {"maxAttempts": 5, "initialBackoff": "0.05s", "maxBackoff": "1s", "backoffMultiplier": 2,
                "retryableStatusCodes": ["UNAVAILABLE"]}


def service_config() -> dict[str, Any]:
    """Round robin over healthy addresses; retries for UNAVAILABLE, throttled when most calls fail."""
    return {"loadBalancingConfig": [{"round_robin": {}}],
            "healthCheckConfig": {"serviceName": SERVICE},
            "methodConfig": [{"name": [{"service": SERVICE}], "retryPolicy": RETRY_POLICY}],
            "retryThrottling": {"maxTokens": 100, "tokenRatio": 0.1}}


def _split(address: str) -> tuple[str, int]:
    host, sep, port = address.strip().rpartition(":")
    if not sep or not host or not port.isdigit():
        raise ValueError(f"server address '{address}': expected HOST:PORT")
    return host.strip("[]"), int(port)


def _addresses(host: str, port: int) -> list[ipaddress.IPv4Address | ipaddress.IPv6Address]:
    try:
        return [ipaddress.ip_address(host)]
    except ValueError:
        pass
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise ValueError(f"server address '{host}:{port}': cannot resolve '{host}': {exc.strerror}") from None
    return list(dict.fromkeys(ipaddress.ip_address(info[4][0].split("%")[0]) for info in infos))


def list_target(addresses: str) -> str:
    """`host1:port,host2:port` as one `ipv4:`/`ipv6:` target (gRPC has no scheme for several names): names
    are resolved here, once; all IPv4 when every host has an IPv4 address, else all IPv6."""
    parsed = [_split(a) for a in addresses.split(",")]  # every address well formed before any look-up
    resolved = [(port, _addresses(host, port)) for host, port in parsed]
    for family, scheme in ((ipaddress.IPv4Address, "ipv4"), (ipaddress.IPv6Address, "ipv6")):
        if all(any(isinstance(a, family) for a in addrs) for _, addrs in resolved):
            fmt = "{}:{}" if scheme == "ipv4" else "[{}]:{}"
            picked = [fmt.format(a, port) for port, addrs in resolved for a in addrs if isinstance(a, family)]
            return f"{scheme}:" + ",".join(dict.fromkeys(picked))
    raise ValueError(f"server addresses '{addresses}': mix IPv4-only and IPv6-only hosts; give one family")


def channel_target(address: str) -> tuple[str, list[tuple[str, Any]]]:
    """The gRPC target for `address` and the channel options that balance and retry over it."""
    target = list_target(address) if "," in address and not address.startswith(SCHEMES) else address
    return target, [("grpc.service_config", json.dumps(service_config())), ("grpc.enable_retries", 1),
                    ("grpc.per_rpc_retry_buffer_size", RETRY_BUFFER)]
