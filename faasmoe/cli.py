"""The `faasmoe` command line: one argparse subcommand tree; each command adds its own parser."""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

from faasmoe.sizes import format_bytes, parse_size

def _add_model_parser(subparsers: argparse._SubParsersAction) -> None:
    from faasmoe.presets import FAMILIES, PRESETS

    model = subparsers.add_parser("model", help="model checkpoints: init writes a random one")
    actions = model.add_subparsers(dest="model_command", required=True, metavar="ACTION")
    presets = "; ".join(f"{family}: {', '.join(PRESETS[family])}" for family in FAMILIES)
    init = actions.add_parser(
        "init",
        help="write a random MoE checkpoint (HF format, with tokenizer) into OUT",
        description="Write a complete random checkpoint of an MoE family in the real Hugging Face "
        "on-disk format: config.json, generation_config.json, tokenizer files and safetensors "
        "weights (sharded with model.safetensors.index.json when larger than --max-shard-size). "
        "The same arguments always write the same weights.",
    )
    init.add_argument("out", metavar="OUT", type=Path, help="directory to write (created if missing)")
    init.add_argument("--family", required=True, choices=FAMILIES, help="model family (the HF model_type)")
    init.add_argument("--preset", default="tiny",
                      help=f"model shape; 'tiny' builds in a second, the others have the real dimensions "
                      f"({presets}); default: tiny")
    init.add_argument("--layers", type=int, default=None,
                      help="keep only the first N layers (so a real-shaped preset fits a machine); default: all")
    init.add_argument("--seed", type=int, default=0, help="random seed of the weights; default: 0")
    init.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default=None,
                      help="weight dtype; default: the preset's (tiny float32, real shapes bfloat16)")
    init.add_argument("--router-skew", type=float, default=0.0, metavar="S",
                      help="Zipf exponent of expert popularity per MoE layer: the expert of popularity rank r "
                      "gets a share of the routed tokens proportional to r^-S, with a different popular set in "
                      "every layer (0: random routers, about uniform; 1: the busiest expert takes several times "
                      "the mean load). Trained models are skewed; random ones are not. Default: 0")
    init.add_argument("--max-shard-size", type=parse_size, default=2 * 1024**3, metavar="SIZE",
                      help="largest safetensors file before sharding (e.g. 2GiB, 500MB); default: 2GiB")
    init.add_argument("--expert-format", choices=("per_expert", "fused"), default="per_expert",
                      help="per_expert: mlp.experts.E.gate_proj.weight ... as the published checkpoints; "
                      "fused: mlp.experts.gate_up_proj [E,2I,H] and down_proj [E,H,I] as transformers 5 "
                      "saves them. Default: per_expert")
    init.add_argument("--quiet", action="store_true", help="no progress bar")
    init.set_defaults(handler=_model_init)


def _model_init(args: argparse.Namespace) -> int:
    from faasmoe.model_init import init_checkpoint

    start = time.perf_counter()
    out = init_checkpoint(
        args.out, args.family, preset=args.preset, layers=args.layers, seed=args.seed, dtype=args.dtype,
        router_skew=args.router_skew, max_shard_bytes=args.max_shard_size, progress=not args.quiet,
        expert_format=args.expert_format,
    )
    weights = sorted(out.glob("model*.safetensors"))
    size = sum(f.stat().st_size for f in weights)
    print(f"wrote {args.family} ({args.preset}) checkpoint to {out}: {format_bytes(size)} in "
          f"{len(weights)} safetensors file(s), {time.perf_counter() - start:.1f}s")
    return 0


def _add_generate_parser(subparsers: argparse._SubParsersAction) -> None:
    gen = subparsers.add_parser(
        "generate",
        help="generate text with the in-process model (every expert resident)",
        description="Load MODEL_DIR in this process (trunk and all experts) and generate for each --prompt "
        "as one batch. This is the full-model reference path; `faasmoe serve` is the serverless one.",
    )
    gen.add_argument("model_dir", metavar="MODEL_DIR", type=Path, help="Hugging Face checkpoint directory")
    gen.add_argument("--prompt", action="append", required=True, help="a prompt; repeat for a batch")
    gen.add_argument("--chat", action="store_true", help="wrap each prompt as a user message in the chat template")
    gen.add_argument("--max-tokens", type=int, default=32, help="tokens to generate per prompt; default: 32")
    gen.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    gen.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass; default: 1.0")
    gen.add_argument("--seed", type=int, default=None, help="sampling seed, for reproducible samples")
    gen.add_argument("--stop", action="append", default=[], help="stop string; repeatable")
    gen.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N; default: cpu")
    gen.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="float32",
                     help="compute dtype; default: float32")
    gen.add_argument("--expert-block-size", type=int, default=None, metavar="K",
                     help="experts per expert function (block); default: all experts of a layer")
    gen.set_defaults(handler=_generate)


