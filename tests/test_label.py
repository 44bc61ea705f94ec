"""`adaptclip label`: sources, records, SIGKILL + resume, server vs local, csv, Ray."""
from __future__ import annotations

import csv
import hashlib
import importlib.util
import json
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from adaptclip.client import cli
from adaptclip.client.label import LabelError, Recorder, collect_paths
from conftest import LABELS, TINY_CONFIG, make_image

# The job as a user runs it (`adaptclip label ...` once wired into the main CLI).
LABEL = [sys.executable, "-m", "adaptclip.client.cli", "label"]
ASK = ["--labels", ",".join(LABELS), "--top-k", "3", "--tta", "gs_bias", "--views", "8", "--seed", "1"]
N_IMAGES = 80


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> list[str]:
    """A nested folder of images plus a corrupt jpg, a broken symlink and a non-image the walk skips,
    and a list file naming a non-image, a directory called *.jpg and one image again."""
    root = tmp_path_factory.mktemp("label")
    pics = root / "pics"
    for i in range(N_IMAGES):
        folder = pics / f"set{i % 3}" / ("deep" if i % 2 else "")
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"img{i:03d}.png").write_bytes(make_image(i))
    (pics / "corrupt.jpg").write_bytes(make_image(999, fmt="JPEG")[:150])
    (pics / "broken.jpg").symlink_to(root / "missing.jpg")
    (pics / "readme.md").write_text("not collected from a folder")
    (root / "notes.txt").write_text("listed, so labelled: an error record")
    (root / "dir.jpg").mkdir()
    listing = root / "more.lst"
    listing.write_text(f"# extra inputs\n{root / 'notes.txt'}\n{root / 'dir.jpg'}\n\n{pics / 'set0' / 'img000.png'}\n")
    return [str(pics), str(listing)]


@pytest.fixture(scope="module")
def model_args(tiny_checkpoint: Path) -> list[str]:
    return ["--model", str(TINY_CONFIG), "--pretrained", str(tiny_checkpoint), "--device", "cpu"]


def _records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def reference(inputs, model_args, tmp_path_factory) -> list[dict]:
    """An uninterrupted local run."""
    out = tmp_path_factory.mktemp("ref") / "ref.jsonl"
    assert cli.main(["label", *inputs, "-o", str(out), *ASK, *model_args, "--local"]) == 0
    return _records(out)


def _error(rec: dict) -> tuple[str, str] | None:
    """Code and message up to the decoder's detail (which may name an object address)."""
    err = rec.get("error")
    return None if err is None else (err["code"], err["message"].split(" (")[0])


def _assert_same(got: list[dict], want: list[dict]) -> None:
    """Same images in the same order, same hashes and errors, same labels, probabilities within 1e-5."""
    assert [r["image"] for r in got] == [r["image"] for r in want]
    for g, w in zip(got, want):
        assert (g["sha256"], _error(g), g["model"], g["label_set_id"]) == \
               (w["sha256"], _error(w), w["model"], w["label_set_id"]), g["image"]
        for key in ("top", "zero_shot_top"):
            assert [s["label"] for s in g.get(key, [])] == [s["label"] for s in w.get(key, [])], g["image"]
            for a, b in zip(g.get(key, []), w.get(key, [])):
                assert abs(a["probability"] - b["probability"]) <= 1e-5, g["image"]


def test_collect_paths(inputs, tmp_path):
    paths = collect_paths(inputs)
    root = Path(inputs[1]).parent
    assert len(paths) == N_IMAGES + 4 and paths == sorted(set(paths))  # the image listed twice is there once
    assert str(root / "notes.txt") in paths and str(root / "pics" / "readme.md") not in paths
    assert str(root / "pics" / "broken.jpg") in paths and str(root / "dir.jpg") in paths
    assert collect_paths([f"{inputs[0]}/**/deep/*.png"]) == [p for p in paths if "/deep/" in p]
    with pytest.raises(LabelError, match="no such file"):
        collect_paths([str(tmp_path / "nothing-*.jpg")])


