"""Command line of a worker process: the local pool's `python -m worker` and `faasmoe worker join`."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import socket
import uuid
from typing import TYPE_CHECKING

from runtime.openmp import OMP_WAIT_POLICY
from runtime.sizes import parse_size, parse_size_or_zero

if TYPE_CHECKING:
    from runtime.transport import ServerLimits


def add_worker_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--token", default=None,
                        help="cluster token (default: $FAASMOE_TOKEN); proven by HMAC, never sent")
    parser.add_argument("--device", default=None,
                        help="cuda:N or cpu; default: cuda:0 when CUDA is available, else cpu")
    parser.add_argument("--memory", type=parse_size, default=None, metavar="SIZE",
                        help="expert memory budget on the device, e.g. 40GiB; default: 90%% of what is free now")
    parser.add_argument("--host-cache", type=parse_size_or_zero, default=None, metavar="SIZE",
                        help="host RAM cache of evicted blocks (pinned on CUDA), e.g. 64GiB; default: 25%% of "
                        "available RAM on CUDA, 0 (off) on CPU, where it would be the same RAM")
    parser.add_argument("--host-ttl", type=float, default=600.0, metavar="SECONDS",
                        help="drop a block from the host cache after this long unused; default: 600")
    parser.add_argument("--listen", default=None,
                        help="address to serve on and advertise: HOST:PORT (port 0 = any) or unix:/path; default: "
                        "127.0.0.1:0, loopback only: frontends on other machines need this node's address (0.0.0.0 "
                        "binds every interface but is advertised as 0.0.0.0, dialable only from this node)")
    parser.add_argument("--model-root", dest="model_roots", action="append", default=[], metavar="DIR",
                        help="load checkpoints only from under DIR (repeatable; symlinks and .. are resolved "
                        "first); default: any path a peer names")
    add_server_limit_arguments(parser)
    parser.add_argument("--id", dest="worker_id", default=None, help="worker id; default: HOST-RANDOM")
    parser.add_argument("--join-timeout", type=float, default=60.0, metavar="SECONDS",
                        help="exit (code 2) when not registered with the scheduler this long after start; "
                        "a scheduler lost later is redialled forever; default: 60")
    parser.add_argument("--eviction", choices=("lru", "freq"), default="lru",
                        help="eviction under the memory budget: lru, or freq (per-layer frequency-weighted)")
    parser.add_argument("--keep-alive-policy", choices=("fixed", "adaptive"), default="fixed",
                        help="fixed: each function's keep-alive; adaptive: idle-time histogram per function")


def add_server_limit_arguments(parser: argparse.ArgumentParser) -> None:
    """--max-connections and --handshake-timeout, for every process that listens (workers, the scheduler)."""
    # Defaults live in runtime.transport.ServerLimits (not imported here: it would pull in torch).
    parser.add_argument("--max-connections", type=int, default=None, metavar="N",
                        help="connections served at once; more are closed at once; default: 256")
    parser.add_argument("--handshake-timeout", type=float, default=None, metavar="SECONDS",
                        help="drop a peer that has not proven the token within this long; default: 10")


def server_limits_from(args: argparse.Namespace) -> ServerLimits:
    """The --max-connections / --handshake-timeout flags as a ServerLimits (unset ones keep its defaults)."""
    from runtime.transport import ServerLimits

    given = {"max_connections": args.max_connections, "handshake_timeout_s": args.handshake_timeout}
    return ServerLimits(**{name: value for name, value in given.items() if value is not None})


def run_worker(args: argparse.Namespace, scheduler: str | None) -> int:
    os.environ.setdefault("OMP_WAIT_POLICY", OMP_WAIT_POLICY)  # before torch loads libgomp; an explicit one wins
    import torch  # here, not at import: `faasmoe --help` and friends should not wait for torch
    import uvloop

    from runtime.budgets import device_budget, host_cache_budget
    from runtime.transport import configure_server_limits
    from worker.worker import Worker, WorkerConfig

    token = args.token or os.environ.get("FAASMOE_TOKEN")
    if not token:
        raise ValueError("a worker needs the cluster token: --token T or $FAASMOE_TOKEN")
    device = torch.device(args.device or ("cuda:0" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {args.device}: CUDA is not available here")
    configure_server_limits(server_limits_from(args))
    config = WorkerConfig(
        worker_id=args.worker_id or f"{socket.gethostname()}-{uuid.uuid4().hex[:6]}",
        listen=args.listen or "127.0.0.1:0",  # serving the network is a choice, not a default
        device=str(device),
        budget_bytes=args.memory or device_budget(device),
        host_budget_bytes=args.host_cache if args.host_cache is not None else host_cache_budget(device),
        token=token,
        scheduler=scheduler,
        eviction=args.eviction,
        keep_alive_policy=args.keep_alive_policy,
        host_ttl_s=args.host_ttl,
        node=socket.gethostname(),
        parent_pid=getattr(args, "parent_pid", None),
        model_roots=tuple(args.model_roots),
        join_timeout_s=args.join_timeout,
    )
    worker = Worker(config)

    async def main() -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, worker.stop)
        running = asyncio.create_task(worker.run())
        listening = asyncio.create_task(worker.listening.wait())
        await asyncio.wait([running, listening], return_when=asyncio.FIRST_COMPLETED)
        if worker.listening.is_set():
            print(f"worker {config.worker_id} listening at {worker.info.address}", flush=True)
        listening.cancel()
        await running

    uvloop.run(main())
    return worker.exit_code


def main(argv: list[str] | None = None) -> int:
    """`python -m worker`: how the scheduler's local pool starts a worker."""
    parser = argparse.ArgumentParser(prog="python -m worker", description="A FaaSMoE worker process.")
    parser.add_argument("--scheduler", default=None, help="scheduler address to register with")
    parser.add_argument("--parent-pid", type=int, default=None,
                        help="exit when this process (the scheduler that spawned us) is gone")
    parser.add_argument("-v", "--verbose", action="store_true")
    add_worker_arguments(parser)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    return run_worker(args, args.scheduler)
