"""`adaptclip serve` run securely as the README says: TLS + token file + metrics + JSON logs; `classify` and
`label` through it with --tls-ca and a token; SIGHUP rotates the tokens; no token is ever logged."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request

import grpc
import pytest

from adaptclip.client import Client
from certs import make_pki
from conftest import LABELS, TINY_CONFIG, make_image

ADAPTCLIP = [sys.executable, "-m", "adaptclip.client.cli"]
OLD, NEW = "first-token-0123456789abcdef", "rotated-token-fedcba9876543210"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _cli(*args: str, token: str | None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "ADAPTCLIP_TOKEN"}
    if token is not None:
        env["ADAPTCLIP_TOKEN"] = token
    return subprocess.run([*ADAPTCLIP, *args], capture_output=True, text=True, timeout=120, env=env,
                          stdin=subprocess.DEVNULL)


@pytest.fixture()
def secure_server(tiny_checkpoint, tmp_path):
    pki = make_pki(tmp_path)
    tokens = tmp_path / "tokens"
    tokens.write_text(f"# rotated monthly\n{OLD}\n")
    tokens.chmod(0o600)
    port, metrics = _free_port(), _free_port()
    proc = subprocess.Popen([*ADAPTCLIP, "serve", "--model", str(TINY_CONFIG), "--pretrained", str(tiny_checkpoint),
                             "--host", "127.0.0.1", "--port", str(port), "--auth-token-file", str(tokens),
                             "--tls-cert", str(pki.server_cert), "--tls-key", str(pki.server_key),
                             "--metrics-port", str(metrics), "--metrics-host", "127.0.0.1", "--log-json",
                             "--max-views", "16", "--no-cache"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, stdin=subprocess.DEVNULL)
    with Client(f"127.0.0.1:{port}", tls_ca=pki.ca) as c:
        c.wait_ready(60)  # health is open without a token
    yield proc, f"127.0.0.1:{port}", metrics, pki, tokens
    if proc.poll() is None:
        proc.kill()
        proc.wait()


def test_serve_securely_end_to_end(secure_server, tmp_path):
    proc, target, metrics, pki, tokens = secure_server
    img = tmp_path / "cat.png"
    img.write_bytes(make_image(5))
    tls = ["--server", target, "--tls-ca", str(pki.ca)]
    ok = _cli("classify", str(img), "--labels", ",".join(LABELS), *tls, "--json", token=OLD)
    assert ok.returncode == 0, ok.stderr
    assert json.loads(ok.stdout)["top"]
    denied = _cli("classify", str(img), "--labels", ",".join(LABELS), *tls, token=None)
    assert denied.returncode == 1 and "UNAUTHENTICATED" in denied.stderr
    too_many = _cli("classify", str(img), "--labels", "a,b", *tls, "--tta", "zero", "--views", "17", token=OLD)
    assert too_many.returncode == 1 and "adaptation.views" in too_many.stderr and "limit of 16" in too_many.stderr

    tokens.write_text(f"{NEW}\n")
    proc.send_signal(signal.SIGHUP)
    deadline = time.monotonic() + 30
    while True:
        with Client(target, tls_ca=pki.ca, token=NEW) as c:
            try:
                c.model_info()
                break
            except grpc.RpcError as exc:
                assert exc.code() == grpc.StatusCode.UNAUTHENTICATED and time.monotonic() < deadline
                time.sleep(0.2)
    out = tmp_path / "labels.jsonl"
    labelled = _cli("label", str(img), "-o", str(out), "--labels", "cat,dog", *tls, "--token", NEW, token=None)
    assert labelled.returncode == 0, labelled.stderr
    assert json.loads(out.read_text().splitlines()[0])["top"]
    assert _cli("classify", str(img), "--labels", "a,b", *tls, token=OLD).returncode == 1  # the old token is gone

    with urllib.request.urlopen(f"http://127.0.0.1:{metrics}/metrics", timeout=10) as r:
        text = r.read().decode()
    assert 'adaptclip_requests_total{code="UNAUTHENTICATED",rpc="RegisterLabelSet"}' in text
    assert 'adaptclip_auth_reloads_total{result="ok"} 1.0' in text and "adaptclip_auth_tokens 1.0" in text

    proc.send_signal(signal.SIGTERM)
    assert proc.wait(60) == 0
    lines = [json.loads(line) for line in proc.stdout.read().splitlines() if line.strip()]
    requests = [ln for ln in lines if ln["logger"] == "adaptclip.requests"]
    assert {"request_id", "rpc", "status", "ms", "peer"} <= set(requests[0])
    assert {(ln["rpc"], ln["status"]) for ln in requests} >= {("ClassifyStream", "OK"),
                                                              ("RegisterLabelSet", "UNAUTHENTICATED")}
    assert any("reloaded: 1 token(s)" in ln["message"] for ln in lines)
    text = json.dumps(lines)
    assert OLD not in text and NEW not in text
