"""Router skew against published measurements, computed from the checkpoint's own router.

With `--router-skew S > 0` a checkpoint routes each token by its embedding alone (a reserved
channel no layer writes; see faasmoe/model_init.py), so the experts a token picks in every layer
are top-k(router @ embedding[token]), exactly, with no forward pass. That gives, per checkpoint:

* busiest / mean expert load over uniformly random tokens: the global skew. Published for
  Mixtral-8x7B: the busiest expert of a layer takes about 1.1-1.7x the mean load (mild).
* hit rate of a per-layer LRU holding 1/8 of the experts, replaying a token stream: uniform random
  tokens (global skew only), and the run's own tokens (each request's prompt then its generated
  tokens, requests in send order): global skew plus per-tenant task locality. Published: an LRU of 64 of
  512 experts per layer hit about 67%, i.e. strong short-term reuse.
* experts each tenant's tokens touch in a layer, against all tenants' tokens together.
"""

from __future__ import annotations

from collections import OrderedDict
from pathlib import Path

import torch

from faasmoe.model.checkpoint import CheckpointReader, ExpertLayout
from faasmoe.model.config import MoEConfig

PUBLISHED = {
    "busiest_over_mean": "Mixtral-8x7B: busiest expert 1.1-1.7x the mean load of its layer",
    "lru_hit_rate": "per-layer LRU of 64 of 512 experts: ~67% hits",
}
LRU_FRACTION = 1 / 8  # 64 of 512


class RouterTable:
    """The experts every token picks in every MoE layer of a skewed checkpoint."""

    def __init__(self, model_dir: Path) -> None:
        self.config = MoEConfig.from_pretrained(model_dir)
        reader = CheckpointReader(model_dir)
        layout = ExpertLayout(reader, self.config)
        self._embed = reader.tensor("model.embed_tokens.weight")
        self._routers = [reader.tensor(layout.router_name(layer)).float() for layer in self.config.moe_layers]

    def route(self, tokens: list[int]) -> torch.Tensor:
        """[layers, tokens, top_k] expert ids."""
        ids = torch.tensor(tokens, dtype=torch.long)
        h = self._embed[ids].float()
        return torch.stack([torch.topk(h @ r.T, self.config.top_k, dim=-1).indices for r in self._routers])


def busiest_over_mean(routes: torch.Tensor, num_experts: int) -> float:
    """Busiest expert's load over the mean, averaged over layers."""
    ratios = []
    for layer in routes:
        counts = torch.bincount(layer.reshape(-1), minlength=num_experts).float()
        ratios.append(float(counts.max() / counts.mean()))
    return sum(ratios) / len(ratios)


def lru_hit_rate(routes: torch.Tensor, capacity: int) -> float:
    """Hits of a per-layer LRU of `capacity` experts over the token stream, all layers together."""
    hits = total = 0
    for layer in routes:
        cache: OrderedDict[int, None] = OrderedDict()
        for token in layer.tolist():
            for expert in token:
                total += 1
                if expert in cache:
                    hits += 1
                    cache.move_to_end(expert)
                else:
                    cache[expert] = None
                    if len(cache) > capacity:
                        cache.popitem(last=False)
    return hits / total if total else 0.0


def experts_touched(routes: torch.Tensor) -> float:
    """Distinct experts per layer the tokens touch, averaged over layers."""
    return sum(len(set(layer.reshape(-1).tolist())) for layer in routes) / len(routes)


def calibrate(model_dir: Path, skew: float, schedule: list | None = None, token_ids: dict[str, list[int]] | None = None,
              uniform_tokens: int = 20000, seed: int = 0) -> dict:
    """The calibration row of one checkpoint; with a schedule, also the run's own token stream
    (`token_ids`: the generated ids of each request, by request key)."""
    table = RouterTable(model_dir)
    cfg = table.config
    capacity = max(1, round(cfg.num_experts * LRU_FRACTION))
    g = torch.Generator().manual_seed(seed)
    uniform = table.route(torch.randint(0, cfg.vocab_size, (uniform_tokens,), generator=g).tolist())
    row = {"skew": skew, "num_experts": cfg.num_experts, "top_k": cfg.top_k, "lru_capacity": capacity,
           "busiest_over_mean": busiest_over_mean(uniform, cfg.num_experts),
           "lru_hit_rate_uniform": lru_hit_rate(uniform[:, :4000], capacity),
           "exact": skew > 0}
    if schedule:
        token_ids = token_ids or {}
        stream = [t for r in schedule for t in (*r.prompt, *token_ids.get(r.key, []))]
        streams = workload_streams(schedule, token_ids)
        routes = table.route(stream)
        row["lru_hit_rate_workload"] = lru_hit_rate(routes, capacity)
        row["experts_touched_all_tenants"] = experts_touched(routes)
        per_tenant = [experts_touched(table.route(tokens)) for tokens in streams.values() if tokens]
        row["experts_touched_per_tenant"] = sum(per_tenant) / len(per_tenant)
    return row


def workload_streams(schedule: list, token_ids: dict[str, list[int]]) -> dict[str, list[int]]:
    """Each tenant's tokens: every request's prompt then its generated tokens, in send order."""
    streams: dict[str, list[int]] = {}
    for r in schedule:
        streams.setdefault(r.tenant, []).extend([*r.prompt, *token_ids.get(r.key, [])])
    return streams
