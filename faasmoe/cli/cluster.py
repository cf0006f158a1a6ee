"""`faasmoe scheduler`, `faasmoe worker join`, `faasmoe serve` and `faasmoe frontend`."""

from __future__ import annotations

import argparse
from pathlib import Path

from faasmoe.api.tool_parsers import PARSERS
from faasmoe.cli.credentials import add_secret_arguments, resolve_secret
from faasmoe.serve.config import MICRO_BATCH_MIN_TOKENS, REMOTE_MICRO_BATCHES
from faasmoe.tenancy.database import STATE_HELP
from runtime.sizes import parse_size, parse_size_or_zero


def add_scheduler_parser(subparsers: argparse._SubParsersAction) -> None:
    from worker.cli import add_server_limit_arguments

    sched = subparsers.add_parser(
        "scheduler",
        help="run the scheduler daemon (registry, placement, keep-alive) with an optional local worker pool",
        description="The FaaSMoE control plane: workers join it with the cluster token, frontends subscribe "
        "to its routing table. It is never on the per-token path.",
    )
    sched.add_argument("--listen", default="127.0.0.1:7070", metavar="HOST:PORT",
                       help="where workers and frontends reach it (HOST:PORT or unix:/path); default: 127.0.0.1:7070")
    add_secret_arguments(sched, "token", "FAASMOE_TOKEN", "cluster token",
                         " (default: $FAASMOE_TOKEN, else a random one that is printed)")
    sched.add_argument("--workers", type=int, default=None,
                       help="local worker processes to spawn and supervise; default: one per GPU, else 1")
    sched.add_argument("--device", default=None,
                       help="devices of the local pool: cpu, cuda (all GPUs) or a list like cuda:0,cuda:1; "
                       "default: cuda when available, else cpu")
    sched.add_argument("--worker-memory", type=parse_size, default=None, metavar="SIZE",
                       help="expert memory budget of each local worker; default: 90%% of the device's free memory")
    sched.add_argument("--host-cache", type=parse_size_or_zero, default=None, metavar="SIZE",
                       help="host RAM cache of evicted blocks per local worker (pinned on CUDA); default: 25%% "
                       "of available RAM shared by the GPU workers, 0 (off) on CPU, where it would be the same RAM")
    sched.add_argument("--host-ttl", type=float, default=None, metavar="SECONDS",
                       help="local workers drop a block from the host cache after this long unused; default: 600")
    sched.add_argument("--eviction", choices=("lru", "freq"), default="lru", help="local workers' eviction policy")
    sched.add_argument("--keep-alive-policy", choices=("fixed", "adaptive"), default="fixed",
                       help="local workers' keep-alive policy")
    sched.add_argument("--heartbeat-timeout", type=float, default=3.0, metavar="SECONDS",
                       help="declare a worker dead after this long without a heartbeat; default: 3")
    sched.add_argument("--http", default=None, metavar="HOST:PORT",
                       help="serve Prometheus /metrics (scheduler and every worker) and /cluster JSON here")
    add_server_limit_arguments(sched)
    sched.set_defaults(handler=_scheduler)



def _scheduler(args: argparse.Namespace) -> int:
    import asyncio
    import secrets
    import signal

    from faasmoe.serve.devices import resolve_devices
    from runtime.scheduler import Scheduler, SchedulerConfig
    from runtime.transport import configure_server_limits
    from worker.cli import server_limits_from

    configure_server_limits(server_limits_from(args))

    token = resolve_secret(args, "token", "FAASMOE_TOKEN")
    if not token:
        token = secrets.token_urlsafe(24)
        print(f"cluster token (pass it to `faasmoe worker join`): {token}", flush=True)
    devices = resolve_devices(args.device)
    workers = args.workers if args.workers is not None else (len(devices) if devices[0].startswith("cuda") else 1)
    worker_args = ["--eviction", args.eviction, "--keep-alive-policy", args.keep_alive_policy]
    if args.host_ttl is not None:
        worker_args += ["--host-ttl", str(args.host_ttl)]
    config = SchedulerConfig(listen=args.listen, token=token, workers=workers, devices=devices,
                             worker_memory_bytes=args.worker_memory, host_cache_bytes=args.host_cache,
                             worker_args=worker_args, heartbeat_timeout_s=args.heartbeat_timeout)

    async def main() -> None:
        from runtime.metrics import ProcessMetrics

        scheduler = Scheduler(config)
        scheduler.metrics.register(ProcessMetrics("scheduler"))  # this process is the scheduler alone
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


