"""`adaptclip` command line: serve, classify, label, eval, quantize, edge."""
from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path


def _add_model_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model (replaces the config file's model list)")
    g.add_argument("--model", help="open_clip model name, or a JSON model config file")
    g.add_argument("--pretrained", help="open_clip pretrained tag (downloaded) or a local checkpoint path")
    g.add_argument("--bundle", help="serve an exported edge bundle folder (adaptclip quantize) through onnxruntime")
    g.add_argument("--name", help="served model name (default: the model name / JSON file stem)")
    g.add_argument("--device", help="auto (CUDA when available), cpu, cuda, cuda:1, ...")
    g.add_argument("--precision", choices=["fp32", "fp16", "bf16"])
    g.add_argument("--keep-rate", type=float,
                   help="token compression: fraction of patch tokens kept per reduction stage (default 1 = off)")
    g.add_argument("--random-init", action="store_true",
                   help="serve RANDOM weights (tests and speed benchmarks only; answers are meaningless)")


def _serve_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve", help="run the gRPC service")
    p.add_argument("--config", help="YAML config file (see README)")
    _add_model_flags(p)
    p.add_argument("--host")
    p.add_argument("--port", type=int)
    p.add_argument("--max-batch-size", type=int)
    p.add_argument("--max-queue-delay-ms", type=float)
    p.add_argument("--max-queue-size", type=int)
    p.add_argument("--max-image-bytes", type=int)
    p.add_argument("--max-image-pixels", type=int)
    p.add_argument("--max-labels", type=int)
    p.add_argument("--redis-url", help="cache adaptation state in Redis (default: in-process LRU)")
    p.add_argument("--cache-bytes", type=int, dest="cache_max_bytes", help="in-process cache budget in bytes")
    p.add_argument("--cache-ttl", type=int, dest="cache_ttl_s", help="Redis entry lifetime in seconds")
    p.add_argument("--no-cache", action="store_true", help="no caching at all")
    p.add_argument("--log-level", default="INFO")


def _classify_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("classify", help="classify images through a running service")
    p.add_argument("images", nargs="+", metavar="IMAGE")
    labels = p.add_mutually_exclusive_group(required=True)
    labels.add_argument("--labels", help="comma-separated labels")
    labels.add_argument("--labels-file", help="one label per line")
    p.add_argument("--templates-file", help="one prompt template per line, with {} for the label")
    p.add_argument("--top-k", type=int, default=5)
    p.add_argument("--model", default="", help="served model name (default: the server's default)")
    p.add_argument("--server", default="localhost:50051", help="HOST:PORT")
    p.add_argument("--timeout", type=float, default=120.0, help="seconds per image")
    p.add_argument("--json", action="store_true", help="one JSON line per image")
    p.add_argument("--keep-rate", type=float, help="token compression for these requests (default: the model's)")
    add_tta_flags(p)


def add_tta_flags(p: argparse.ArgumentParser) -> None:
    tta = p.add_argument_group("test-time adaptation (unset values take the model's defaults)")
    tta.add_argument("--tta", choices=["none", "gs_bias", "zero", "tpt"],
                     help="adaptation method (default: the model's, which is none unless its config says)")
    tta.add_argument("--views", type=int, help="views per image, the original included")
    tta.add_argument("--seed", type=int, help="view sampling seed (same seed, same answer)")
    tta.add_argument("--skip-entropy", type=float, help="answer zero-shot when normalised entropy is below this")


def build_config(args: argparse.Namespace):
    """Embedded defaults <- YAML config <- flags."""
    from adaptclip.server.config import ModelSpec, load_config

    def flag(name: str):
        return getattr(args, name, None)

    cfg = load_config(flag("config"))
    if flag("bundle"):
        if args.model or args.pretrained or args.random_init:
            raise ValueError("--bundle serves an exported bundle; it does not go with --model/--pretrained/--random-init")
        base = cfg.default_model
        cfg.models = [ModelSpec(bundle=args.bundle, name=args.name, device=args.device or "auto",
                                adaptation=dict(base.adaptation) if base.bundle else {})]
    elif args.model or args.pretrained or args.random_init:
        base = cfg.default_model
        cfg.models = [ModelSpec(model=args.model or base.model,
                                pretrained=args.pretrained if args.pretrained else (None if args.model else base.pretrained),
                                name=args.name, device=args.device or base.device,
                                precision=args.precision or base.precision, random_init=args.random_init)]
    else:
        for attr in ("name", "device", "precision"):
            if flag(attr):
                setattr(cfg.models[0], attr, flag(attr))
    if flag("keep_rate") is not None:
        cfg.models[0].keep_rate = flag("keep_rate")
    for attr, target in (("host", cfg), ("port", cfg), ("max_batch_size", cfg.batching),
                         ("max_queue_delay_ms", cfg.batching), ("max_queue_size", cfg.batching),
                         ("max_image_bytes", cfg.limits), ("max_image_pixels", cfg.limits), ("max_labels", cfg.limits)):
        if flag(attr) is not None:
            setattr(target, attr, flag(attr))
    for attr, target_attr in (("redis_url", "redis_url"), ("cache_max_bytes", "max_bytes"), ("cache_ttl_s", "ttl_s")):
        if flag(attr) is not None:
            setattr(cfg.cache, target_attr, flag(attr))
    if flag("no_cache"):
        cfg.cache.enabled = False
    return cfg


def cmd_serve(args: argparse.Namespace) -> int:
    import asyncio

    from adaptclip.server.app import serve
    from adaptclip.server.models import ModelLoadError

    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        cfg = build_config(args)
    except (ValueError, OSError) as exc:
        print(f"adaptclip serve: bad config: {exc}", file=sys.stderr)
        return 2
    try:
        return asyncio.run(serve(cfg))
    except ModelLoadError as exc:
        print(f"adaptclip serve: {exc}", file=sys.stderr)
        return 2


def _print_table(path: str, resp) -> None:
    print(f"{path}  (model {resp.model}, {resp.timings.total_us / 1000:.1f} ms)")
    for rank, s in enumerate(resp.top, 1):
        print(f"  {rank:>2}. {s.label:<30} {s.probability * 100:6.2f}%  logit {s.logit:8.4f}")
    if resp.zero_shot_top:
        a = resp.adaptation
        what = "skipped (confident)" if a.skipped else f"{a.views_encoded} views, {resp.timings.adapt_us / 1000:.1f} ms"
        print(f"  adaptation: {what}; zero-shot top-1 was {resp.zero_shot_top[0].label} "
              f"({resp.zero_shot_top[0].probability * 100:.2f}%)")


def _scores(top) -> list[dict]:
    return [{"label": s.label, "probability": s.probability, "logit": s.logit} for s in top]


def response_record(path: str, resp) -> dict:
    """The JSON line of one classified image (later fields are added, these stay)."""
    rec = {"image": path, "top": _scores(resp.top), "model": resp.model, "label_set_id": resp.label_set_id,
           "request_id": resp.request_id}
    if resp.zero_shot_top:
        from adaptclip.v1 import classifier_pb2 as pb

        a = resp.adaptation
        rec["zero_shot_top"] = _scores(resp.zero_shot_top)
        rec["adaptation"] = {"method": pb.Adaptation.Method.Name(a.method).lower(), "views_encoded": a.views_encoded,
                             "skipped": a.skipped, "steps_run": a.steps_run, "global_only": a.global_only,
                             "normalized_entropy": a.normalized_entropy, "adapt_ms": resp.timings.adapt_us / 1000}
    return rec


def labels_from_args(args: argparse.Namespace) -> tuple[list[str], list[str]]:
    """--labels / --labels-file and --templates-file as lists (no templates: the service's defaults)."""
    from adaptclip.client.client import load_lines

    labels = load_lines(args.labels_file) if args.labels_file else [x.strip() for x in args.labels.split(",") if x.strip()]
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


def cmd_classify(args: argparse.Namespace) -> int:
    import grpc

    from adaptclip.client.client import Client, classify_request

    labels, templates = labels_from_args(args)
    adaptation = adaptation_from_args(args)
    failed = 0
    with Client(args.server, timeout_s=args.timeout) as client:
        try:
            ref = client.register_label_set(labels, templates)
        except grpc.RpcError as exc:
            print(f"adaptclip classify: {exc.code().name}: {exc.details()}", file=sys.stderr)
            return 1

        def requests():
            for i, path in enumerate(args.images):
                try:
                    data = Path(path).read_bytes()
                except OSError as exc:
                    data = b""
                    print(f"adaptclip classify: {path}: {exc}", file=sys.stderr)
                req = classify_request(data, label_set_id=ref.label_set_id, model=args.model, top_k=args.top_k,
                                       request_id=str(i), adaptation=adaptation)
                if args.keep_rate is not None:
                    req.token_keep_rate = args.keep_rate
                yield req

        try:
            for resp in client.classify_stream(requests(), timeout_s=args.timeout * len(args.images)):
                path = args.images[int(resp.request_id)]
                if resp.HasField("error"):
                    failed += 1
                    print(f"adaptclip classify: {path}: {resp.error.message}", file=sys.stderr)
                    continue
                if args.json:
                    print(json.dumps(response_record(path, resp)), flush=True)
                else:
                    _print_table(path, resp)
        except grpc.RpcError as exc:
            print(f"adaptclip classify: {exc.code().name}: {exc.details()}", file=sys.stderr)
            return 1
    return 1 if failed else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="adaptclip", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    _serve_parser(sub)
    _classify_parser(sub)
    from adaptclip.client import cli_edge, cli_eval, cli_label, cli_quantize

    commands = {"serve": cmd_serve, "classify": cmd_classify}
    for module, name in ((cli_label, "label"), (cli_eval, "eval"), (cli_quantize, "quantize"), (cli_edge, "edge")):
        module.add_parser(sub)
        commands[name] = module.run
    args = parser.parse_args(argv)
    return commands[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
