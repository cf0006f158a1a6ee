"""`model init --routing-locality`: consecutive tokens share experts as in trained MoE models.

Measured on a tiny mixtral-shaped checkpoint (8 experts, top-2, 3 layers standing for Mixtral's
first, middle and last) over a seeded Zipf token sequence, against token-only routing on the
same text and chance (12.5% same first expert, 46.4% overlapping top-2), and Mixtral-8x7B's
published repetition (arXiv 2401.04088, Table 5).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from faasmoe.model.moe_model import MoEModel
from faasmoe.model.synthetic.checkpoint_writer import init_checkpoint, locality_depth
from faasmoe.model.synthetic.routing_stats import chance, routing_statistics, zipf_tokens

TOKENS = 2048


def _stats(path: Path):
    model = MoEModel.from_pretrained(path)
    return model, routing_statistics(model, zipf_tokens(model.config.vocab_size, TOKENS, seed=0))


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("locality")
    return {
        # Token-only routing (the router-skew channel with no skew): what the same text gives without locality.
        "token": init_checkpoint(root / "token", "mixtral", layers=3, seed=0, router_skew=1e-6, progress=False),
        "local": init_checkpoint(root / "local", "mixtral", layers=3, seed=0, routing_locality=0.4, progress=False),
    }


def test_consecutive_tokens_share_experts_like_mixtral(checkpoints) -> None:
    _, token = _stats(checkpoints["token"])
    model, local = _stats(checkpoints["local"])
    first, overlap = chance(8, 2)
    assert (first, round(overlap, 3)) == (0.125, 0.464)
    for s in local:
        print(f"layer {s.layer}: same first {s.same_first:.3f}, overlap {s.overlap:.3f}, load {s.load_ratio:.2f}")
    for s in token:
        print(f"token-only layer {s.layer}: same first {s.same_first:.3f}, overlap {s.overlap:.3f}, "
              f"load {s.load_ratio:.2f}")
    first_layer, middle, last = local
    assert 0.125 < first_layer.same_first < 0.19  # Mixtral 13.6-14.9%: token identity, little context
    assert 0.22 < middle.same_first < 0.32  # Mixtral layer 15: 23.6-28.4%
    assert 0.17 < last.same_first < 0.28  # Mixtral layer 31: 19.7-26.3%
    assert middle.same_first > token[1].same_first + 0.07 and last.same_first > token[2].same_first + 0.03
    assert all(0.46 < s.overlap < 0.72 for s in local)  # Mixtral: 44.9-67%
    assert all(1.1 <= s.load_ratio <= 1.8 for s in local)  # Mixtral: 1.1-1.7 (Zipf text alone gives ~1.5)
    # Still a model: finite logits, and routing follows tokens (not one expert for everything).
    logits = model(torch.tensor([zipf_tokens(model.config.vocab_size, 64, seed=3)]))
    assert torch.isfinite(logits).all()


def test_off_by_default_and_refused_where_it_cannot_work(tmp_path: Path) -> None:
    plain = init_checkpoint(tmp_path / "plain", "mixtral", seed=0, progress=False)
    off = init_checkpoint(tmp_path / "off", "mixtral", seed=0, routing_locality=0.0, progress=False)
    assert (plain / "model.safetensors").read_bytes() == (off / "model.safetensors").read_bytes()
    with pytest.raises(ValueError, match="q/k norms"):
        init_checkpoint(tmp_path / "q3", "qwen3_moe", routing_locality=0.4, progress=False)
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        init_checkpoint(tmp_path / "bad", "mixtral", routing_locality=1.0, progress=False)
    assert [round(locality_depth(i, 3), 2) for i in range(3)] == [0.1, 1.0, 0.75]
    assert locality_depth(0, 1) == 1.0
