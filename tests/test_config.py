"""Config file and flag handling."""
from __future__ import annotations

from pathlib import Path

import pytest

from adaptclip.client.cli import main
from adaptclip.client.flags import server_config as build_config
from adaptclip.server.config import load_config

EXAMPLE = Path(__file__).parent.parent / "examples" / "server.yaml"


def test_example_config_loads():
    cfg = load_config(EXAMPLE)
    assert cfg.default_model.model == "ViT-B-32" and cfg.batching.max_batch_size == 32


def test_cifar_example_holds_valid_adaptation_defaults():
    from adaptclip.adapt.settings import settings_from_dict

    (spec,) = load_config(EXAMPLE.with_name("cifar-clip.yaml")).models
    s = settings_from_dict(dict(spec.adaptation))
    assert (s.method, s.crop_scale, s.augmix, s.skip_entropy, s.view_chunk) == ("gs_bias", (0.8, 1.0), False, 0.4, 8)
    assert spec.model.endswith(".json") and spec.pretrained.endswith(".pt")


def test_broken_yaml_is_a_value_error_naming_the_file(tmp_path):
    bad = tmp_path / "c.yaml"
    bad.write_text("models: [\n")
    with pytest.raises(ValueError, match="c.yaml: not valid YAML"):
        load_config(bad)


def test_unknown_key_is_named(tmp_path):
    bad = tmp_path / "c.yaml"
    bad.write_text("models:\n  - model: ViT-B-32\n    pretrainde: x\n")
    with pytest.raises(ValueError, match=r"models\[0\].*pretrainde"):
        load_config(bad)


def test_flags_override_config(tmp_path):
    import argparse

    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers()
    from adaptclip.client import cli

    cli._serve_parser(sub)
    args = parser.parse_args(["serve", "--config", str(EXAMPLE), "--model", "m.json", "--pretrained", "w.pt",
                              "--port", "6000", "--max-batch-size", "8"])
    cfg = build_config(args)
    assert len(cfg.models) == 1 and cfg.models[0].model == "m.json" and cfg.models[0].pretrained == "w.pt"
    assert cfg.port == 6000 and cfg.batching.max_batch_size == 8 and cfg.limits.max_labels == 2048
    # --model without --pretrained must not inherit the config's tag for another model.
    args = parser.parse_args(["serve", "--config", str(EXAMPLE), "--model", "m.json"])
    assert build_config(args).models[0].pretrained is None


def test_bad_config_exits_2(tmp_path, capsys):
    bad = tmp_path / "c.yaml"
    bad.write_text("nonsense: 1\n")
    assert main(["serve", "--config", str(bad)]) == 2
    assert "nonsense" in capsys.readouterr().err


def test_keep_rate_and_device_flags_apply_without_model_flag():
    import argparse

    from adaptclip.client import cli

    parser = argparse.ArgumentParser()
    cli._serve_parser(parser.add_subparsers())
    cfg = build_config(parser.parse_args(["serve", "--config", str(EXAMPLE), "--device", "cpu", "--keep-rate", "0.5"]))
    assert cfg.models[0].device == "cpu" and cfg.models[0].keep_rate == 0.5 and cfg.models[0].model == "ViT-B-32"
