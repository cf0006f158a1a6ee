"""The models a frontend serves: who may see each one, its trunk, its experts and its engine.

A shared deployment has one set of expert functions and one engine for every allowed tenant,
so their sequences batch together. A private deployment's functions carry its owner's name
and nobody else can see the model at all (404, not 403). A trunk can be unloaded after its
own keep-alive and is reloaded by the next request (a model with no traffic costs nothing).
With in-process experts, a whole-model keep-alive unloads the trunk and every expert together and
the next request reloads both, as Knative or Ray Serve (min_replicas=0) scale a model replica to
zero: one cold start, metered like a worker's.

Models served by remote experts whose trunks are the same tensors (a base and its ESFT fine-tunes,
shared or private) step in one engine (faasmoe.engine.cobatch), unless a model opts out of sharing
with `dedupe = false`: one trunk pass per step for all of them, one call per shared block.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from faasmoe.engine.cobatch import CoBatchedExecutor, trunk_identity
from faasmoe.engine.executors import AsyncExpertExecutor, RemoteExpertExecutor
from faasmoe.engine.model_engine import ModelEngine
from faasmoe.model.checkpoint import CheckpointReader
from faasmoe.model.config import MoEConfig, parse_dtype
from faasmoe.model.content import CheckpointDigests, DigestCache
from faasmoe.model.host_memory import return_free_memory
from faasmoe.model.kv_cache import KVCache
from faasmoe.model.shared_tensors import SharedTensors
from faasmoe.model.tokenizer import Tokenizer
from faasmoe.model.trunk import Trunk
from runtime.compute import ComputeThread

log = logging.getLogger(__name__)


@dataclass
class DeploymentSpec:
    """How one model is served (from the TOML config or `faasmoe serve` flags)."""

    name: str
    path: Path
    sharing: str = "shared"  # "shared" | "private"
    owner: str = ""  # the tenant of a private model
    expert_block_size: int | None = None  # None: the whole layer is one function
    keep_alive_s: float = 60.0  # expert functions
    trunk_keep_alive_s: float = 0.0  # 0: the trunk stays loaded
    whole_model_keep_alive_s: float = 0.0  # in-process experts: trunk and experts unload together; 0: never
    dtype: str = "float32"
    device: str = "cpu"
    kv_cache_bytes: int | None = None  # the engine's KV cache budget; None: unbounded
    micro_batches: int = 1  # groups of a step that overlap trunk and expert work (remote experts: 2)
    micro_batch_min_tokens: int = 0  # ... in steps with at least this many tokens (fewer: one group)
    aliases: tuple[str, ...] = ()  # more names clients may call it by (vLLM's extra --served-model-name)
    dedupe: bool = True  # share expert functions and trunk tensors with other models holding the same bytes


class Deployment:
    """One served model: config, tokenizer, lazily loaded trunk, expert executor and engine."""

    def __init__(self, spec: DeploymentSpec, executor_factory, compute: ComputeThread,
                 digests: DigestCache | None = None, shared: SharedTensors | None = None) -> None:
        """`digests`: where the checkpoint's content digests are cached (each file is hashed once); `shared`:
        the process's trunk tensors by content, which this model's trunk shares unless `spec.dedupe` is off."""
        self.spec = spec
        self.config = MoEConfig.from_pretrained(spec.path)
        self.tokenizer = Tokenizer.from_pretrained(spec.path)
        reader = CheckpointReader(spec.path)
        try:
            self.digests = CheckpointDigests.of(reader, digests)  # names its functions; proves its trunk's loads
        finally:
            reader.close()
        self._shared = shared if shared is not None and spec.dedupe else SharedTensors()
        self.dtype = parse_dtype(spec.dtype)
        self.device = torch.device(spec.device)
        self.block_size = spec.expert_block_size or self.config.num_experts
        self.created = int(time.time())
        self._trunk: Trunk | None = None
        self.trunk_loads = 0
        self.model_reloads = 0  # whole-model cold starts
        self.model_reload_s = 0.0  # their seconds (trunk and experts), together
        self.executor: AsyncExpertExecutor = executor_factory(self)
        cfg = self.config
        self.engine = ModelEngine(
            spec.name, self.trunk, self.executor, self.tokenizer, compute, kv_budget_bytes=spec.kv_cache_bytes,
            micro_batches=spec.micro_batches, micro_batch_min_tokens=spec.micro_batch_min_tokens,
            kv_bytes_per_token=KVCache.bytes_per_token(cfg.num_layers, cfg.num_kv_heads, cfg.head_dim, self.dtype))

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def max_context(self) -> int:
        return self.config.max_position_embeddings

    def visible_to(self, tenant: str, allowed: list[str]) -> bool:
        if self.spec.sharing == "private" and tenant != self.spec.owner:
            return False
        return "*" in allowed or self.name in allowed or any(a in allowed for a in self.spec.aliases)

    def trunk(self) -> Trunk:
        if self._trunk is None:
            start = time.perf_counter()
            reader = CheckpointReader(self.spec.path)
            try:
                self._trunk = Trunk(self.config, reader, self.dtype, self.device, self.digests, self._shared)
            finally:
                reader.close()
            self.trunk_loads += 1
            experts_s = self.executor.reload()
            took = time.perf_counter() - start
            if experts_s:
                self.model_reloads += 1
                self.model_reload_s += took
                self.engine.last_active = time.monotonic()  # the load was activity: no unload right after it
                log.info("reloaded the whole model %s in %.2fs (experts %.2fs)", self.name, took, experts_s)
            else:
                log.info("loaded trunk of %s in %.2fs (%d bytes)", self.name, took, self._trunk.nbytes)
        return self._trunk

    def cobatch_key(self) -> tuple | None:
        """Models with equal keys can step as one batch; None: this one steps alone."""
        spec = self.spec
        if not spec.dedupe or not isinstance(self.executor, RemoteExpertExecutor):
            return None
        return (self.dtype, self.device, self.block_size, spec.micro_batches, spec.micro_batch_min_tokens,
                trunk_identity(spec.path, self.config, self.digests))

    def resident_expert_bytes(self) -> int:
        """Expert bytes this model holds now (on workers, as the routing table tells; or in process)."""
        return self.executor.resident_bytes()

    @property
    def trunk_bytes(self) -> int:
        return self._trunk.nbytes if self._trunk is not None else 0

    @property
    def loaded_trunk(self) -> Trunk | None:
        """The trunk if it is loaded now (None: scaled to zero, or not asked for yet)."""
        return self._trunk

    def maybe_unload_trunk(self, now: float) -> bool:
        ttl = self.spec.trunk_keep_alive_s
        if ttl <= 0 or self._trunk is None or self.engine.busy or now - self.engine.last_active < ttl:
            return False
        self._trunk = None
        log.info("unloaded the idle trunk of %s", self.name)
        return True

    def maybe_unload_model(self, now: float) -> bool:
        """Whole-model scale to zero: drop the trunk and every in-process expert after their keep-alive idle."""
        ttl = self.spec.whole_model_keep_alive_s
        if ttl <= 0 or self.engine.busy or now - self.engine.last_active < ttl or not self.executor.unload():
            return False
        self._trunk = None
        return_free_memory()  # glibc keeps freed weights in its arenas otherwise
        log.info("unloaded the idle model %s (trunk and experts)", self.name)
        return True


class Deployments:
    """Every served model by name, with tenant visibility and the trunk keep-alive loop."""

    def __init__(self) -> None:
        self.by_name: dict[str, Deployment] = {}
        self.aliases: dict[str, str] = {}  # alias -> the deployment's name
        self._cobatch_keys: dict[tuple, Deployment] = {}  # trunk key -> the first model whose engine steps it
        self._reaper: asyncio.Task[None] | None = None

    def add(self, deployment: Deployment) -> None:
        for name in (deployment.name, *deployment.spec.aliases):
            if name in self.by_name or name in self.aliases or deployment.spec.aliases.count(name) > 1:
                raise ValueError(f"model {name!r} is deployed twice")
        self._cobatch(deployment)
        self.by_name[deployment.name] = deployment
        self.aliases.update((alias, deployment.name) for alias in deployment.spec.aliases if alias != deployment.name)

    def _cobatch(self, deployment: Deployment) -> None:
        """Step the new model in the engine of a model with the same trunk, if one is served."""
        key = deployment.cobatch_key()
        if key is None:
            return
        peer = self._cobatch_keys.get(key)
        if peer is None:
            self._cobatch_keys[key] = deployment
            return
        engine = peer.engine
        if not isinstance(engine.executor, CoBatchedExecutor):
            engine.executor = CoBatchedExecutor(engine.executor)
        engine.executor.add(deployment.executor)
        engine.join(deployment.name, deployment.trunk, deployment.tokenizer, deployment.spec.kv_cache_bytes)
        deployment.engine = engine
        log.info("model %s steps with %s (the same trunk)", deployment.name, peer.name)

    def visible(self, tenant: str, allowed: list[str]) -> list[Deployment]:
        return [d for d in self.by_name.values() if d.visible_to(tenant, allowed)]

    def get(self, name: str, tenant: str, allowed: list[str]) -> Deployment | None:
        """The model if this tenant may use it; None (-> 404) otherwise, private ones included."""
        deployment = self.by_name.get(self.aliases.get(name, name))
        return deployment if deployment is not None and deployment.visible_to(tenant, allowed) else None

    def start(self) -> None:
        self._reaper = asyncio.create_task(self._reap_trunks())

    async def _reap_trunks(self) -> None:
        while True:
            await asyncio.sleep(0.5)
            for deployment in self.by_name.values():
                try:
                    deployment.maybe_unload_trunk(time.monotonic())
                    deployment.maybe_unload_model(time.monotonic())
                except Exception:  # one model's failure must not end scale to zero for every model
                    log.exception("unloading idle parts of %s failed", deployment.name)

    def trunk_bytes(self) -> int:
        """Bytes of every loaded trunk, a tensor that several share (the same bytes) counted once."""
        tensors = {id(t): t for d in self.by_name.values() if d.loaded_trunk is not None for t in d.loaded_trunk.tensors()}
        return sum(t.nbytes for t in tensors.values())

    @property
    def busy(self) -> bool:
        return any(d.engine.busy for d in self.by_name.values())

    async def stop(self) -> None:
        if self._reaper is not None:
            self._reaper.cancel()
        for engine in {id(d.engine): d.engine for d in self.by_name.values()}.values():
            await engine.stop()