def add_worker_parser(subparsers: argparse._SubParsersAction) -> None:
    from worker.cli import add_worker_arguments

    worker = subparsers.add_parser("worker", help="worker nodes: join a scheduler")
    actions = worker.add_subparsers(dest="worker_command", required=True, metavar="ACTION")
    join = actions.add_parser(
        "join", help="run a worker on this machine that joins the scheduler at HOST:PORT",
        description="Serve expert functions from this machine's device for the cluster at HOST:PORT. "
        "The worker proves the cluster token by HMAC challenge; the token never crosses the wire.",
    )
    join.add_argument("scheduler", metavar="HOST:PORT", help="the scheduler's address")
    add_worker_arguments(join)  # its --token
    join.add_argument("--token-file", type=Path, default=None, metavar="PATH",
                      help="read the cluster token from PATH (its first line) instead of --token / $FAASMOE_TOKEN")
    join.set_defaults(handler=_worker_join)


def _worker_join(args: argparse.Namespace) -> int:
    from worker.cli import run_worker

    args.token = resolve_secret(args, "token", "FAASMOE_TOKEN")
    return run_worker(args, args.scheduler)


def _run(coroutine) -> None:
    import uvloop

    uvloop.run(coroutine)


def _add_serve_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model_dirs", metavar="MODEL_DIR", nargs="*", type=Path,
                        help="Hugging Face checkpoint directories to serve as shared models (named by directory)")
    parser.add_argument("--served-model-name", dest="served_model_names", action="extend", nargs="+", default=None,
                        metavar="NAME", help="the name(s) clients use, as vLLM's (repeatable; may hold '/', e.g. "
                        "Qwen/Qwen1.5-MoE-A2.7B-Chat): with one MODEL_DIR the first is its name and the rest aliases, "
                        "with several one name per MODEL_DIR in order; default: the directory's name (a Hugging Face "
                        "cache snapshot .../models--Org--Name/snapshots/HASH is Org/Name)")
    parser.add_argument("--config", type=Path, default=None, help="TOML file declaring models, tenants and server")
    parser.add_argument("--host", default=None, help="HTTP host; default: 127.0.0.1")
    parser.add_argument("--port", type=int, default=None, help="HTTP port; default: 8000 (0 = any free port)")
    add_secret_arguments(parser, "api-key", "FAASMOE_API_KEY",
                         "single-tenant quick start: the one accepted key (also the admin key unless "
                         "--admin-key); with no key and no tenants the server listens on loopback only")
    add_secret_arguments(parser, "admin-key", "FAASMOE_ADMIN_KEY", "key for /admin/cluster and the full /metrics")
    parser.add_argument("--keep-alive", type=float, default=None, metavar="SECONDS",
                        help="expert functions scale to zero after this long idle; default: 60")
    parser.add_argument("--expert-block-size", type=int, default=None, metavar="K",
                        help="experts per expert function; default: all experts of a layer in one function")
    parser.add_argument("--trunk-keep-alive", type=float, default=None, metavar="SECONDS",
                        help="unload an idle model's trunk after this long (0 = never, the default)")
    parser.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default=None,
                        help="compute dtype of trunk and experts; default: float32")
    parser.add_argument("--kv-cache-memory", type=parse_size, default=None, metavar="SIZE",
                        help="KV cache budget of each served model (requests that do not fit wait, one that never "
                        "fits is refused); default: 10%% of available RAM up to 4GiB on CPU, 10%% of free GPU memory")
    parser.add_argument("--invoke-timeout", type=float, default=2.0, metavar="SECONDS",
                        help="an expert call may take max(this, --invoke-timeout-factor x the worker's measured "
                        "compute) before it is retried on another worker; default: 2")
    parser.add_argument("--invoke-timeout-factor", type=float, default=20.0, metavar="F",
                        help="see --invoke-timeout; default: 20")
    parser.add_argument("--micro-batches", type=int, default=None, metavar="M",
                        help="split a step into M groups whose trunk and expert work overlap; each group calls the "
                        f"experts on its own; default: {REMOTE_MICRO_BATCHES} with remote experts, 1 in process")
    parser.add_argument("--micro-batch-min-tokens", type=int, default=MICRO_BATCH_MIN_TOKENS, metavar="N",
                        help="split a step into --micro-batches groups only when it has at least N tokens (a "
                        "decode step of a few sequences has too little work to hide a second hop); "
                        f"default: {MICRO_BATCH_MIN_TOKENS}")
    parser.add_argument("--state", type=Path, default=None,
                        help=f"SQLite file for tenants and the usage ledger; {STATE_HELP}")
    add_secret_arguments(parser, "token", "FAASMOE_TOKEN", "cluster token", "; default: $FAASMOE_TOKEN or a random one")
    parser.add_argument("--allowed-origins", type=_origins, action="extend", default=[], metavar="ORIGINS",
                        help="CORS: origins browsers may call the API from, comma-separated or a JSON list "
                        "(vLLM's '[\"*\"]'); '*' = any; default: none (CORS off)")
    parser.add_argument("--access-log", action="store_true", help="log one line per HTTP request on stdout")
    parser.add_argument("--enable-auto-tool-choice", dest="auto_tool_choice", action=argparse.BooleanOptionalAction,
                        default=True, help="let tool_choice 'auto' (the default with tools) have the model decide to "
                        "call a tool, as vLLM's flag; on by default, --no-enable-auto-tool-choice refuses it with a 400")
    parser.add_argument("--tool-call-parser", choices=PARSERS, default=None,
                        help="how generated text names tool calls: hermes (<tool_call> tags: Qwen, OLMoE) or mistral "
                        "([TOOL_CALLS]); default: by each model's family")


