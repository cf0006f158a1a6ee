"""The three deployments the payoff benchmark compares, as real `faasmoe` processes on loopback.

    always-on    one `faasmoe serve --experts in-process` per model (the base for its shared tenants, each
                 private fine-tune for its tenant): every model resident for the whole trace, as one
                 vLLM instance per model would be
    whole-model  the same, with `--whole-model-keep-alive K`: a model idle for K seconds unloads its trunk
                 and experts together and the next request reloads it whole (scale to zero per model, the
                 Knative / Ray Serve `min_replicas=0` way), its process kept warm: the fastest reload we
                 can give it, from the page cache
    faasmoe      one `faasmoe scheduler` pool and one `faasmoe frontend` serving every model: the base
                 shared, the fine-tunes private to their tenants; expert functions named by content (a
                 fine-tune's untouched experts and its trunk are the base's), keep-alive K for experts and
                 trunks alike

Every process computes in the checkpoint's dtype with the same batching; the host cache is off (on a CPU
it is the same RAM as the device tier).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

from bench.paperlib.setups import TOKEN, Endpoint, RunningSetup, SetupOptions, _config, _start_pool, _wait_serving, tenant_key
from bench.payofflib.tenants import Deployment
from faasmoe.serve.config import MICRO_BATCH_MIN_TOKENS, REMOTE_MICRO_BATCHES
from tests.processes import faasmoe, free_port

SETUPS = ("always-on", "whole-model", "faasmoe")


@dataclass(frozen=True)
class SetupRun:
    """One setup at one keep-alive (inf for always-on)."""

    setup: str
    keep_alive_s: float
    micro_batches: int = REMOTE_MICRO_BATCHES  # faasmoe: the frontend's --micro-batches
    micro_batch_min_tokens: int = MICRO_BATCH_MIN_TOKENS  # and its --micro-batch-min-tokens

    @property
    def label(self) -> str:
        label = self.setup if self.setup == "always-on" else f"{self.setup} K={self.keep_alive_s:g}s"
        if (self.micro_batches, self.micro_batch_min_tokens) != (REMOTE_MICRO_BATCHES, MICRO_BATCH_MIN_TOKENS):
            label += f" M={self.micro_batches}" + (f">={self.micro_batch_min_tokens}" if self.micro_batch_min_tokens else "")
        return label


def options(deployment: Deployment, keep_alive_s: float, threads: int) -> SetupOptions:
    return SetupOptions(model_dir=deployment.models["base"], dtype="float32", block_size=1,
                        keep_alive_s=keep_alive_s, trunk_keep_alive_s=keep_alive_s, threads=threads)


def _model_entry(deployment: Deployment, name: str, keep_alive_s: float) -> dict:
    entry = {"name": name, "path": deployment.models[name], "keep_alive": keep_alive_s}
    if name in deployment.owners:
        entry["owner"] = deployment.owners[name]
    return entry


def start(run: SetupRun, deployment: Deployment, workdir: Path, cores: int) -> RunningSetup:
    """Start every process of `run` and wait until all of them serve."""
    if run.setup not in SETUPS:
        raise ValueError(f"unknown setup {run.setup!r}; choose from {', '.join(SETUPS)}")
    root = workdir / run.label.replace(" ", "_")
    tenants = [t.name for t in deployment.tenants]
    if run.setup == "faasmoe":
        # The frontend's trunk and the worker's experts compute at once (one model's step while another's
        # hop): half the cores each. Measured on 2 cores: ITL p50 42 ms with 1 thread each, 57 ms with 2.
        opts = options(deployment, run.keep_alive_s, threads=max(1, cores // 2))
        setup = RunningSetup(run.label, opts, remote=True)
        address, pool_http = _start_pool(setup, opts)
        port = free_port()
        models = [_model_entry(deployment, name, run.keep_alive_s) for name in deployment.models]
        cfg = _config(root / "frontend.toml", port, root / "frontend.db", opts, models, tenants)
        setup.processes["frontend"] = faasmoe("frontend", "--config", str(cfg), "--scheduler", address,
                                              "--token", TOKEN, "--micro-batches", str(run.micro_batches),
                                              "--micro-batch-min-tokens", str(run.micro_batch_min_tokens),
                                              env=opts.env)
        setup.frontends["frontend"] = f"http://127.0.0.1:{port}"
        for t in deployment.tenants:
            setup.endpoints[t.name] = Endpoint(t.name, setup.frontends["frontend"], tenant_key(t.name), t.model)
        _wait_serving(setup, ["frontend"], pool_http, opts.workers)
        return setup
    # One process per model; its processes share the cores (each computes in turn with the others).
    opts = replace(options(deployment, run.keep_alive_s, threads=max(1, cores // len(deployment.models))),
                   trunk_keep_alive_s=0.0)  # the whole-model keep-alive unloads the trunk with the experts
    setup = RunningSetup(run.label, opts, remote=False)
    whole = ["--whole-model-keep-alive", repr(float(run.keep_alive_s))] if run.setup == "whole-model" else []
    for name in deployment.models:
        port = free_port()
        users = [t.name for t in deployment.tenants if t.model == name]
        entry = _model_entry(deployment, name, float("inf"))  # in process, experts go with the whole model
        cfg = _config(root / f"{name}.toml", port, root / f"{name}.db", opts, [entry], users)
        setup.processes[name] = faasmoe("serve", "--config", str(cfg), "--experts", "in-process", *whole,
                                        env=opts.env)
        setup.frontends[name] = f"http://127.0.0.1:{port}"
        for t in users:
            setup.endpoints[t] = Endpoint(t, setup.frontends[name], tenant_key(t), name)
    _wait_serving(setup, list(deployment.models))
    return setup
