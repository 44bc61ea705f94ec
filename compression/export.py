"""Image tower -> ONNX -> static QDQ INT8/INT4 (onnxruntime.quantization), checked against fp32.

The export is opset 17 with a dynamic batch axis, checked by onnx.checker and by comparing its
embeddings with torch's. Quantisation is onnxruntime's static QDQ with per-channel weights, fed by
a CalibrationDataReader over the chosen calibration images (SPDFQ, Gaussian or real). By default
only the linear ops (MatMul, Gemm, Conv) are quantised and the attention probabilities stay fp32
(the paper quantises post-softmax attention with a log2 quantiser because uniform INT8 loses its
small values; onnxruntime has no log2 quantiser, so the softmax output is left unquantised).
Two choices keep the INT8 graph lean for small towers, where the ops around the GEMMs weigh most:
the tower's self-attention is exported as `ExportAttention` (3 transposes a block instead of
MultiheadAttention's 8), and linear layers' outputs are not requantised (MatMulIntegerToFloat).
"""
from __future__ import annotations

import copy
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
from onnxruntime.quantization import (CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType,
                                      quant_pre_process, quantize_static)
from torch import nn

from adaptclip.compression.models import image_features, supports_patches

INPUT_NAME, OUTPUT_NAME, PATCHES_NAME = "pixels", "embedding", "patches"
# bits -> (weight type, activation type). w4a4 is for accuracy studies only: onnxruntime has no
# kernels for int4 activations, so such a model runs only with graph optimisations off (QDQ
# simulated in fp32), and bundles refuse it.
BITS = {"w8a8": (QuantType.QInt8, QuantType.QUInt8), "w4a8": (QuantType.QInt4, QuantType.QUInt8),
        "w4a4": (QuantType.QInt4, QuantType.QUInt4)}
SIMULATED_ONLY = {"w4a4"}
CALIB_METHODS = {"minmax": CalibrationMethod.MinMax, "percentile": CalibrationMethod.Percentile,
                 "entropy": CalibrationMethod.Entropy}
LINEAR_OPS = ["MatMul", "Gemm", "Conv"]


class ExportError(RuntimeError):
    """The exported or quantised model does not agree with the fp32 model well enough."""


@dataclass
class QuantConfig:
    """How to quantise: bit widths, which ops, the calibration statistic, attention handling."""

    bits: str = "w8a8"
    ops: str = "linear"  # "linear": MatMul/Gemm/Conv only; "all": every op onnxruntime can quantise
    calib_method: str = "minmax"
    attention: str = "fp32"  # "fp32": attention probabilities unquantised; "int8": uniform like the rest
    per_channel: bool = True
    # 8-bit weights on 7 bits (onnxruntime's reduce_range). x86 CPUs without VNNI multiply uint8
    # activations by int8 weights with 16-bit saturating pair sums (vpmaddubsw), and full-range
    # weights overflow them: on an AVX2 box the CIFAR model's W8A8 embeddings fell from cosine
    # 0.9997 to 0.98 against fp32. A bundle runs on CPUs unknown at export, so 7 bits is the default.
    reduce_range: bool = True
    # Linear layers' outputs stay fp32: onnxruntime then fuses each into MatMulIntegerToFloat instead
    # of QLinearMatMul + a dequantise, saving a requantisation per layer (CIFAR model, batch 16, 2
    # threads: 3-4 % faster, embedding cosine to fp32 0.99977 vs 0.99961; BENCHMARKS.md).
    quantize_linear_outputs: bool = False
    calib_batch: int = 8

    def validate(self) -> None:
        for name, value, allowed in (("bits", self.bits, BITS), ("ops", self.ops, ("linear", "all")),
                                     ("calib_method", self.calib_method, CALIB_METHODS),
                                     ("attention", self.attention, ("fp32", "int8"))):
            if value not in allowed:
                raise ValueError(f"{name} must be one of {', '.join(allowed)}, not {value!r}")