def _generate(args: argparse.Namespace) -> int:
    from faasmoe.model import MoEModel
    from faasmoe.sampling import SamplingParams

    model = MoEModel.from_pretrained(args.model_dir, device=args.device, dtype=args.dtype,
                                     expert_block_size=args.expert_block_size)
    if model.tokenizer is None:
        raise ValueError(f"{args.model_dir} has no tokenizer.json; text prompts need one")
    prompts = args.prompt
    if args.chat:
        prompts = [model.tokenizer.apply_chat_template([{"role": "user", "content": p}]) for p in prompts]
    params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
                            seed=args.seed, stop=args.stop)
    start = time.perf_counter()
    results = model.generate(prompts, params)
    elapsed = time.perf_counter() - start
    for prompt, result in zip(args.prompt, results):
        print(f"prompt: {prompt!r}\ncompletion ({len(result.token_ids)} tokens, {result.finish_reason}): "
              f"{result.text!r}\n")
    generated = sum(len(r.token_ids) for r in results)
    cfg = model.config
    print(f"{cfg.family}: {cfg.num_layers} layers, {cfg.num_experts} experts (top-{cfg.top_k}); "
          f"{generated} tokens in {elapsed:.2f}s ({generated / elapsed:.1f} tokens/s)")
    return 0


def _add_scheduler_parser(subparsers: argparse._SubParsersAction) -> None:
    sched = subparsers.add_parser(
        "scheduler",
        help="run the scheduler daemon (registry, placement, keep-alive) with an optional local worker pool",
        description="The FaaSMoE control plane: workers join it with the cluster token, frontends subscribe "
        "to its routing table. It is never on the per-token path.",
    )
    sched.add_argument("--listen", default="127.0.0.1:7070", metavar="HOST:PORT",
                       help="where workers and frontends reach it (HOST:PORT or unix:/path); default: 127.0.0.1:7070")
    sched.add_argument("--token", default=None,
                       help="cluster token (default: $FAASMOE_TOKEN, else a random one that is printed)")
    sched.add_argument("--workers", type=int, default=None,
                       help="local worker processes to spawn and supervise; default: one per GPU, else 1")
    sched.add_argument("--device", default=None,
                       help="devices of the local pool: cpu, cuda (all GPUs) or a list like cuda:0,cuda:1; "
                       "default: cuda when available, else cpu")
    sched.add_argument("--worker-memory", type=parse_size, default=None, metavar="SIZE",
                       help="expert memory budget of each local worker; default: 90%% of the device's free memory")
    sched.add_argument("--host-cache", type=parse_size, default=None, metavar="SIZE",
                       help="host RAM cache per local worker; default: 25%% of available RAM")
    sched.add_argument("--eviction", choices=("lru", "freq"), default="lru", help="local workers' eviction policy")
    sched.add_argument("--keep-alive-policy", choices=("fixed", "adaptive"), default="fixed",
                       help="local workers' keep-alive policy")
    sched.add_argument("--heartbeat-timeout", type=float, default=3.0, metavar="SECONDS",
                       help="declare a worker dead after this long without a heartbeat; default: 3")
    sched.add_argument("--http", default=None, metavar="HOST:PORT",
                       help="serve Prometheus /metrics (scheduler and every worker) and /cluster JSON here")
    sched.set_defaults(handler=_scheduler)