def _origins(value: str) -> list[str]:
    import json

    text = value.strip()
    if text.startswith("["):
        try:
            origins = json.loads(text)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(f"not a JSON list: {exc}") from None
        if not isinstance(origins, list) or not all(isinstance(o, str) for o in origins):
            raise argparse.ArgumentTypeError("must be a JSON list of strings")
        return [o.strip() for o in origins if o.strip()]
    return [o.strip() for o in text.split(",") if o.strip()]


def add_serve_parser(subparsers: argparse._SubParsersAction) -> None:
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
    serve.add_argument("--host-cache", type=parse_size_or_zero, default=None, metavar="SIZE",
                       help="host RAM cache of evicted blocks per worker (pinned on CUDA); it counts as resident: "
                       "experts scale to zero when it is empty too. Default: 25%% of available RAM shared by the GPU "
                       "workers, 0 (off) on CPU, where it would be the same RAM")
    serve.add_argument("--host-ttl", type=float, default=None, metavar="SECONDS",
                       help="workers drop a block from the host cache after this long unused; default: 600")
    serve.add_argument("--eviction", choices=("lru", "freq"), default="lru",
                       help="workers' eviction policy under the memory budget; default: lru")
    serve.add_argument("--experts", choices=("remote", "in-process"), default="remote",
                       help="remote: expert functions on the worker pool (FaaSMoE); in-process: every expert "
                       "resident in this process, no workers (the full-model baseline). Default: remote")
    serve.add_argument("--whole-model-keep-alive", type=float, default=0.0, metavar="SECONDS",
                       help="with --experts in-process: unload an idle model's trunk and every expert after this "
                       "long, reload both on its next request (one cold start, as Knative or Ray Serve scale a "
                       "replica to zero); 0 = never, the default")
    serve.set_defaults(handler=_serve)

    frontend = subparsers.add_parser(
        "frontend", help="the OpenAI-compatible frontend alone, for a scheduler running elsewhere",
        description="Serve models through an existing scheduler's workers (split deployment).",
    )
    _add_serve_arguments(frontend)
    frontend.add_argument("--scheduler", required=True, metavar="HOST:PORT", help="the scheduler's address")
    frontend.add_argument("--scheduler-timeout", type=float, default=30.0, metavar="SECONDS",
                          help="keep dialing the scheduler (with backoff) this long, then exit with an error; default: 30")
    frontend.set_defaults(handler=_serve)


def _serve(args: argparse.Namespace) -> int:
    from faasmoe.serve.process import ServeOptions, serve

    opts = ServeOptions(
        model_dirs=args.model_dirs, served_model_names=args.served_model_names,
        allowed_origins=args.allowed_origins, access_log=args.access_log, config=args.config, host=args.host, port=args.port,
        workers=getattr(args, "workers", None), device=getattr(args, "device", None),
        api_key=resolve_secret(args, "api-key", "FAASMOE_API_KEY"),
        admin_key=resolve_secret(args, "admin-key", "FAASMOE_ADMIN_KEY"), keep_alive=args.keep_alive,
        expert_block_size=args.expert_block_size, trunk_keep_alive=args.trunk_keep_alive, dtype=args.dtype,
        state=args.state, worker_memory=getattr(args, "worker_memory", None),
        host_cache=getattr(args, "host_cache", None), host_ttl=getattr(args, "host_ttl", None),
        scheduler=getattr(args, "scheduler", None), token=resolve_secret(args, "token", "FAASMOE_TOKEN"),
        eviction=getattr(args, "eviction", "lru"), experts=getattr(args, "experts", "remote"),
        whole_model_keep_alive=getattr(args, "whole_model_keep_alive", 0.0),
        scheduler_timeout=getattr(args, "scheduler_timeout", 30.0), kv_cache_memory=args.kv_cache_memory,
        invoke_timeout=args.invoke_timeout, invoke_timeout_factor=args.invoke_timeout_factor,
        micro_batches=args.micro_batches, micro_batch_min_tokens=args.micro_batch_min_tokens,
        tool_call_parser=args.tool_call_parser,
        auto_tool_choice=args.auto_tool_choice,
    )
    import uvloop

    return uvloop.run(serve(opts))