class ExportAttention(nn.Module):
    """A batch-first self-attention nn.MultiheadAttention (no mask) with the heads split once and merged
    once: its ONNX graph has 3 transposes per block where the exporter writes 8 for MultiheadAttention
    (with their Shape/Gather/Concat chains), the same numbers (export_image_tower checks them)."""

    def __init__(self, mha: nn.MultiheadAttention) -> None:
        super().__init__()
        self.heads, self.width = mha.num_heads, mha.embed_dim
        self.scale = (mha.embed_dim // mha.num_heads) ** -0.5  # a constant in the graph, not a Shape/Div/Pow chain
        self.in_proj = nn.Linear(mha.embed_dim, 3 * mha.embed_dim, bias=mha.in_proj_bias is not None)
        self.in_proj.weight, self.in_proj.bias = mha.in_proj_weight, mha.in_proj_bias
        self.out_proj = mha.out_proj

    @staticmethod
    def replaces(module: nn.Module) -> bool:
        return (isinstance(module, nn.MultiheadAttention) and module.batch_first and module._qkv_same_embed_dim
                and module.bias_k is None and not module.add_zero_attn)

    def forward(self, q_x: torch.Tensor, k_x: torch.Tensor | None = None, v_x: torch.Tensor | None = None,
                need_weights: bool = False, attn_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, None]:
        if (k_x is not None and k_x is not q_x) or (v_x is not None and v_x is not q_x) or attn_mask is not None:
            raise ValueError("ExportAttention is self-attention without a mask (an image tower's)")
        n, length = q_x.shape[:2]
        q, k, v = self.in_proj(q_x).reshape(n, length, 3, self.heads, self.width // self.heads).permute(2, 0, 3, 1, 4)
        attn = torch.softmax((q * self.scale) @ k.transpose(-2, -1), dim=-1)
        return self.out_proj((attn @ v).transpose(1, 2).reshape(n, length, self.width)), None


def lean_attention(model: nn.Module) -> nn.Module:
    """A copy of `model` whose image tower's self-attention modules are ExportAttention (the rest shared
    in value, not in identity: the original is untouched)."""
    model = copy.deepcopy(model)
    for parent in model.visual.modules():
        for name, child in list(parent.named_children()):
            if ExportAttention.replaces(child):
                setattr(parent, name, ExportAttention(child))
    return model


class ImageTower(nn.Module):
    """The CLIP image tower as exported: normalised pixels [N, 3, S, S] -> unnormalised embedding [N, D],
    and with `patches` every patch token [N, P, D] through ln_post and the projection, as GS-Bias's
    spatial bias scores them (`compression.models.image_features`)."""

    def __init__(self, model: nn.Module, patches: bool = False) -> None:
        super().__init__()
        self.model, self.patches = model, patches

    def forward(self, pixels: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        if not self.patches:
            return self.model.visual(pixels)
        return image_features(self.model, pixels, True)


def session(path: str | Path, providers: list[str] | None = None, optimize: bool = True,
            threads: int = 0) -> ort.InferenceSession:
    """An onnxruntime session; optimize=False runs the QDQ graph as written (needed for int4 activations)."""
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    opts.intra_op_num_threads = threads
    if not optimize:
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(str(path), opts, providers=providers or ["CPUExecutionProvider"])


def run_onnx(sess: ort.InferenceSession, pixels: np.ndarray, batch: int = 64, output: str = OUTPUT_NAME) -> np.ndarray:
    """One output (embeddings by default) of [N, 3, S, S] pixels, in batches."""
    return np.concatenate([sess.run([output], {INPUT_NAME: np.ascontiguousarray(pixels[i:i + batch], np.float32)})[0]
                           for i in range(0, len(pixels), batch)])


@torch.inference_mode()
def torch_embeddings(model: nn.Module, pixels: torch.Tensor, batch: int = 64, patches: bool = False) -> np.ndarray:
    """Embeddings [N, D] (or patch features [N, P, D]) of the fp32 torch tower, in batches."""
    return torch.cat([image_features(model, pixels[i:i + batch].float(), patches)[1 if patches else 0]
                      for i in range(0, len(pixels), batch)]).numpy()


def export_image_tower(model: nn.Module, path: str | Path, image_size: int, opset: int = 17,
                       atol: float = 1e-3) -> Path:
    """Export to ONNX (dynamic batch), run onnx.checker, and compare with torch on a batch of 3. ViT
    towers (`supports_patches`) get a second output, the patch features."""
    path = Path(path)
    patches = supports_patches(model)
    outputs = [OUTPUT_NAME, PATCHES_NAME] if patches else [OUTPUT_NAME]
    tower = ImageTower(lean_attention(model), patches).eval().float()
    probe = torch.randn(3, 3, image_size, image_size, generator=torch.Generator().manual_seed(0))
    fastpath = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)  # the fused MHA kernel has no ONNX export
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation notices
            torch.onnx.export(tower, (probe[:2],), str(path), dynamo=False, input_names=[INPUT_NAME],
                              output_names=outputs, opset_version=opset,
                              dynamic_axes={name: {0: "batch"} for name in [INPUT_NAME, *outputs]})
    finally:
        torch.backends.mha.set_fastpath_enabled(fastpath)
    onnx.checker.check_model(str(path))
    sess = session(path)
    for output in outputs:
        got = run_onnx(sess, probe.numpy(), output=output)
        want = torch_embeddings(model, probe, patches=output == PATCHES_NAME)
        err = float(np.abs(got - want).max())
        if not np.allclose(got, want, atol=atol, rtol=1e-3):
            raise ExportError(f"ONNX export disagrees with torch on {output}: max abs difference {err:.2e} > {atol:.0e}")
    return path


class ArrayReader(CalibrationDataReader):
    """Feeds calibration images [N, 3, S, S] to onnxruntime's calibrator in batches."""

    def __init__(self, pixels: np.ndarray, batch: int) -> None:
        self._batches = [{INPUT_NAME: np.ascontiguousarray(pixels[i:i + batch], np.float32)}
                         for i in range(0, len(pixels), batch)]
        self._it = iter(self._batches)

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._it, None)

    def rewind(self) -> None:
        self._it = iter(self._batches)


def softmax_consumers(model: onnx.ModelProto) -> list[str]:
    """Names of the nodes that take a Softmax output (attention probabilities @ V)."""
    outs = {o for n in model.graph.node if n.op_type == "Softmax" for o in n.output}
    return [n.name for n in model.graph.node if any(i in outs for i in n.input)]


def quantize(fp32_path: str | Path, out_path: str | Path, calib: np.ndarray, cfg: QuantConfig) -> Path:
    """Static QDQ quantisation of an exported tower with the given calibration images."""
    cfg.validate()
    out_path = Path(out_path)
    with tempfile.TemporaryDirectory() as tmp:
        pre = Path(tmp) / "pre.onnx"
        # Symbolic shape inference cannot follow nn.MultiheadAttention's reshapes; ONNX's own suffices.
        quant_pre_process(str(fp32_path), str(pre), skip_symbolic_shape=True)
        model = onnx.load(str(pre))
        if any(not n.name for n in model.graph.node):
            for i, n in enumerate(model.graph.node):
                n.name = n.name or f"{n.op_type}_{i}"
            onnx.save(model, str(pre))
        exclude = softmax_consumers(model) if cfg.attention == "fp32" else []
        quantize_static(str(pre), str(out_path), ArrayReader(calib, cfg.calib_batch), quant_format=QuantFormat.QDQ,
                        per_channel=cfg.per_channel, weight_type=BITS[cfg.bits][0], activation_type=BITS[cfg.bits][1],
                        calibrate_method=CALIB_METHODS[cfg.calib_method],
                        reduce_range=cfg.reduce_range and BITS[cfg.bits][0] == QuantType.QInt8,
                        op_types_to_quantize=LINEAR_OPS if cfg.ops == "linear" else None,
                        nodes_to_exclude=exclude, extra_options={
                            "CalibPercentile": 99.99,
                            "OpTypesToExcludeOutputQuantization": [] if cfg.quantize_linear_outputs else ["MatMul", "Gemm"]})
    onnx.checker.check_model(str(out_path))
    return out_path


@dataclass
class Agreement:
    """How closely a quantised model follows fp32 on some images."""

    n_images: int
    cosine_mean: float
    cosine_min: float
    top1_agreement: dict[str, float]

    def as_dict(self) -> dict:
        return {"n_images": self.n_images, "cosine_mean": round(self.cosine_mean, 6),
                "cosine_min": round(self.cosine_min, 6),
                "top1_agreement": {k: round(v, 6) for k, v in self.top1_agreement.items()}}


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=-1, keepdims=True).clip(1e-12)


