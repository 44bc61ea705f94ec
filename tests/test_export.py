"""ONNX export, QDQ quantisation, the agreement check and the bundle, on the tiny model."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from adaptclip.client import cli_quantize
from adaptclip.compression.bundle import BundleConfig, build_bundle
from adaptclip.compression.export import (ExportError, QuantConfig, agreement, export_image_tower, quantize,
                                          run_onnx, session, torch_embeddings)
from adaptclip.compression.spdfq import SynthesisConfig
from adaptclip.compression.models import TorchModel
from conftest import TINY_CONFIG

pytestmark = pytest.mark.usefixtures("one_thread")

LABEL_SETS = {"animals": (("cat", "dog", "bird", "fish"), ("a photo of a {}.", "a {}.")),
              "things": (("car", "boat", "house"), ("a photo of a {}.",))}
# The tiny model is random-init (no trained weights in a fresh clone). Its embeddings come out of a
# few small matmuls, so INT8 keeps them very close to fp32: measured mean cosine ~0.9996 (W8A8).
MIN_COSINE_W8A8 = 0.99


def quick(calib: str = "spdfq", bits: str = "w8a8", min_cosine: float = MIN_COSINE_W8A8, **kw) -> BundleConfig:
    return BundleConfig(calib=calib, n_calib=8, n_check=6, min_cosine=min_cosine, quant=QuantConfig(bits=bits, **kw),
                        synthesis=SynthesisConfig(iters=10, progress=False))


def test_export_matches_torch_with_dynamic_batch(tmp_path: Path, hosted: TorchModel) -> None:
    path = export_image_tower(hosted.module, tmp_path / "m.onnx", hosted.image_size)
    model = onnx.load(str(path))
    onnx.checker.check_model(model)
    assert model.opset_import[0].version >= 17
    assert model.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "batch"
    x = torch.randn(5, 3, hosted.image_size, hosted.image_size)
    np.testing.assert_allclose(run_onnx(session(path), x.numpy()), torch_embeddings(hosted.module, x), atol=1e-4, rtol=1e-4)


def test_w8a8_bundle_agrees_with_fp32(tmp_path: Path, hosted: TorchModel) -> None:
    out = tmp_path / "bundle"
    manifest = build_bundle(hosted, LABEL_SETS, out, quick())
    assert json.loads((out / "manifest.json").read_text()) == json.loads(json.dumps(manifest))
    model = onnx.load(str(out / "model.onnx"))
    ops = [n.op_type for n in model.graph.node]
    assert ops.count("QuantizeLinear") > 0 and ops.count("DequantizeLinear") > ops.count("QuantizeLinear")
    int8 = [t for t in model.graph.initializer if t.data_type == onnx.TensorProto.INT8]
    assert int8 and any(len(t.dims) == 2 for t in int8), "weights stored as INT8"
    # The attention probabilities (Softmax outputs) stay fp32: no QuantizeLinear reads them.
    softmax_out = {o for n in model.graph.node if n.op_type == "Softmax" for o in n.output}
    assert not any(n.op_type == "QuantizeLinear" and n.input[0] in softmax_out for n in model.graph.node)
    a = manifest["agreement"]
    assert a["cosine_mean"] >= MIN_COSINE_W8A8 and a["n_images"] == 6
    assert set(a["top1_agreement"]) == set(LABEL_SETS)
    assert manifest["sizes"]["model_bytes"] < 0.6 * manifest["sizes"]["fp32_onnx_bytes"]
    assert manifest["preprocess"]["size"] == hosted.image_size and manifest["logit_scale"] == hosted.logit_scale
    for name, (labels, templates) in LABEL_SETS.items():
        saved = json.loads((out / "label_sets" / f"{name}.json").read_text())
        assert saved == {"labels": list(labels), "templates": list(templates)}
        np.testing.assert_allclose(np.load(out / "label_sets" / f"{name}.npy"),
                                   hosted.classifier(labels, templates).numpy(), atol=1e-6)
    # Independent check on fresh images: the bundle's model against torch fp32.
    x = torch.randn(8, 3, hosted.image_size, hosted.image_size, generator=torch.Generator().manual_seed(9))
    got = agreement(torch_embeddings(hosted.module, x), run_onnx(session(out / "model.onnx"), x.numpy()), {})
    assert got.cosine_mean >= MIN_COSINE_W8A8


def test_w4a8_has_int4_weights(tmp_path: Path, hosted: TorchModel) -> None:
    manifest = build_bundle(hosted, LABEL_SETS, tmp_path / "b4", quick("gaussian", "w4a8", min_cosine=0.9))
    model = onnx.load(str(tmp_path / "b4" / "model.onnx"))
    assert any(t.data_type == onnx.TensorProto.INT4 for t in model.graph.initializer)
    assert manifest["quantization"]["bits"] == "w4a8" and manifest["agreement"]["cosine_mean"] >= 0.9
    assert "synthesis" not in manifest["quantization"]


def test_w4a4_runs_simulated(tmp_path: Path, hosted: TorchModel) -> None:
    fp32 = export_image_tower(hosted.module, tmp_path / "f.onnx", hosted.image_size)
    calib = torch.randn(8, 3, hosted.image_size, hosted.image_size, generator=torch.Generator().manual_seed(1))
    path = quantize(fp32, tmp_path / "a4.onnx", calib.numpy(), QuantConfig(bits="w4a4"))
    model = onnx.load(str(path))
    assert any(n.op_type == "QuantizeLinear" and n.input[2] in {t.name for t in model.graph.initializer
                                                                if t.data_type == onnx.TensorProto.UINT4}
               for n in model.graph.node), "activations quantised to uint4"
    x = torch.randn(6, 3, hosted.image_size, hosted.image_size, generator=torch.Generator().manual_seed(2))
    got = agreement(torch_embeddings(hosted.module, x), run_onnx(session(path, optimize=False), x.numpy()), {})
    assert 0.8 < got.cosine_mean < 0.9999


def _weight_ranges(path: Path) -> dict[int, int]:
    """{ONNX data type: largest |value|} over the quantised weight initialisers."""
    out: dict[int, int] = {}
    for t in onnx.load(str(path)).graph.initializer:
        if t.data_type in (onnx.TensorProto.INT8, onnx.TensorProto.INT4) and len(t.dims) >= 1:
            out[t.data_type] = max(out.get(t.data_type, 0), int(np.abs(onnx.numpy_helper.to_array(t).astype(np.int32)).max()))
    return out


@pytest.mark.parametrize("reduce_range", [True, False])
def test_int8_weights_use_7_bits_unless_asked(tmp_path: Path, hosted: TorchModel, reduce_range: bool) -> None:
    """7-bit int8 weights by default (non-VNNI x86 CPUs overflow on 8); int4 weights keep their range."""
    fp32 = export_image_tower(hosted.module, tmp_path / "f.onnx", hosted.image_size)
    calib = torch.randn(8, 3, hosted.image_size, hosted.image_size, generator=torch.Generator().manual_seed(1)).numpy()
    w8 = _weight_ranges(quantize(fp32, tmp_path / "w8.onnx", calib, QuantConfig(bits="w8a8", reduce_range=reduce_range)))
    assert w8[onnx.TensorProto.INT8] == (64 if reduce_range else 127)
    w4 = _weight_ranges(quantize(fp32, tmp_path / "w4.onnx", calib, QuantConfig(bits="w4a8", reduce_range=reduce_range)))
    assert w4[onnx.TensorProto.INT4] in (7, 8)


def test_threshold_failure_is_clear_and_writes_nothing(tmp_path: Path, hosted: TorchModel) -> None:
    out = tmp_path / "refused"
    with pytest.raises(ExportError, match=r"below the threshold 1\.01"):
        build_bundle(hosted, LABEL_SETS, out, quick("gaussian", min_cosine=1.01))
    assert not out.exists()


def test_bad_options_are_rejected(tmp_path: Path, hosted: TorchModel) -> None:
    with pytest.raises(ValueError, match="bits must be one of"):
        build_bundle(hosted, LABEL_SETS, tmp_path / "x", quick(bits="w2a2"))
    with pytest.raises(ValueError, match="no onnxruntime kernels"):
        build_bundle(hosted, LABEL_SETS, tmp_path / "z", quick(bits="w4a4"))
    with pytest.raises(ValueError, match="spdfq, gaussian or real:DIR"):
        build_bundle(hosted, LABEL_SETS, tmp_path / "y", quick(calib="imagenet"))


def test_cli_quantize(tmp_path: Path, tiny_checkpoint: Path, capsys: pytest.CaptureFixture[str]) -> None:
    parser = argparse.ArgumentParser()
    cli_quantize.add_parser(parser.add_subparsers(dest="command"))
    labels = tmp_path / "labels.txt"
    labels.write_text("cat\ndog\ncar\n")
    out = tmp_path / "cli-bundle"
    sys_args = ["quantize", "--model", str(TINY_CONFIG), "--pretrained", str(tiny_checkpoint), "--labels-file",
                str(labels), "--calib", "gaussian", "--bits", "w8a8", "-o", str(out), "--n-calib", "8", "--n-check", "4",
                "--quiet", "--min-cosine", str(MIN_COSINE_W8A8)]
    args = parser.parse_args(sys_args)
    assert cli_quantize.run(args) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["cosine_mean"] >= MIN_COSINE_W8A8 and (out / "model.onnx").is_file()
    assert json.loads((out / "label_sets" / "default.json").read_text())["labels"] == ["cat", "dog", "car"]
    assert json.loads((out / "manifest.json").read_text())["quantization"]["reduce_range"] is True
    assert _weight_ranges(out / "model.onnx")[onnx.TensorProto.INT8] == 64
    full = parser.parse_args([*sys_args, "--full-range-weights"])
    full.output = str(tmp_path / "full-range")
    assert cli_quantize.run(full) == 0
    assert json.loads((Path(full.output) / "manifest.json").read_text())["quantization"]["reduce_range"] is False
    assert _weight_ranges(Path(full.output) / "model.onnx")[onnx.TensorProto.INT8] == 127
    args.min_cosine = 1.01
    args.output = str(tmp_path / "refused")
    assert cli_quantize.run(args) == 1
    assert "below the threshold" in capsys.readouterr().err


@pytest.mark.parametrize("quantize_outputs", [False, True])
def test_linear_outputs_stay_fp32_unless_asked(tmp_path: Path, hosted: TorchModel, quantize_outputs: bool) -> None:
    """By default no QuantizeLinear follows a MatMul, so onnxruntime fuses each into MatMulIntegerToFloat
    (no requantisation per layer); asked, the outputs are quantised (QLinearMatMul) as before."""
    import onnxruntime as ort

    fp32 = export_image_tower(hosted.module, tmp_path / "f.onnx", hosted.image_size)
    calib = torch.randn(8, 3, hosted.image_size, hosted.image_size, generator=torch.Generator().manual_seed(1)).numpy()
    path = quantize(fp32, tmp_path / "q.onnx", calib, QuantConfig(quantize_linear_outputs=quantize_outputs))
    graph = onnx.load(str(path)).graph
    matmul_outputs = {o for n in graph.node if n.op_type == "MatMul" for o in n.output}
    requantised = [n for n in graph.node if n.op_type == "QuantizeLinear" and n.input[0] in matmul_outputs]
    assert bool(requantised) == quantize_outputs
    opts = ort.SessionOptions()
    opts.optimized_model_filepath = str(tmp_path / "optimised.onnx")
    ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    fused = {n.op_type for n in onnx.load(opts.optimized_model_filepath).graph.node}
    assert ("MatMulIntegerToFloat" in fused) != quantize_outputs
    assert ("QLinearMatMul" in fused) == quantize_outputs


def test_export_attention_equals_multihead_attention_and_exports_leaner(tmp_path: Path, hosted: TorchModel) -> None:
    """The exported tower's self-attention (ExportAttention) gives MultiheadAttention's numbers with
    fewer transposes in the graph and its scale as a constant (no Shape/Div/Pow chain per block, whose
    small ops weigh on a tiny tower), and the model it was copied from is left as it was."""
    from adaptclip.compression.export import ExportAttention, lean_attention

    mha = torch.nn.MultiheadAttention(24, 4, batch_first=True).eval()
    x = torch.randn(3, 7, 24, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        want = mha(x, x, x, need_weights=False)[0]
        got = ExportAttention(mha)(x, x, x, need_weights=False)[0]
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="self-attention"):
        ExportAttention(mha)(x, x.clone(), x)
    lean = lean_attention(hosted.module)
    replaced = [m for m in lean.visual.modules() if isinstance(m, ExportAttention)]
    assert replaced and not any(isinstance(m, ExportAttention) for m in hosted.module.visual.modules())
    path = export_image_tower(hosted.module, tmp_path / "f.onnx", hosted.image_size)  # compares with torch itself
    ops = [n.op_type for n in onnx.load(str(path)).graph.node]
    assert ops.count("Transpose") <= 3 * len(replaced) + 1
    assert "Pow" not in ops
