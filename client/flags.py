"""The flag groups every `adaptclip` command shares (model, labels, adaptation) and what they build."""
from __future__ import annotations

import argparse
import dataclasses

from adaptclip.client.client import load_lines
from adaptclip.kernels.backend import BACKENDS

PRECISIONS = ["auto", "fp32", "fp16", "bf16"]  # compression.models.PRECISIONS (not imported: it loads torch)


def add_model_flags(p: argparse.ArgumentParser, *, serving: bool = False, placement: bool = True) -> None:
    """--model/--pretrained/--random-init; with `placement` --device/--precision; with `serving` also the
    served-model flags (--bundle, --name, --keep-rate)."""
    g = p.add_argument_group("model (replaces the config file's model list)")
    g.add_argument("--model", help="open_clip model name, or a JSON model config file")
    g.add_argument("--pretrained", help="open_clip pretrained tag (downloaded) or a local checkpoint path")
    g.add_argument("--random-init", action="store_true",
                   help="RANDOM weights (tests and speed benchmarks only; answers are meaningless)")
    if placement:
        g.add_argument("--device", help="auto (CUDA when available), cpu, cuda, cuda:1, ...")
        g.add_argument("--precision", choices=PRECISIONS,
                       help="auto (the default): bf16 on a CUDA GPU with native bf16, else fp16 there, fp32 on the CPU; "
                            "adaptation math runs in fp32 whatever this is; a bundle keeps its own (auto only)")
        g.add_argument("--kernels", choices=BACKENDS,
                       help="Triton kernels for views, GS-Bias and token selection: auto (CUDA, when triton imports), "
                            "torch, or triton; each is checked against torch at load and falls back to it")
    if serving:
        g.add_argument("--bundle", help="serve an exported edge bundle folder (adaptclip quantize) through onnxruntime")
        g.add_argument("--name", help="served model name (default: the model name / JSON file stem)")
        g.add_argument("--keep-rate", type=float,
                       help="token compression: fraction of patch tokens kept per reduction stage (default 1 = off)")


def add_label_flags(p: argparse.ArgumentParser, *, required: bool = True, what: str = "labels") -> None:
    """--labels / --labels-file (one of them; `required`) and --templates-file."""
    labels = p.add_mutually_exclusive_group(required=required)
    labels.add_argument("--labels", help=f"comma-separated {what}")
    labels.add_argument("--labels-file", help=f"{what}, one per line")
    p.add_argument("--templates-file", help="one prompt template per line, with {} for the label "
                                            "(default: open_clip's SIMPLE_IMAGENET_TEMPLATES)")


def add_tta_flags(p: argparse.ArgumentParser) -> None:
    tta = p.add_argument_group("test-time adaptation (unset values take the model's defaults)")
    tta.add_argument("--tta", choices=["none", "gs_bias", "zero", "tpt"],
                     help="adaptation method (default: the model's, which is none unless its config says)")
    tta.add_argument("--views", type=int, help="views per image, the original included")
    tta.add_argument("--seed", type=int, help="view sampling seed (same seed, same answer)")
    tta.add_argument("--skip-entropy", type=float, help="answer zero-shot when normalised entropy is below this")


def add_connection_flags(p: argparse.ArgumentParser) -> None:
    """A client's way in: --token (or $ADAPTCLIP_TOKEN), --tls/--tls-ca, --tls-cert/--tls-key (mutual TLS)."""
    g = p.add_argument_group("connection (see README: running it securely)")
    g.add_argument("--token", help="bearer token sent on every call (default: $ADAPTCLIP_TOKEN, which keeps it "
                                   "out of the process list)")
    g.add_argument("--tls", action="store_true", help="TLS, the server verified against the system's CAs")
    g.add_argument("--tls-ca", help="TLS, the server verified against this PEM CA bundle")
    g.add_argument("--tls-cert", help="client certificate (PEM) for mutual TLS; with --tls-key")
    g.add_argument("--tls-key", help="client certificate's private key (PEM)")


def connection_from_args(args: argparse.Namespace) -> dict:
    """Client(...) keyword arguments for the connection flags."""
    return {"token": args.token, "tls": args.tls, "tls_ca": args.tls_ca, "tls_cert": args.tls_cert,
            "tls_key": args.tls_key}


