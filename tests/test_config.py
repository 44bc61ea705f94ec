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


def test_security_metrics_and_limits_keys_and_their_flags(tmp_path):
    import argparse

    from adaptclip.client import cli

    path = tmp_path / "c.yaml"
    path.write_text("security: {auth_token_file: /t, tls_cert: /c.pem, tls_key: /k.pem, reflection: false}\n"
                    "limits: {max_views: 64, max_views_in_flight: 512}\nmetrics_port: 9100\nlog_json: true\n")
    cfg = load_config(path)
    assert (cfg.security.auth_token_file, cfg.security.tls_cert, cfg.security.reflection) == ("/t", "/c.pem", False)
    assert (cfg.limits.max_views, cfg.limits.max_steps, cfg.metrics_port, cfg.log_json) == (64, 20, 9100, True)
    parser = argparse.ArgumentParser()
    cli._serve_parser(parser.add_subparsers())
    args = parser.parse_args(["serve", "--config", str(path), "--tls-cert", "/other.pem", "--tls-client-ca", "/ca.pem",
                              "--max-views", "32", "--metrics-port", "9200", "--auth-token-file", "/t2"])
    cfg = build_config(args)
    assert (cfg.security.tls_cert, cfg.security.tls_key, cfg.security.tls_client_ca) == ("/other.pem", "/k.pem", "/ca.pem")
    assert (cfg.limits.max_views, cfg.limits.max_views_in_flight, cfg.metrics_port) == (32, 512, 9200)
    assert cfg.security.auth_token_file == "/t2" and cfg.log_json and not cfg.security.reflection
    bad = tmp_path / "bad.yaml"
    bad.write_text("security: {tls_certificate: x}\n")
    with pytest.raises(ValueError, match="security.*tls_certificate"):
        load_config(bad)


def test_tuned_cifar_example_is_a_tune_file_the_server_reads():
    from adaptclip.adapt.settings import settings_from_dict

    (spec,) = load_config(EXAMPLE.with_name("cifar-clip-tuned.yaml")).models
    s = settings_from_dict(dict(spec.adaptation))
    assert s.method in ("gs_bias", "zero", "none") and spec.adaptation.keys() >= {"gate_entropy_rise", "crop_scale"}
