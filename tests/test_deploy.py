"""The deployment files, read as their tools would (Docker cannot run here): docker-compose.yml (two replicas,
Redis, Envoy), examples/envoy.yaml and examples/k8s.yaml. Their services, ports, health checks and the
flags they give `adaptclip serve` must agree with each other and with the server."""
from __future__ import annotations

import argparse
from pathlib import Path
from urllib.parse import urlparse

import yaml

from adaptclip.client import cli
from adaptclip.client.flags import server_config
from adaptclip.server.app import SERVICE_NAME
from adaptclip.server.config import Limits, ServerConfig

ROOT = Path(__file__).resolve().parents[1]
PORT = ServerConfig().port


def _serve_config(argv: list[str]) -> ServerConfig:
    """The config `adaptclip serve ARGV` runs with (flags parsed and checked as the CLI does)."""
    parser = argparse.ArgumentParser()
    cli._serve_parser(parser.add_subparsers())
    return server_config(parser.parse_args(["serve", *argv]))


def _redis_settings(argv: list[str]) -> dict[str, str]:
    assert argv[0] == "redis-server"
    return {flag[2:]: value for flag, value in zip(argv[1::2], argv[2::2])}


def _check_redis(argv: list[str]) -> None:
    """Label sets beside TTL'd cache entries: only volatile-lru spares them; the AOF keeps them on restart."""
    settings = _redis_settings(argv)
    assert settings["maxmemory-policy"] == "volatile-lru" and settings["appendonly"] == "yes"


def _check_replica_args(argv: list[str], redis_host: str, redis_port: int) -> None:
    cfg = _serve_config(argv)  # raises on a config the server refuses (e.g. no cache TTL with Redis)
    url = urlparse(cfg.cache.redis_url)
    assert (url.hostname, url.port) == (redis_host, redis_port)
    assert cfg.cache.ttl_s > 0 and cfg.port == PORT


def test_compose_runs_two_replicas_behind_envoy_on_one_redis():
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    services = compose["services"]
    assert set(services) == {"redis", "adaptclip", "envoy"}
    redis, replica, envoy = services["redis"], services["adaptclip"], services["envoy"]
    _check_redis(redis["command"])
    assert any(v.endswith(":/data") for v in redis["volumes"]) and "redis-data" in compose["volumes"]
    assert redis["healthcheck"]["test"] == ["CMD", "redis-cli", "ping"]

    assert replica["deploy"]["replicas"] == 2
    assert "ports" not in replica and replica["expose"] == [str(PORT)], "replicas are reached through Envoy only"
    assert replica["depends_on"] == {"redis": {"condition": "service_healthy"}}
    _check_replica_args(replica["command"], "redis", 6379)
    probe = " ".join(replica["healthcheck"]["test"])
    assert f"service='{SERVICE_NAME}'" in probe and "SERVING" in probe and f"localhost:{PORT}" in probe
    assert int(replica["stop_grace_period"].rstrip("s")) > ServerConfig().grace_period_s

    assert envoy["depends_on"] == {"adaptclip": {"condition": "service_healthy"}}
    config_path = envoy["command"][envoy["command"].index("-c") + 1]
    mounts = {}
    for volume in envoy["volumes"]:  # HOST:CONTAINER[:MODE]
        host, container, *_ = volume.split(":")
        mounts[container] = host
    assert (ROOT / mounts[config_path]).resolve() == ROOT / "examples" / "envoy.yaml"
    assert f"{PORT}:{PORT}" in envoy["ports"]


def test_envoy_balances_grpc_over_healthy_replicas():
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    envoy = yaml.safe_load((ROOT / "examples" / "envoy.yaml").read_text())["static_resources"]
    (listener,) = envoy["listeners"]
    assert listener["address"]["socket_address"]["port_value"] == PORT
    (manager,) = listener["filter_chains"][0]["filters"]
    assert manager["name"] == "envoy.filters.network.http_connection_manager"
    hcm = manager["typed_config"]
    assert hcm["http_filters"][-1]["name"] == "envoy.filters.http.router"
    (vhost,) = hcm["route_config"]["virtual_hosts"]
    assert vhost["per_request_buffer_limit_bytes"] >= Limits().max_image_bytes, "a retried image must fit"
    (route,) = vhost["routes"]
    action = route["route"]
    assert action["timeout"] == "0s", "Envoy's 15 s default would cut streams and long adaptations"
    assert "unavailable" in action["retry_policy"]["retry_on"].split(",")

    (cluster,) = envoy["clusters"]
    assert cluster["name"] == action["cluster"]
    assert (cluster["type"], cluster["lb_policy"]) == ("STRICT_DNS", "ROUND_ROBIN")
    http = cluster["typed_extension_protocol_options"]["envoy.extensions.upstreams.http.v3.HttpProtocolOptions"]
    assert "http2_protocol_options" in http["explicit_http_config"], "gRPC needs HTTP/2 to the replicas"
    (endpoint,) = cluster["load_assignment"]["endpoints"][0]["lb_endpoints"]
    address = endpoint["endpoint"]["address"]["socket_address"]
    assert address["address"] in compose["services"] and address["port_value"] == PORT
    (check,) = cluster["health_checks"]
    assert check["grpc_health_check"]["service_name"] == SERVICE_NAME


def test_kubernetes_manifest_probes_grpc_health_and_shares_redis():
    docs = {(d["kind"], d["metadata"]["name"]): d for d in yaml.safe_load_all((ROOT / "examples" / "k8s.yaml").read_text())}
    assert set(docs) == {("Deployment", "adaptclip"), ("Service", "adaptclip"), ("StatefulSet", "redis"),
                         ("Service", "redis")}
    deploy, service = docs["Deployment", "adaptclip"], docs["Service", "adaptclip"]
    assert deploy["spec"]["replicas"] >= 2
    pod = deploy["spec"]["template"]
    assert deploy["spec"]["selector"]["matchLabels"] == pod["metadata"]["labels"] == service["spec"]["selector"]
    (container,) = pod["spec"]["containers"]
    assert [p["containerPort"] for p in container["ports"]] == [PORT]
    for probe in ("readinessProbe", "startupProbe"):
        assert container[probe]["grpc"] == {"port": PORT, "service": SERVICE_NAME}
    assert pod["spec"]["terminationGracePeriodSeconds"] > ServerConfig().grace_period_s
    assert service["spec"]["clusterIP"] == "None", "headless: clients balance over every ready pod"
    assert service["spec"]["ports"][0]["port"] == PORT

    redis, redis_service = docs["StatefulSet", "redis"], docs["Service", "redis"]
    (redis_container,) = redis["spec"]["template"]["spec"]["containers"]
    _check_redis(redis_container["args"])
    assert redis_container["volumeMounts"] == [{"name": "data", "mountPath": "/data"}]
    assert redis["spec"]["volumeClaimTemplates"][0]["metadata"]["name"] == "data"
    assert redis_service["spec"]["selector"] == redis["spec"]["template"]["metadata"]["labels"]
    _check_replica_args(container["args"], "redis", redis_service["spec"]["ports"][0]["port"])
