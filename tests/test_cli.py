"""The `adaptclip` command as a user runs it: serve refuses random weights, drains on SIGTERM; classify prints."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from adaptclip.client import Client
from adaptclip.client.client import classify_request
from conftest import LABELS, TINY_CONFIG, make_image

ADAPTCLIP = [sys.executable, "-m", "adaptclip.client.cli"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([*ADAPTCLIP, *args], capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)


def test_serve_refuses_without_weights():
    proc = _run("serve", "--model", str(TINY_CONFIG), "--port", str(_free_port()))
    assert proc.returncode == 2
    assert "no weights given" in proc.stderr and "--pretrained" in proc.stderr


def test_serve_refuses_missing_checkpoint(tmp_path):
    proc = _run("serve", "--model", str(TINY_CONFIG), "--pretrained", str(tmp_path / "nope.pt"),
                "--port", str(_free_port()))
    assert proc.returncode == 2
    assert "could not load weights" in proc.stderr and "--pretrained PATH" in proc.stderr


def test_serve_refuses_wrong_checkpoint(tmp_path):
    bad = tmp_path / "bad.pt"
    import torch

    torch.save({"visual.nonsense": torch.zeros(1)}, bad)
    proc = _run("serve", "--model", str(TINY_CONFIG), "--pretrained", str(bad), "--port", str(_free_port()))
    assert proc.returncode == 2 and "could not load weights" in proc.stderr


def test_unknown_model_name():
    proc = _run("serve", "--model", "No-Such-Model", "--pretrained", "x", "--port", str(_free_port()))
    assert proc.returncode == 2 and "unknown model 'No-Such-Model'" in proc.stderr


@pytest.fixture()
def served_process(tiny_checkpoint):
    port = _free_port()
    proc = subprocess.Popen([*ADAPTCLIP, "serve", "--model", str(TINY_CONFIG), "--pretrained", str(tiny_checkpoint),
                             "--port", str(port), "--host", "127.0.0.1"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, stdin=subprocess.DEVNULL)
    with Client(f"127.0.0.1:{port}") as c:
        c.wait_ready(60)
    yield proc, port
    if proc.poll() is None:
        proc.kill()
        proc.wait()


def test_sigterm_finishes_in_flight_stream(served_process):
    proc, port = served_process
    n = 150
    got: list[str] = []
    first = threading.Event()
    with Client(f"127.0.0.1:{port}") as c:
        ref = c.register_label_set(LABELS)

        def requests():
            for i in range(n):
                if i == 20:
                    first.wait(30)
                yield classify_request(make_image(i), label_set_id=ref.label_set_id, request_id=str(i))

        def consume():
            for resp in c.classify_stream(requests(), timeout_s=120):
                assert not resp.HasField("error")
                got.append(resp.request_id)
                first.set()

        t = threading.Thread(target=consume)
        t.start()
        first.wait(30)
        proc.send_signal(signal.SIGTERM)
        t.join(120)
    assert got == [str(i) for i in range(n)]
    assert proc.wait(60) == 0
    assert "shutting down" in proc.stdout.read()


def test_classify_cli_json_and_table(server, tmp_path):
    paths = []
    for i, fmt in enumerate(["PNG", "JPEG"]):
        p = tmp_path / f"img{i}.{fmt.lower()}"
        p.write_bytes(make_image(40 + i, fmt=fmt))
        paths.append(str(p))
    labels_file = tmp_path / "labels.txt"
    labels_file.write_text("\n".join(LABELS) + "\n")
    templates_file = tmp_path / "templates.txt"
    templates_file.write_text("a photo of a {}.\na drawing of a {}.\n")
    proc = _run("classify", *paths, "--labels-file", str(labels_file), "--templates-file", str(templates_file),
                "--top-k", "3", "--server", server.target, "--json")
    assert proc.returncode == 0, proc.stderr
    records = [json.loads(line) for line in proc.stdout.splitlines()]
    assert [r["image"] for r in records] == paths
    with Client(server.target) as c:
        for r, p in zip(records, paths):
            ref = c.classify(Path(p).read_bytes(), labels=LABELS, templates=["a photo of a {}.", "a drawing of a {}."], top_k=3)
            assert [t["label"] for t in r["top"]] == [s.label for s in ref.top]
            assert r["top"][0]["logit"] == pytest.approx(ref.top[0].logit, abs=1e-4)
            assert set(r["top"][0]) == {"label", "probability", "logit"} and r["model"] == "tiny-vit"
    table = _run("classify", paths[0], str(tmp_path / "missing.jpg"), "--labels", ",".join(LABELS), "--server", server.target)
    assert table.returncode == 1  # one image failed
    assert paths[0] in table.stdout and "%" in table.stdout
    assert "missing.jpg" in table.stderr


def test_classify_cli_with_tta(server, tmp_path):
    img = tmp_path / "a.png"
    img.write_bytes(make_image(77))
    proc = _run("classify", str(img), "--labels", ",".join(LABELS), "--server", server.target, "--json",
                "--tta", "gs_bias", "--views", "6", "--seed", "4")
    assert proc.returncode == 0, proc.stderr
    rec = json.loads(proc.stdout)
    assert rec["adaptation"]["method"] == "gs_bias" and rec["adaptation"]["views_encoded"] == 6
    assert {t["label"] for t in rec["zero_shot_top"]} <= set(LABELS) and rec["top"]
    again = json.loads(_run("classify", str(img), "--labels", ",".join(LABELS), "--server", server.target, "--json",
                            "--tta", "gs_bias", "--views", "6", "--seed", "4").stdout)
    assert again["top"] == rec["top"]
    table = _run("classify", str(img), "--labels", ",".join(LABELS), "--server", server.target, "--tta", "zero",
                 "--views", "4")
    assert "adaptation: 4 views" in table.stdout and "zero-shot top-1 was" in table.stdout


def test_cli_help_lists_commands():
    proc = _run("--help")
    assert proc.returncode == 0 and "serve" in proc.stdout and "classify" in proc.stdout
    assert os.path.exists(Path(sys.executable).parent / "adaptclip")
