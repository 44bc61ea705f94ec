"""Bearer-token auth: every Classifier RPC needs a token, health and reflection stay open, reload on SIGHUP
keeps the old tokens when the new file is bad, and no token ever reaches a log or an error message."""
from __future__ import annotations

import asyncio
import logging

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

from adaptclip.client import AsyncClient, Client
from adaptclip.client.client import classify_request
from adaptclip.server.auth import AuthConfigError, read_tokens
from conftest import LABELS, make_image, start_server

TOKEN = "s3cret-token-0123456789abcdef"
OTHER = "another-token-9876543210fedcba"


def _token_file(tmp_path, *lines: str):
    path = tmp_path / "tokens"
    path.write_text("\n".join(lines) + "\n")
    path.chmod(0o600)
    return path


@pytest.fixture(scope="module")
def authed(tiny_spec, tmp_path_factory):
    path = _token_file(tmp_path_factory.mktemp("auth"), "# ops team", "", TOKEN, f"  {OTHER}  ")
    srv = start_server(tiny_spec, cache__enabled=False, security__auth_token_file=str(path))
    yield srv, path
    srv.stop()


def _calls(c: Client) -> dict:
    """One call per Classifier RPC."""
    return {"Classify": lambda: c.classify(make_image(1), labels=LABELS),
            "ClassifyStream": lambda: list(c.classify_stream([classify_request(make_image(1), labels=LABELS)])),
            "RegisterLabelSet": lambda: c.register_label_set(LABELS),
            "Embed": lambda: c.embed(texts=["a"]),
            "GetModelInfo": c.model_info}


def _status(fn) -> grpc.RpcError | None:
    try:
        fn()
    except grpc.RpcError as exc:
        return exc
    return None


def test_token_file_skips_comments_and_blanks_and_rejects_bad_lines(tmp_path):
    assert len(read_tokens(_token_file(tmp_path, "# c", "", TOKEN, "  " + OTHER))) == 2
    with pytest.raises(AuthConfigError, match="holds no token"):
        read_tokens(_token_file(tmp_path, "# only a comment", ""))
    with pytest.raises(AuthConfigError, match="line 2") as err:
        read_tokens(_token_file(tmp_path, TOKEN, "two words"))
    assert "two words" not in str(err.value) and TOKEN not in str(err.value)
    with pytest.raises(AuthConfigError, match="cannot read"):
        read_tokens(tmp_path / "missing")


@pytest.mark.parametrize("token,why", [("", "no `authorization` metadata"), ("wrong-token-0123456789", "not accepted")])
def test_every_classifier_rpc_needs_a_token(authed, token, why):
    srv, _ = authed
    with Client(srv.target, timeout_s=30, token=token) as c:
        for rpc, call in _calls(c).items():
            err = _status(call)
            assert err is not None and err.code() == grpc.StatusCode.UNAUTHENTICATED, rpc
            assert why in err.details() and (not token or token not in err.details()), (rpc, err.details())
            assert dict(err.trailing_metadata()).get("x-request-id")
    assert srv.app.metrics.value("adaptclip_requests_total", rpc="Embed", code="UNAUTHENTICATED") >= 1


def test_scheme_other_than_bearer_is_refused(authed):
    srv, _ = authed
    with grpc.insecure_channel(srv.target) as channel:
        info = channel.unary_unary("/adaptclip.v1.Classifier/GetModelInfo")
        err = _status(lambda: info(b"", metadata=(("authorization", f"Basic {TOKEN}"),)))
        assert err.code() == grpc.StatusCode.UNAUTHENTICATED and "Bearer <token>" in err.details()
        assert TOKEN not in err.details()
        assert info(b"", metadata=(("authorization", f"bearer {OTHER}"),)) is not None  # scheme is case-blind


def test_valid_tokens_pass_and_health_and_reflection_stay_open(authed, monkeypatch):
    srv, _ = authed
    with Client(srv.target, timeout_s=30, token=TOKEN) as c:
        for rpc, call in _calls(c).items():
            assert _status(call) is None, rpc
    monkeypatch.setenv("ADAPTCLIP_TOKEN", OTHER)
    with Client(srv.target, timeout_s=30) as c:
        assert c.model_info().default_model == "tiny-vit"
    with grpc.insecure_channel(srv.target) as channel:  # no token at all
        health = health_pb2_grpc.HealthStub(channel)
        req = health_pb2.HealthCheckRequest(service="adaptclip.v1.Classifier")
        assert health.Check(req).status == health_pb2.HealthCheckResponse.SERVING
        assert "adaptclip.v1.Classifier" in ProtoReflectionDescriptorDatabase(channel).get_services()


def test_async_client_sends_the_token(authed):
    srv, _ = authed

    async def run():
        async with AsyncClient(srv.target, token=TOKEN) as c:
            one = await c.classify(make_image(2), labels=LABELS)
            items = [r async for r in c.classify_stream([classify_request(make_image(3), labels=LABELS)])]
            return one, items, await c.model_info()

    one, items, info = asyncio.run(run())
    assert one.top and not items[0].HasField("error") and info.models


def test_reload_swaps_tokens_and_keeps_them_when_the_file_is_bad(authed, caplog):
    srv, path = authed
    new = "rotated-token-abcdefghijklmnop"
    try:
        with caplog.at_level(logging.INFO, logger="adaptclip"):
            path.write_text(new + "\n")
            srv.app.reload()
            with Client(srv.target, token=new) as c:
                assert c.model_info().models
            with Client(srv.target, token=TOKEN) as c:
                assert _status(c.model_info).code() == grpc.StatusCode.UNAUTHENTICATED
            for bad in ("", "has a space in it\n"):
                path.write_text(bad)
                srv.app.reload()
                with Client(srv.target, token=new) as c:
                    assert c.model_info().models, "a bad file on reload must keep the tokens loaded before"
            path.unlink()
            srv.app.reload()
            with Client(srv.target, token=new) as c:
                assert c.model_info().models
        text = caplog.text
        assert "reload failed" in text and "keeping the 1 token(s)" in text
        assert all(t not in text for t in (TOKEN, OTHER, new, "has a space"))
        assert srv.app.metrics.value("adaptclip_auth_reloads_total", result="error") == 3
    finally:
        path.write_text(f"{TOKEN}\n{OTHER}\n")
        srv.app.reload()


def test_no_reflection_closes_it(tiny_spec):
    srv = start_server(tiny_spec, cache__enabled=False, security__reflection=False)
    try:
        with grpc.insecure_channel(srv.target) as channel:
            with pytest.raises(grpc.RpcError) as err:
                ProtoReflectionDescriptorDatabase(channel).get_services()
            assert err.value.code() == grpc.StatusCode.UNIMPLEMENTED
            with Client(srv.target) as c:
                assert c.model_info().models  # the API itself is unaffected
    finally:
        srv.stop()


def test_a_server_with_an_unusable_token_file_does_not_start(tiny_spec, tmp_path):
    from adaptclip.server.app import App
    from adaptclip.server.config import SecurityConfig, ServerConfig

    cfg = ServerConfig(models=[tiny_spec], security=SecurityConfig(auth_token_file=str(tmp_path / "nope")))
    with pytest.raises(AuthConfigError, match="nope"):
        App(cfg)