def agreement(reference: np.ndarray, candidate: np.ndarray, classifiers: dict[str, np.ndarray]) -> Agreement:
    """Cosine similarity of embeddings and top-1 agreement under each label set's classifier."""
    ref, cand = _unit(reference), _unit(candidate)
    cos = (ref * cand).sum(-1)
    top1 = {name: float(((ref @ w.T).argmax(-1) == (cand @ w.T).argmax(-1)).mean()) for name, w in classifiers.items()}
    return Agreement(len(ref), float(cos.mean()), float(cos.min()), top1)


def check_agreement(result: Agreement, min_cosine: float, what: str) -> None:
    """Refuse a quantised model whose mean embedding cosine to fp32 is below the threshold."""
    if result.cosine_mean < min_cosine:
        raise ExportError(
            f"{what} does not agree with the fp32 model: mean cosine similarity of embeddings "
            f"{result.cosine_mean:.4f} (min {result.cosine_min:.4f}, top-1 agreement "
            f"{', '.join(f'{k} {v:.3f}' for k, v in result.top1_agreement.items())}) on {result.n_images} "
            f"held-out images is below the threshold {min_cosine}. Try more or better calibration images "
            f"(--calib spdfq or real:DIR), w8a8 instead of w4a8, or lower --min-cosine knowingly.")


def quantize_weight_only_int4(fp32_path: str | Path, out_path: str | Path, block_size: int = 32,
                              accuracy_level: int = 4) -> Path:
    """onnxruntime's MatMulNBits: int4 block-wise weights, no calibration; accuracy_level 4 makes the
    CPU kernel quantise activations to int8 on the fly (dynamic, so calibration data plays no part)."""
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    quantizer = MatMulNBitsQuantizer(onnx.load(str(fp32_path)), bits=4, block_size=block_size, is_symmetric=True,
                                     accuracy_level=accuracy_level)
    quantizer.process()
    quantizer.model.save_model_to_file(str(out_path), use_external_data_format=False)
    onnx.checker.check_model(str(out_path))
    return Path(out_path)
