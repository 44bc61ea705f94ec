"""`adaptclip label`: label folders, patterns or path lists into a resumable jsonl/csv file."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from adaptclip.client import flags

EPILOG = """\
Output: one record per image, appended as it is done; re-running the same command skips the images
already in OUT (a job killed at any point resumes without losing or repeating a record).
jsonl: {"image", "sha256", "top": [{"label", "probability", "logit"}], "model", "label_set_id",
+ "zero_shot_top", "adaptation" with --tta}, or {"image", "sha256", "model", "label_set_id",
"error": {"code", "message"}} for a file that could not be labelled (code UNREADABLE when it could not
be read). csv: columns image, sha256, model, label_set_id, top1, top1_probability, top (the top-k as
JSON), zero_shot_top1, zero_shot_top1_probability, adaptation (JSON), error_code, error_message.
"""


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("label", help="label many images into a resumable output file", epilog=EPILOG,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_arguments(p)


def _add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("sources", nargs="+", metavar="SRC",
                   help="folder (searched recursively for images), glob pattern, or .txt/.lst file of paths")
    p.add_argument("-o", "--output", required=True, metavar="OUT", help="output file (appended to; resumes)")
    flags.add_label_flags(p)
    p.add_argument("--top-k", type=int, default=5)
    p.add_argument("--format", choices=["jsonl", "csv"], help="default: csv when OUT ends in .csv, else jsonl")
    p.add_argument("--concurrency", type=int, default=32,
                   help="images in flight (with --engine ray: images per batch in each worker)")
    where = p.add_mutually_exclusive_group()
    where.add_argument("--server", metavar="HOST:PORT", help="classify through a running service (several "
                       "HOST:PORT comma-separated, or dns:///NAME:PORT: balanced round robin)")
    where.add_argument("--local", action="store_true", help="load the model in this process (the default)")
    p.add_argument("--engine", choices=["local", "ray"], default="local",
                   help="local: this process; ray: Ray Data with an actor pool holding the model (pip install 'adaptclip[ray]')")
    p.add_argument("--ray-address", help="Ray cluster address (default: start a local Ray)")
    p.add_argument("--ray-workers", type=int, default=2, help="model actors with --engine ray")
    flags.add_model_flags(p, serving=True)
    p.add_argument("--config", help="YAML server config for the in-process model (see README; flags override it)")
    p.add_argument("--max-batch-size", type=int, help="encoder batch size of the in-process model")
    flags.add_tta_flags(p)
    flags.add_connection_flags(p)


def _server_config(args: argparse.Namespace):
    """The in-process model's ServerConfig, built exactly as `adaptclip serve` builds it from the same flags."""
    cfg = flags.server_config(args)
    cfg.models = cfg.models[:1]  # the job uses the first model: load no other
    if not cfg.cache.redis_url:
        cfg.cache.enabled = False  # an in-process cache never hits in one pass over distinct images
    return cfg


def _engine(args: argparse.Namespace):
    from adaptclip.client import label

    if args.server:
        model_flags = [f for f in ("model", "pretrained", "bundle", "device", "precision", "random_init", "config",
                                   "max_batch_size", "keep_rate") if getattr(args, f, None) is not None
                       and getattr(args, f) is not False]
        if model_flags:
            raise label.LabelError(f"--{model_flags[0].replace('_', '-')} is for the in-process model; with --server "
                                   f"the server's model answers (pick a served one with --name)")
        if args.engine == "ray":
            raise label.LabelError("--engine ray runs the model in its workers: leave out --server")
        return label.server_engine(args.server, **flags.connection_from_args(args))
    if any(flags.connection_from_args(args).values()):
        raise label.LabelError("--token/--tls* are for --server: the in-process model needs no connection")
    cfg = _server_config(args)
    if args.engine == "local":
        return label.local_engine(cfg)
    try:
        from adaptclip.client import label_ray
    except ImportError as exc:
        if exc.name is not None and exc.name.split(".")[0] != "ray":
            raise
        raise label.LabelError("--engine ray needs Ray: pip install 'adaptclip[ray]'") from None
    return label_ray.ray_engine(cfg, args.ray_address, args.ray_workers)


def run(args: argparse.Namespace) -> int:
    from adaptclip.client import label

    try:
        if args.concurrency < 1 or args.ray_workers < 1 or args.top_k < 0:
            raise label.LabelError("--concurrency and --ray-workers must be >= 1, --top-k >= 0")
        labels, templates = flags.labels_from_args(args)
        job = label.Job(labels=labels, templates=templates, top_k=args.top_k, adaptation=flags.adaptation_from_args(args),
                        model=args.name or "" if args.server else "", concurrency=args.concurrency)
        fmt = args.format or ("csv" if Path(args.output).suffix.lower() == ".csv" else "jsonl")
        label.run_job(job, args.sources, args.output, fmt, _engine(args))
    except (label.LabelError, OSError, ValueError) as exc:  # ValueError: a bad --config or flag mix
        print(f"adaptclip label: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("adaptclip label: interrupted; run the same command again to go on", file=sys.stderr)
        return 130
    return 0