def _devices(spec: str | None) -> list[str]:
    import torch

    if spec is None:
        spec = "cuda" if torch.cuda.is_available() else "cpu"
    if spec == "cuda":
        if not torch.cuda.is_available():
            raise ValueError("--device cuda: CUDA is not available here")
        return [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    return [d.strip() for d in spec.split(",") if d.strip()]


def _scheduler(args: argparse.Namespace) -> int:
    import asyncio
    import os
    import secrets
    import signal

    from runtime.scheduler import Scheduler, SchedulerConfig

    token = args.token or os.environ.get("FAASMOE_TOKEN")
    if not token:
        token = secrets.token_urlsafe(24)
        print(f"cluster token (pass it to `faasmoe worker join`): {token}", flush=True)
    devices = _devices(args.device)
    workers = args.workers if args.workers is not None else (len(devices) if devices[0].startswith("cuda") else 1)
    worker_args = ["--eviction", args.eviction, "--keep-alive-policy", args.keep_alive_policy]
    config = SchedulerConfig(listen=args.listen, token=token, workers=workers, devices=devices,
                             worker_memory_bytes=args.worker_memory, host_cache_bytes=args.host_cache,
                             worker_args=worker_args, heartbeat_timeout_s=args.heartbeat_timeout)

    async def main() -> None:
        scheduler = Scheduler(config)
        address = await scheduler.start()
        print(f"scheduler listening at {address} with {workers} local worker(s) on {', '.join(devices)}", flush=True)
        if args.http:
            from runtime.http import start_http

            await start_http(scheduler, args.http)
            print(f"metrics at http://{args.http}/metrics", flush=True)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()
        await scheduler.stop()

    _run(main())
    return 0


def _add_worker_parser(subparsers: argparse._SubParsersAction) -> None:
    from worker.cli import add_worker_arguments

    worker = subparsers.add_parser("worker", help="worker nodes: join a scheduler")
    actions = worker.add_subparsers(dest="worker_command", required=True, metavar="ACTION")
    join = actions.add_parser(
        "join", help="run a worker on this machine that joins the scheduler at HOST:PORT",
        description="Serve expert functions from this machine's device for the cluster at HOST:PORT. "
        "The worker proves the cluster token by HMAC challenge; the token never crosses the wire.",
    )
    join.add_argument("scheduler", metavar="HOST:PORT", help="the scheduler's address")
    add_worker_arguments(join)
    join.set_defaults(handler=_worker_join)


def _worker_join(args: argparse.Namespace) -> int:
    from worker.cli import run_worker

    return run_worker(args, args.scheduler)


def _default_state() -> Path:
    import os

    return Path(os.environ.get("FAASMOE_STATE", "faasmoe.db"))


def _quota(text: str) -> int:
    return 0 if text.strip() == "0" else parse_size(text)


def _add_tenant_parser(subparsers: argparse._SubParsersAction) -> None:
    state = argparse.ArgumentParser(add_help=False)
    state.add_argument("--state", type=Path, default=_default_state(), metavar="PATH",
                       help="SQLite file of tenants, keys and usage; default: $FAASMOE_STATE, else ./faasmoe.db")
    tenant = subparsers.add_parser("tenant", help="tenants and their API keys: add, list, remove, key")
    actions = tenant.add_subparsers(dest="tenant_command", required=True, metavar="ACTION")
    add = actions.add_parser("add", parents=[state], help="create a tenant and print its first API key (once)")
    add.add_argument("name", metavar="NAME", help="tenant name: 1-63 of a-z 0-9 _ -")
    add.add_argument("--models", default="*", help="comma-separated models it may use, or * for all; default: *")
    add.add_argument("--max-concurrent", type=int, default=0, metavar="N",
                     help="requests in flight at once; default: 0 (unlimited)")
    add.add_argument("--tokens-per-minute", type=int, default=0, metavar="N",
                     help="prompt + completion tokens per minute; default: 0 (unlimited)")
    add.add_argument("--memory-quota", type=_quota, default=0, metavar="SIZE",
                     help="resident memory of its private models (e.g. 2GiB); default: 0 (unlimited)")
    add.add_argument("--admin", action="store_true", help="may call the /admin endpoints")
    add.set_defaults(handler=_tenant_add)
    listing = actions.add_parser("list", parents=[state], help="print the tenants and their limits (never keys)")
    listing.set_defaults(handler=_tenant_list)
    remove = actions.add_parser("remove", parents=[state], help="delete a tenant and revoke its keys (usage stays)")
    remove.add_argument("name", metavar="NAME", help="the tenant to remove")
    remove.set_defaults(handler=_tenant_remove)
    key = actions.add_parser("key", parents=[state], help="issue another API key for a tenant and print it (once)")
    key.add_argument("name", metavar="NAME", help="the tenant")
    key.set_defaults(handler=_tenant_key)


def _existing_state(path: Path) -> Path:
    # Reading commands must not leave an empty database behind in whatever directory they ran in.
    if not path.exists():
        raise ValueError(f"no state database at {path} (create a tenant with `faasmoe tenant add`, "
                         "or pass --state / set $FAASMOE_STATE)")
    return path


def _print_key(name: str, key: str) -> None:
    print(f"API key for tenant {name}:\n\n    {key}\n\n"
          "Store it now: it is kept only as a hash and will not be shown again.")


def _tenant_add(args: argparse.Namespace) -> int:
    from faasmoe.tenants import TenantStore

    models = [m.strip() for m in args.models.split(",") if m.strip()]
    with TenantStore(args.state) as store:
        _, key = store.add_tenant(args.name, allowed_models=models, max_concurrent=args.max_concurrent,
                                  tokens_per_minute=args.tokens_per_minute,
                                  memory_quota_bytes=args.memory_quota, admin=args.admin)
    print(f"added tenant {args.name} to {args.state}")
    _print_key(args.name, key)
    return 0


def _tenant_list(args: argparse.Namespace) -> int:
    from datetime import datetime

    from faasmoe.tenants import TenantStore

    with TenantStore(_existing_state(args.state)) as store:
        rows = [[t.name, ",".join(t.allowed_models), t.max_concurrent or "-", t.tokens_per_minute or "-",
                 format_bytes(t.memory_quota_bytes) if t.memory_quota_bytes else "-", "yes" if t.admin else "",
                 store.key_count(t.name), datetime.fromtimestamp(t.created_at).strftime("%Y-%m-%d %H:%M")]
                for t in store.list_tenants()]
    if not rows:
        print(f"no tenants in {args.state}")
        return 0
    _print_table(["tenant", "models", "max concurrent", "tokens/min", "memory quota", "admin", "keys", "created"],
                 rows)
    return 0


def _tenant_remove(args: argparse.Namespace) -> int:
    from faasmoe.tenants import TenantStore

    with TenantStore(_existing_state(args.state)) as store:
        keys = store.remove_tenant(args.name)
    print(f"removed tenant {args.name} and revoked its {keys} key(s); its usage stays in the ledger")
    return 0


def _tenant_key(args: argparse.Namespace) -> int:
    from faasmoe.tenants import TenantStore

    with TenantStore(_existing_state(args.state)) as store:
        key = store.add_key(args.name)
    _print_key(args.name, key)
    return 0


def _add_usage_parser(subparsers: argparse._SubParsersAction) -> None:
    usage = subparsers.add_parser(
        "usage", help="print metered usage per tenant and model",
        description="Sum the usage ledger per tenant and model: requests, tokens, expert invocations, "
        "expert compute seconds, cold starts and resident memory (GiB-seconds).")
    usage.add_argument("--tenant", default=None, help="only this tenant; default: all")
    usage.add_argument("--since", default=None, metavar="WHEN",
                       help="only requests finished since WHEN: a duration ago (90s, 30m, 1h, 2d) or a local "
                       "date/time (2026-11-29, 2026-11-29T10:00); default: all time")
    usage.add_argument("--state", type=Path, default=_default_state(), metavar="PATH",
                       help="SQLite file of tenants, keys and usage; default: $FAASMOE_STATE, else ./faasmoe.db")
    usage.add_argument("--json", action="store_true", help="print the rows as JSON instead of a table")
    usage.set_defaults(handler=_usage)


def _usage(args: argparse.Namespace) -> int:
    import json

    from runtime.ledger import UsageLedger, parse_since

    since = parse_since(args.since) if args.since else None
    with UsageLedger(_existing_state(args.state)) as ledger:
        rows = ledger.summary(tenant=args.tenant, since=since)
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    if not rows:
        print("no usage recorded" + (f" for tenant {args.tenant}" if args.tenant else "")
              + (f" since {args.since}" if args.since else ""))
        return 0
    _print_table(
        ["tenant", "model", "requests", "errors", "prompt tok", "completion tok", "invocations", "compute s",
         "cold starts", "GiB-s"],
        [[r["tenant"], r["model"], r["requests"], r["errors"], r["prompt_tokens"], r["completion_tokens"],
          r["expert_invocations"], f"{r['expert_compute_s']:.3f}", r["cold_starts"],
          f"{r['resident_byte_seconds'] / 2**30:.3f}"] for r in rows])
    return 0


def _print_table(headers: list[str], rows: list[list]) -> None:
    cells = [headers] + [[str(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    for row in cells:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip())


def _run(coroutine) -> None:
    import uvloop

    uvloop.run(coroutine)


def _add_serve_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model_dirs", metavar="MODEL_DIR", nargs="*", type=Path,
                        help="Hugging Face checkpoint directories to serve as shared models (named by directory)")
    parser.add_argument("--config", type=Path, default=None, help="TOML file declaring models, tenants and server")
    parser.add_argument("--host", default=None, help="HTTP host; default: 127.0.0.1")
    parser.add_argument("--port", type=int, default=None, help="HTTP port; default: 8000 (0 = any free port)")
    parser.add_argument("--api-key", default=None,
                        help="single-tenant quick start: the one accepted key (also the admin key unless "
                        "--admin-key); with no key and no tenants the server listens on loopback only")
    parser.add_argument("--admin-key", default=None, help="key for /admin/cluster")
    parser.add_argument("--keep-alive", type=float, default=None, metavar="SECONDS",
                        help="expert functions scale to zero after this long idle; default: 60")
    parser.add_argument("--expert-block-size", type=int, default=None, metavar="K",
                        help="experts per expert function; default: all experts of a layer in one function")
    parser.add_argument("--trunk-keep-alive", type=float, default=None, metavar="SECONDS",
                        help="unload an idle model's trunk after this long (0 = never, the default)")
    parser.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default=None,
                        help="compute dtype of trunk and experts; default: float32")
    parser.add_argument("--state", type=Path, default=None,
                        help="SQLite file for tenants and the usage ledger; default: $FAASMOE_STATE or ./faasmoe.db")
    parser.add_argument("--token", default=None, help="cluster token; default: $FAASMOE_TOKEN or a random one")


def _add_serve_parser(subparsers: argparse._SubParsersAction) -> None:
    serve = subparsers.add_parser(
        "serve", help="all in one: scheduler, local worker pool and the OpenAI-compatible frontend",
        description="Serve MoE models with per-expert scale to zero: a scheduler and a local worker pool in "
        "this process tree, and an OpenAI-compatible HTTP API. Ctrl-C drains in-flight requests and exits.",
    )
    _add_serve_arguments(serve)
    serve.add_argument("--workers", type=int, default=None,
                       help="local worker processes; default: one per GPU, else 1")
    serve.add_argument("--device", default=None, help="cpu or cuda; default: cuda when available")
    serve.add_argument("--worker-memory", type=parse_size, default=None, metavar="SIZE",
                       help="expert memory budget per worker; default: 90%% of the device's free memory")
    serve.add_argument("--eviction", choices=("lru", "freq"), default="lru",
                       help="workers' eviction policy under the memory budget; default: lru")
    serve.add_argument("--experts", choices=("remote", "in-process"), default="remote",
                       help="remote: expert functions on the worker pool (FaaSMoE); in-process: every expert "
                       "resident in this process, no workers (the full-model baseline). Default: remote")
    serve.set_defaults(handler=_serve)

    frontend = subparsers.add_parser(
        "frontend", help="the OpenAI-compatible frontend alone, for a scheduler running elsewhere",
        description="Serve models through an existing scheduler's workers (split deployment).",
    )
    _add_serve_arguments(frontend)
    frontend.add_argument("--scheduler", required=True, metavar="HOST:PORT", help="the scheduler's address")
    frontend.set_defaults(handler=_serve)


def _serve(args: argparse.Namespace) -> int:
    from faasmoe.serve import ServeOptions, serve

    opts = ServeOptions(
        model_dirs=args.model_dirs, config=args.config, host=args.host, port=args.port,
        workers=getattr(args, "workers", None), device=getattr(args, "device", None), api_key=args.api_key,
        admin_key=args.admin_key, keep_alive=args.keep_alive, expert_block_size=args.expert_block_size,
        trunk_keep_alive=args.trunk_keep_alive, dtype=args.dtype, state=args.state,
        worker_memory=getattr(args, "worker_memory", None), scheduler=getattr(args, "scheduler", None),
        token=args.token, eviction=getattr(args, "eviction", "lru"), experts=getattr(args, "experts", "remote"),
    )
    import uvloop

    return uvloop.run(serve(opts))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="faasmoe", description="Serverless Mixture-of-Experts serving.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_model_parser(subparsers)
    _add_generate_parser(subparsers)
    _add_scheduler_parser(subparsers)
    _add_worker_parser(subparsers)
    _add_tenant_parser(subparsers)
    _add_usage_parser(subparsers)
    _add_serve_parser(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        return args.handler(args)
    except (ValueError, FileNotFoundError, OSError) as exc:
        print(f"faasmoe: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