def test_records_and_error_records(inputs, reference):
    by_name = {Path(r["image"]).name: r for r in reference}
    assert len(reference) == len(by_name) == N_IMAGES + 4
    img = by_name["img007.png"]
    assert img["sha256"] == hashlib.sha256(make_image(7)).hexdigest()
    assert len(img["top"]) == 3 and img["zero_shot_top"] and img["adaptation"]["method"] == "gs_bias"
    assert img["model"] == "tiny-vit" and img["label_set_id"].startswith("ls_")
    assert {r["label_set_id"] for r in reference} == {img["label_set_id"]}
    assert by_name["corrupt.jpg"]["error"]["code"] == "INVALID_ARGUMENT"
    assert by_name["notes.txt"]["error"]["code"] == "INVALID_ARGUMENT"
    assert "cannot decode" in by_name["notes.txt"]["error"]["message"]
    assert by_name["broken.jpg"]["error"]["code"] == "UNREADABLE" and by_name["broken.jpg"]["sha256"] is None
    assert "Is a directory" in by_name["dir.jpg"]["error"]["message"]
    assert sum("error" in r for r in reference) == 4


def test_sigkill_at_random_points_then_rerun(inputs, model_args, reference, tmp_path):
    """Three runs SIGKILLed after a random number of new records, then one to the end: each image once,
    what was written before each kill untouched, every result as in the uninterrupted run."""
    out, log = tmp_path / "out.jsonl", tmp_path / "stderr.txt"
    cmd = [*LABEL, *inputs, "-o", str(out), *ASK, *model_args, "--concurrency", "2"]
    rng = random.Random(20)
    kept: list[bytes] = []
    for _ in range(3):
        before = out.read_bytes() if out.exists() else b""
        target = before.count(b"\n") + rng.randint(2, 18)
        with open(log, "wb") as err:
            proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=err, stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + 180
        while not out.exists() or out.read_bytes().count(b"\n") < target:
            assert proc.poll() is None, log.read_text()
            assert time.monotonic() < deadline, "no progress"
            time.sleep(0.003)
        proc.send_signal(signal.SIGKILL)
        assert proc.wait() == -signal.SIGKILL
        at_kill = out.read_bytes()
        assert at_kill.startswith(before) and target <= at_kill.count(b"\n") < len(reference)  # killed mid-job
        kept.append(at_kill[:at_kill.rfind(b"\n") + 1])
    had = kept[-1].count(b"\n")
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, stdin=subprocess.DEVNULL)
    assert done.returncode == 0, done.stderr
    assert f"{len(reference) - had} done, {had} skipped" in done.stderr
    final = out.read_bytes()
    assert all(final.startswith(k) for k in kept)
    _assert_same(_records(out), reference)  # exactly one record per input, results as uninterrupted


def test_rerun_of_a_finished_job_adds_nothing(inputs, reference, model_args, tmp_path, capsys):
    out = tmp_path / "out.jsonl"
    out.write_text("".join(json.dumps(r) + "\n" for r in reference) + '{"image": "/torn/by/a/kil')
    assert cli.main(["label", *inputs, "-o", str(out), *ASK, *model_args]) == 0
    assert f"0 done, {len(reference)} skipped" in capsys.readouterr().err
    _assert_same(_records(out), reference)  # the torn tail is gone


def test_server_and_local_agree(inputs, reference, server, tmp_path, capsys):
    out = tmp_path / "server.jsonl"
    assert cli.main(["label", *inputs, "-o", str(out), *ASK, "--server", server.target, "--concurrency", "5"]) == 0
    assert f"{len(reference)} done, 0 skipped" in capsys.readouterr().err
    _assert_same(_records(out), reference)