def add_serve_security_flags(p: argparse.ArgumentParser) -> None:
    """`adaptclip serve`: auth, TLS, metrics, logs and compute limits (each also a config file key)."""
    g = p.add_argument_group("security, metrics and limits (see README: running it securely)")
    g.add_argument("--auth-token-file", metavar="FILE", help="bearer tokens, one a line: every Classifier call needs one "
                                             "(re-read on SIGHUP)")
    g.add_argument("--tls-cert", dest="serve_tls_cert", metavar="PEM", help="serve TLS with this PEM certificate chain")
    g.add_argument("--tls-key", dest="serve_tls_key", metavar="PEM", help="the certificate's PEM private key")
    g.add_argument("--tls-client-ca", metavar="PEM", help="mutual TLS: require client certificates signed by this PEM CA")
    g.add_argument("--no-reflection", action="store_true", help="turn server reflection off")
    g.add_argument("--metrics-port", type=int, help="serve Prometheus /metrics on this port")
    g.add_argument("--metrics-host", help="address of the metrics port (default 0.0.0.0)")
    g.add_argument("--log-json", action="store_true", default=None, help="log JSON lines")
    g.add_argument("--max-views", type=int, help="views per request (default 256)")
    g.add_argument("--max-steps", type=int, help="optimisation steps per request (default 20)")
    g.add_argument("--max-views-in-flight", type=int, help="views being computed across requests; past it "
                                                           "RESOURCE_EXHAUSTED with a retry hint (default 1024)")


def labels_from_args(args: argparse.Namespace) -> tuple[list[str], list[str]]:
    """--labels / --labels-file and --templates-file as lists (none given: empty lists)."""
    if args.labels_file:
        labels = load_lines(args.labels_file)
    else:
        labels = [x.strip() for x in (args.labels or "").split(",") if x.strip()]
    return labels, load_lines(args.templates_file) if args.templates_file else []


def adaptation_from_args(args: argparse.Namespace):
    """The Adaptation message for --tta/--views/--seed/--skip-entropy (unset flags stay unset)."""
    from adaptclip.v1 import classifier_pb2 as pb

    msg = pb.Adaptation(method=pb.Adaptation.Method.Value(args.tta.upper()) if args.tta
                        else pb.Adaptation.METHOD_UNSPECIFIED)
    for flag, name in (("views", "views"), ("seed", "seed"), ("skip_entropy", "skip_entropy")):
        if getattr(args, flag) is not None:
            setattr(msg, name, getattr(args, flag))
    return msg


def model_spec(args: argparse.Namespace, base):
    """The ModelSpec the model flags describe, over `base` (the config's first model). Naming another
    --model drops base's weights and adaptation defaults (they belong to that other model)."""
    from adaptclip.compression.models import ModelSpec

    def flag(name: str):
        return getattr(args, name, None)

    if flag("bundle"):
        if args.model or args.pretrained or args.random_init:
            raise ValueError("--bundle serves an exported bundle; it does not go with --model/--pretrained/--random-init")
        spec = ModelSpec(bundle=args.bundle, adaptation=dict(base.adaptation) if base.bundle else {})
    elif args.model or args.pretrained or args.random_init:
        other = bool(args.model) and args.model != base.model
        spec = dataclasses.replace(base, model=args.model or base.model, bundle=None, random_init=args.random_init,
                                   name=None if other else base.name,
                                   pretrained=args.pretrained or (None if other else base.pretrained),
                                   adaptation={} if other else dict(base.adaptation))
    else:
        spec = dataclasses.replace(base)
    for name in ("name", "device", "precision", "keep_rate", "kernels"):
        if flag(name) is not None:
            setattr(spec, name, flag(name))
    return spec


def server_config(args: argparse.Namespace):
    """Embedded defaults <- YAML config (--config) <- flags, as `adaptclip serve` builds it."""
    from adaptclip.server.config import load_config

    def flag(name: str):
        return getattr(args, name, None)

    cfg = load_config(flag("config"))
    if flag("bundle") or args.model or args.pretrained or args.random_init:
        cfg.models = [model_spec(args, cfg.default_model)]
    else:
        cfg.models[0] = model_spec(args, cfg.models[0])
    for attr, target in (("host", cfg), ("port", cfg), ("max_batch_size", cfg.batching),
                         ("max_queue_delay_ms", cfg.batching), ("max_queue_size", cfg.batching),
                         ("max_image_bytes", cfg.limits), ("max_image_pixels", cfg.limits), ("max_labels", cfg.limits),
                         ("max_views", cfg.limits), ("max_steps", cfg.limits), ("max_views_in_flight", cfg.limits),
                         ("metrics_port", cfg), ("metrics_host", cfg), ("log_json", cfg),
                         ("auth_token_file", cfg.security), ("tls_client_ca", cfg.security),
                         ("state_dir", cfg), ("label_set_cache_size", cfg)):
        if flag(attr) is not None:
            setattr(target, attr, flag(attr))
    for attr, target_attr in (("serve_tls_cert", "tls_cert"), ("serve_tls_key", "tls_key")):
        if flag(attr) is not None:
            setattr(cfg.security, target_attr, flag(attr))
    if flag("no_reflection"):
        cfg.security.reflection = False
    for attr, target_attr in (("redis_url", "redis_url"), ("cache_max_bytes", "max_bytes"), ("cache_ttl_s", "ttl_s")):
        if flag(attr) is not None:
            setattr(cfg.cache, target_attr, flag(attr))
    if flag("no_cache"):
        cfg.cache.enabled = False
    for spec in cfg.models if flag("kernels") else ():  # server-wide, unlike --device
        spec.kernels = flag("kernels")
    cfg.check()
    return cfg
