"""`adaptclip` command line: serve, classify, label, eval, quantize, edge."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from adaptclip.client import flags
from adaptclip.client.records import response_record


def _serve_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve", help="run the gRPC service")
    p.add_argument("--config", help="YAML config file (see README)")
    flags.add_model_flags(p, serving=True)
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
    p.add_argument("--state-dir", help="without Redis: keep registered label sets in this folder across restarts")
    p.add_argument("--label-set-cache-size", type=int, help="label sets whose classifiers stay built (default 256)")
    p.add_argument("--log-level", default="INFO")
    flags.add_serve_security_flags(p)


def _classify_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("classify", help="classify images through a running service")
    p.add_argument("images", nargs="+", metavar="IMAGE")
    flags.add_label_flags(p)
    p.add_argument("--top-k", type=int, default=5)
    p.add_argument("--model", default="", help="served model name (default: the server's default)")
    p.add_argument("--server", default="localhost:50051",
                   help="HOST:PORT, several comma-separated, or dns:///NAME:PORT (balanced round robin)")
    p.add_argument("--timeout", type=float, default=120.0, help="seconds per image")
    p.add_argument("--json", action="store_true", help="one JSON line per image")
    p.add_argument("--keep-rate", type=float, help="token compression for these requests (default: the model's)")
    flags.add_tta_flags(p)
    flags.add_connection_flags(p)


def cmd_serve(args: argparse.Namespace) -> int:
    import asyncio

    from adaptclip.compression.models import ModelLoadError
    from adaptclip.server.app import serve
    from adaptclip.server.logs import setup_logging

    try:
        cfg = flags.server_config(args)
    except (ValueError, OSError) as exc:
        print(f"adaptclip serve: bad config: {exc}", file=sys.stderr)
        return 2
    setup_logging(args.log_level, cfg.log_json)
    try:
        return asyncio.run(serve(cfg))
    except ModelLoadError as exc:
        print(f"adaptclip serve: {exc}", file=sys.stderr)
        return 2
    except ValueError as exc:  # limits, a token or TLS file the server cannot use (found before the port opens)
        print(f"adaptclip serve: bad config: {exc}", file=sys.stderr)
        return 2


def _print_table(path: str, resp) -> None:
    print(f"{path}  (model {resp.model}, {resp.timings.total_us / 1000:.1f} ms)")
    for rank, s in enumerate(resp.top, 1):
        print(f"  {rank:>2}. {s.label:<30} {s.probability * 100:6.2f}%  logit {s.logit:8.4f}")
    if resp.zero_shot_top:
        a = resp.adaptation
        what = "skipped (confident)" if a.skipped else f"{a.views_encoded} views, {resp.timings.adapt_us / 1000:.1f} ms"
        if a.fell_back:
            what += f", zero-shot answer ({a.note})"
        print(f"  adaptation: {what}; zero-shot top-1 was {resp.zero_shot_top[0].label} "
              f"({resp.zero_shot_top[0].probability * 100:.2f}%)")


def cmd_classify(args: argparse.Namespace) -> int:
    import grpc

    from adaptclip.client.client import Client, classify_request

    labels, templates = flags.labels_from_args(args)
    adaptation = flags.adaptation_from_args(args)
    failed = 0
    try:
        client = Client(args.server, timeout_s=args.timeout, **flags.connection_from_args(args))
    except (ValueError, OSError) as exc:  # a bad --server list, half a client certificate, an unreadable PEM
        print(f"adaptclip classify: {exc}", file=sys.stderr)
        return 2
    with client:
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
    from adaptclip.client import cli_edge, cli_eval, cli_label, cli_quantize, cli_tune

    commands = {"serve": cmd_serve, "classify": cmd_classify}
    for module, name in ((cli_label, "label"), (cli_eval, "eval"), (cli_quantize, "quantize"), (cli_edge, "edge"),
                         (cli_tune, "tune")):
        module.add_parser(sub)
        commands[name] = module.run
    args = parser.parse_args(argv)
    return commands[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