def test_server_mode_refuses_model_flags(inputs, model_args, tmp_path, capsys):
    assert cli.main(["label", *inputs, "-o", str(tmp_path / "o.jsonl"), *ASK, "--server", "x:1", *model_args]) == 1
    assert "--model is for the in-process model" in capsys.readouterr().err
    for flags, named in ((["--keep-rate", "0.5"], "--keep-rate"), (["--bundle", "b/"], "--bundle")):
        assert cli.main(["label", *inputs, "-o", str(tmp_path / "o.jsonl"), *ASK, "--server", "x:1", *flags]) == 1
        assert f"{named} is for the in-process model" in capsys.readouterr().err


def test_broken_config_is_a_clear_error(inputs, tmp_path, capsys):
    bad = tmp_path / "c.yaml"
    bad.write_text("models: [\n")
    assert cli.main(["label", *inputs, "-o", str(tmp_path / "o.jsonl"), *ASK, "--config", str(bad)]) == 1
    assert "not valid YAML" in capsys.readouterr().err


def test_csv_output(inputs, reference, model_args, tmp_path):
    out = tmp_path / "out.csv"
    assert cli.main(["label", *inputs, "-o", str(out), *ASK, *model_args, "--concurrency", "8"]) == 0
    with open(out, newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["image"] for r in rows] == [r["image"] for r in reference]
    for row, ref in zip(rows, reference):
        if "error" in ref:
            assert (row["error_code"], row["error_message"].split(" (")[0]) == _error(ref)
            continue
        assert row["top1"] == ref["top"][0]["label"] and row["zero_shot_top1"] == ref["zero_shot_top"][0]["label"]
        assert abs(float(row["top1_probability"]) - ref["top"][0]["probability"]) <= 1e-5
        assert [s["label"] for s in json.loads(row["top"])] == [s["label"] for s in ref["top"]]


RECORD = {"image": "/a.png", "sha256": "ab", "model": "m", "label_set_id": "ls_1",
          "top": [{"label": "cat", "probability": 0.9, "logit": 1.0}]}


@pytest.mark.parametrize("fmt", ["jsonl", "csv"])
def test_recorder_drops_torn_tail(tmp_path, fmt):
    out = tmp_path / f"out.{fmt}"
    rec = dict(RECORD)
    r = Recorder(out, fmt)
    for name in ("/a.png", "/b\udcff é.png"):  # a file name that is not UTF-8 survives the round trip
        r.emit({**rec, "image": name})
    r.close()
    whole = out.read_bytes()
    with open(out, "ab") as f:
        f.write(whole.splitlines(keepends=True)[-1][:-7])  # a write cut short
    r = Recorder(out, fmt)
    assert r.done == {"/a.png", "/b\udcff é.png"} and out.read_bytes() == whole
    r.emit({**rec, "image": "/c.png"})
    r.close()
    assert Recorder(out, fmt).done == {"/a.png", "/b\udcff é.png", "/c.png"}


@pytest.mark.parametrize("fmt", ["jsonl", "csv"])
def test_resume_retries_passing_errors_only(tmp_path, fmt):
    """A queue-full or unavailable answer is retried by the re-run; an unreadable or invalid input is not."""
    from adaptclip.client.label import error_record

    out = tmp_path / f"out.{fmt}"
    r = Recorder(out, fmt)
    for name, code in (("/busy.png", "RESOURCE_EXHAUSTED"), ("/down.png", "UNAVAILABLE"),
                       ("/bad.png", "UNREADABLE"), ("/tiny.png", "INVALID_ARGUMENT")):
        r.emit(error_record(name, None, code, "why", "m", "ls_1"))
    r.emit({**RECORD, "image": "/ok.png"})
    r.emit({"image": "/busy.png", "sha256": "cd", "model": "m", "label_set_id": "ls_1",
            "top": [{"label": "dog", "probability": 0.8, "logit": 1.0}]})  # the retry answered
    r.close()
    assert Recorder(out, fmt).done == {"/busy.png", "/bad.png", "/tiny.png", "/ok.png"}


