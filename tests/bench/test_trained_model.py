"""The trained-routing model's build, on a small budget: a real HF checkpoint with its own BPE tokenizer,
which transformers loads and whose logits faasmoe computes as transformers does."""

from __future__ import annotations

import json

import pytest
import torch

transformers = pytest.importorskip("transformers")

from bench.trainedlib.corpus import domains  # noqa: E402
from bench.trainedlib.train import DONE, TrainSpec, build  # noqa: E402
from faasmoe.model.moe_model import MoEModel  # noqa: E402
from faasmoe.model.tokenizer import Tokenizer  # noqa: E402

SMALL = TrainSpec(vocab_size=600, hidden_size=32, num_layers=2, num_heads=2, num_experts=8, top_k=2,
                  moe_intermediate_size=16, shared_expert_intermediate_size=24, seq_len=32, batch_size=4,
                  seconds=60.0, max_steps=24, lr=1e-2, domain_bytes=40_000)


def test_a_trained_checkpoint_loads_in_transformers_and_faasmoe_computes_its_logits(tmp_path):
    if len(domains()) < 2:
        pytest.skip("this machine ships fewer than two of the corpus's domains")
    path = build(tmp_path / "trained", SMALL)
    report = json.loads((path / DONE).read_text())
    assert report["steps"] == 24 and len(report["domains"]) >= 2
    assert report["losses"][0][1] > report["losses"][-1][1]  # it learned something
    assert build(tmp_path / "trained", SMALL) == path  # cached: not trained again
    reference = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    text = "def parse(argv):\n    return argv[1:]  # the flags\n"
    ids = transformers.AutoTokenizer.from_pretrained(path)(text)["input_ids"]
    assert Tokenizer.from_pretrained(path).encode(text) == ids
    with torch.no_grad():
        expected = reference(torch.tensor([ids])).logits[0]
    got = MoEModel.from_pretrained(path, dtype=torch.float32)(torch.tensor([ids]))[0]
    assert torch.allclose(got, expected, atol=1e-4), (got - expected).abs().max()


def test_an_esft_fine_tune_changes_only_its_chosen_experts_and_shares_every_other_block(tmp_path):
    if len(domains()) < 2:
        pytest.skip("this machine ships fewer than two of the corpus's domains")
    from bench.trainedlib.esft import DONE as ESFT_DONE
    from bench.trainedlib.esft import domain_stream, fine_tune
    from bench.trainedlib.train import corpus
    from faasmoe.engine.functions import block_content_at
    from faasmoe.model.config import MoEConfig

    base = build(tmp_path / "base", SMALL)
    train, _ = corpus(SMALL)[domains()[0].name]
    tuned = fine_tune(base, tmp_path / "tenant", domain_stream(base, train), seconds=60, seq_len=32, batch_size=4,
                      lr=1e-2, max_steps=5)
    chosen = {int(k): v for k, v in json.loads((tuned / ESFT_DONE).read_text())["experts"].items()}
    config = MoEConfig.from_pretrained(base)
    assert all(1 <= len(v) < config.num_experts for v in chosen.values())
    for layer in config.moe_layers:
        for e in range(config.num_experts):
            same = block_content_at(base, layer, e, 1, "float32") == block_content_at(tuned, layer, e, 1, "float32")
            assert same == (e not in chosen[layer]), (layer, e, chosen[layer])
    from safetensors import safe_open

    with safe_open(str(base / "model.safetensors"), "pt") as a, safe_open(str(tuned / "model.safetensors"), "pt") as b:
        trunk = [n for n in a.keys() if ".experts." not in n]
        assert trunk and all(torch.equal(a.get_tensor(n), b.get_tensor(n)) for n in trunk)  # routers included
    reference = transformers.AutoModelForCausalLM.from_pretrained(tuned, dtype=torch.float32).eval()
    ids = torch.tensor([[5, 77, 300, 12, 9, 41]])
    with torch.no_grad():
        expected = reference(ids).logits[0]
    assert torch.allclose(MoEModel.from_pretrained(tuned, dtype=torch.float32)(ids)[0], expected, atol=1e-4)
