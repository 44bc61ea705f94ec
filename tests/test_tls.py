"""TLS and mutual TLS on the port, with certificates this test makes with openssl (tests/certs.py)."""
from __future__ import annotations

import asyncio

import grpc
import pytest

from adaptclip.client import AsyncClient, Client
from adaptclip.server.auth import AuthConfigError, server_credentials
from adaptclip.server.config import SecurityConfig
from certs import make_pki
from conftest import LABELS, make_image, start_server

TOKEN = "tls-test-token-0123456789abcdef"


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    return make_pki(tmp_path_factory.mktemp("pki"))


def _refused(c: Client) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as err:
        c.model_info()
    return err.value.code()


def test_tls_server_with_token(tiny_spec, pki, tmp_path):
    tokens = tmp_path / "tokens"
    tokens.write_text(TOKEN + "\n")
    srv = start_server(tiny_spec, cache__enabled=False, security__tls_cert=str(pki.server_cert),
                       security__tls_key=str(pki.server_key), security__auth_token_file=str(tokens))
    try:
        with Client(srv.target, timeout_s=30, token=TOKEN, tls_ca=pki.ca) as c:
            assert c.classify(make_image(1), labels=LABELS).top
        with Client(f"localhost:{srv.port}", timeout_s=30, token=TOKEN, tls_ca=str(pki.ca)) as c:
            assert c.model_info().models  # the certificate names localhost too
        with Client(srv.target, timeout_s=5, token=TOKEN) as c:  # plaintext to a TLS port
            assert _refused(c) == grpc.StatusCode.UNAVAILABLE
        with Client(srv.target, timeout_s=5, token=TOKEN, tls_ca=pki.other_ca) as c:  # server not trusted
            assert _refused(c) == grpc.StatusCode.UNAVAILABLE
        with Client(srv.target, timeout_s=5, tls_ca=pki.ca, token="") as c:  # TLS alone is not auth
            assert _refused(c) == grpc.StatusCode.UNAUTHENTICATED
    finally:
        srv.stop()


def test_mutual_tls_requires_a_client_certificate_from_the_ca(tiny_spec, pki):
    srv = start_server(tiny_spec, cache__enabled=False, security__tls_cert=str(pki.server_cert),
                       security__tls_key=str(pki.server_key), security__tls_client_ca=str(pki.ca))
    try:
        with Client(srv.target, timeout_s=30, tls_ca=pki.ca, tls_cert=pki.client_cert, tls_key=pki.client_key) as c:
            assert c.classify(make_image(2), labels=LABELS).top
        with Client(srv.target, timeout_s=5, tls_ca=pki.ca) as c:  # no client certificate
            assert _refused(c) == grpc.StatusCode.UNAVAILABLE
        with Client(srv.target, timeout_s=5, tls_ca=pki.ca, tls_cert=pki.other_cert, tls_key=pki.other_key) as c:
            assert _refused(c) == grpc.StatusCode.UNAVAILABLE  # a certificate from a CA the server does not trust

        async def run():
            async with AsyncClient(srv.target, tls_ca=pki.ca, tls_cert=pki.client_cert, tls_key=pki.client_key) as c:
                return await c.model_info()

        assert asyncio.run(run()).default_model == "tiny-vit"
    finally:
        srv.stop()


def test_bad_tls_settings_are_refused_before_the_port_opens(pki, tmp_path):
    with pytest.raises(AuthConfigError, match="both tls_cert and tls_key"):
        server_credentials(SecurityConfig(tls_cert=str(pki.server_cert)))
    with pytest.raises(AuthConfigError, match="both tls_cert and tls_key"):
        server_credentials(SecurityConfig(tls_client_ca=str(pki.ca)))
    with pytest.raises(AuthConfigError, match="tls_key .*missing.pem"):
        server_credentials(SecurityConfig(tls_cert=str(pki.server_cert), tls_key=str(tmp_path / "missing.pem")))
    assert server_credentials(SecurityConfig()) is None
    with pytest.raises(ValueError, match="both tls_cert and tls_key"):
        Client("localhost:1", tls_cert=pki.client_cert)