@pytest.mark.parametrize("fmt", ["jsonl", "csv"])
def test_recorder_leaves_other_files_alone(tmp_path, fmt):
    other = tmp_path / "notes.txt"
    other.write_bytes(b"my notes, no newline at the end")
    with pytest.raises(LabelError, match="not an adaptclip"):
        Recorder(other, fmt)
    assert other.read_bytes() == b"my notes, no newline at the end"


def test_second_job_on_the_same_output_is_refused(inputs, model_args, tmp_path, capsys):
    out = tmp_path / "out.jsonl"
    holder = Recorder(out, "jsonl")
    try:
        assert cli.main(["label", *inputs, "-o", str(out), *ASK, *model_args]) == 1
        assert "being written by another labelling job" in capsys.readouterr().err
    finally:
        holder.close()


def test_other_labels_into_the_same_output_are_refused(inputs, reference, model_args, tmp_path, capsys):
    out = tmp_path / "out.jsonl"
    out.write_text("".join(json.dumps(r) + "\n" for r in reference[:5]))
    assert cli.main(["label", *inputs, "-o", str(out), "--labels", "cat,dog", *model_args]) == 1
    assert "holds records of label set" in capsys.readouterr().err
    assert len(_records(out)) == 5


def test_another_model_into_the_same_output_is_refused(inputs, reference, model_args, tmp_path, capsys):
    """A re-run with another model would skip the images the first model labelled: refused up front."""
    out = tmp_path / "out.jsonl"
    out.write_text("".join(json.dumps({**r, "model": "other-model"}) + "\n" for r in reference[:5]))
    assert cli.main(["label", *inputs, "-o", str(out), *ASK, *model_args]) == 1
    assert "holds records of model 'other-model'" in capsys.readouterr().err
    assert [r["model"] for r in _records(out)] == ["other-model"] * 5


@pytest.mark.parametrize("fmt", ["jsonl", "csv"])
def test_recorder_checks_the_model_of_each_record(tmp_path, fmt):
    """Engines that learn the served model's name from their records (Ray) are checked on emit."""
    out = tmp_path / f"out.{fmt}"
    rec = dict(RECORD)
    r = Recorder(out, fmt)
    r.emit(rec)
    r.close()
    r = Recorder(out, fmt)
    r.start(1, "ls_1", None)
    with pytest.raises(LabelError, match="holds records of model 'm'"):
        r.emit({**rec, "image": "/b.png", "model": "n"})
    r.emit({**rec, "image": "/b.png"})
    r.close()
    assert Recorder(out, fmt).done == {"/a.png", "/b.png"}


def test_ray_engine_missing_says_how_to_install(inputs, model_args, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "ray", None)
    monkeypatch.delitem(sys.modules, "adaptclip.client.label_ray", raising=False)
    assert cli.main(["label", *inputs, "-o", str(tmp_path / "o.jsonl"), *ASK, *model_args, "--engine", "ray"]) == 1
    assert "pip install 'adaptclip[ray]'" in capsys.readouterr().err


@pytest.mark.skipif(importlib.util.find_spec("ray") is None, reason="ray not installed (pip install 'adaptclip[ray]')")
def test_ray_engine_resumes_a_local_job(inputs, reference, model_args, tmp_path):
    """Ray Data with 2 model actors on a local Ray, picking up where a local run stopped: same records."""
    out = tmp_path / "out.jsonl"
    out.write_text("".join(json.dumps(r) + "\n" for r in reference[:30]))
    proc = subprocess.run([*LABEL, *inputs, "-o", str(out), *ASK, *model_args, "--engine", "ray", "--ray-workers", "2",
                           "--concurrency", "8"], capture_output=True, text=True, timeout=300, stdin=subprocess.DEVNULL)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert f"{len(reference) - 30} done, 30 skipped" in proc.stderr
    got = _records(out)
    assert got[:30] == reference[:30]
    _assert_same(sorted(got, key=lambda r: r["image"]), reference)
