"""MoEModel against itself: the KV cache, packed batches and block sizes change nothing."""

from __future__ import annotations

import pytest
import torch

from faasmoe.engine.offline import generate
from faasmoe.engine.sampling import SamplingParams
from faasmoe.model.moe_model import MoEModel

from .conftest import relative_error


@pytest.fixture(scope="module")
def model(hf_checkpoint):
    return MoEModel.from_pretrained(hf_checkpoint("qwen2_moe"))


def test_incremental_decoding_equals_full_forward(model):
    ids = torch.randint(0, 97, (1, 14), generator=torch.Generator().manual_seed(2))
    full = model(ids)[0]
    cache = model.new_cache(capacity=4)  # small on purpose: the cache must grow mid-sequence
    steps = [model.step([ids[0, :6].tolist()], [cache], all_logits=True)]
    steps.append(model.step([ids[0, 6:9].tolist()], [cache], all_logits=True))  # chunked prefill on a cache
    steps += [model.step([[int(t)]], [cache], all_logits=True) for t in ids[0, 9:]]
    incremental = torch.cat(steps)
    assert cache.length == 14
    assert relative_error(incremental, full) < 1e-5


def test_batch_of_different_lengths_gives_each_prompts_tokens(model):
    prompts = [[3, 9, 27], [81, 4, 12, 36, 7, 70, 1], [50], [11, 22, 33, 44, 55]]
    alone = [generate(model, [p], max_tokens=10, ignore_eos=True)[0].token_ids for p in prompts]
    together = [r.token_ids for r in generate(model, prompts, max_tokens=10, ignore_eos=True)]
    assert together == alone
    assert all(len(t) == 10 for t in together)


@pytest.mark.parametrize("variant", ["qwen2_moe", "mixtral_fused", "qwen3_moe"])
def test_every_block_size_gives_the_same_logits(hf_checkpoint, variant):
    path = hf_checkpoint(variant)
    ids = torch.randint(0, 97, (2, 9), generator=torch.Generator().manual_seed(3))
    base = MoEModel.from_pretrained(path)
    num_experts = base.config.num_experts
    reference = base(ids)
    for block_size in (1, 2, 3, num_experts // 2, num_experts):
        model = MoEModel.from_pretrained(path, expert_block_size=block_size)
        blocks = model.executor.blocks[model.config.moe_layers[0]]
        assert len(blocks) == -(-num_experts // block_size)
        assert relative_error(model(ids), reference) < 1e-6


def test_sampling_is_reproducible_with_a_seed(model):
    params = SamplingParams(max_tokens=12, temperature=1.5, top_p=0.9, seed=7, ignore_eos=True)
    first = generate(model, [[1, 2, 3]], params)[0].token_ids
    again = generate(model, [[1, 2, 3]], params)[0].token_ids
    other = generate(model, [[1, 2, 3]], SamplingParams(max_tokens=12, temperature=1.5, seed=8, ignore_eos=True))
    greedy = generate(model, [[1, 2, 3]], max_tokens=12, ignore_eos=True)[0].token_ids
    assert first == again
    assert first != other[0].token_ids or first != greedy


def test_top_p_keeps_only_the_nucleus():
    from faasmoe.engine.sampling import Sampler

    logits = torch.log(torch.tensor([0.6, 0.3, 0.05, 0.05]))
    sampler = Sampler(SamplingParams(temperature=1.0, top_p=0.8, seed=0))
    drawn = {sampler(logits) for _ in range(300)}
    assert drawn == {0, 1}


def test_stop_token_and_max_tokens(model):
    free = generate(model, [[5, 6]], max_tokens=8, ignore_eos=True)[0]
    stop_at = free.token_ids[3]
    stopped = generate(model, [[5, 6]], max_tokens=8, stop_token_ids=[stop_at])[0]
    assert stopped.finish_reason == "stop"
    assert stopped.token_ids == free.token_ids[: free.token_ids.index(stop_at) + 1]
    assert free.finish_reason == "length"
    # ignore_eos ignores EOS only: stop_token_ids still stop (vLLM's meaning)
    both = generate(model, [[5, 6]], max_tokens=8, stop_token_ids=[stop_at], ignore_eos=True)[0]
    assert both.finish_reason == "stop" and both.token_ids == stopped.token_ids


def test_bad_inputs_are_rejected_clearly(model):
    with pytest.raises(ValueError, match="token id out of range"):
        generate(model, [[5, 1000]], max_tokens=2)
    with pytest.raises(ValueError, match="at least one token"):
        generate(model, [[]], max_tokens=2)
    with pytest.raises(ValueError, match="max_tokens"):
        SamplingParams(max_tokens=0)
    with pytest.raises(ValueError, match="top_p"):
        SamplingParams(top_p=0.0)
    with pytest.raises(ValueError, match="expert_block_size"):
        MoEModel.from_pretrained(model.path, expert_block_size=0)
    with pytest.raises(ValueError, match="max_position_embeddings"):
        model.step([[1] * (model.config.max_position_embeddings + 1)], [model.new_cache()])


@pytest.fixture(scope="module")
def tiny_with_tokenizer(tmp_path_factory):
    from faasmoe.model.synthetic.checkpoint_writer import init_checkpoint

    path = init_checkpoint(tmp_path_factory.mktemp("tiny") / "m", "qwen2_moe", seed=1, progress=False)
    return MoEModel.from_pretrained(path)


def test_stop_string_cuts_the_text(tiny_with_tokenizer):
    model = tiny_with_tokenizer
    free = generate(model, ["Once upon a time"], max_tokens=24, ignore_eos=True)[0]
    assert len(free.text) > 6
    stop = free.text[3:5]
    stopped = generate(model, ["Once upon a time"], max_tokens=24, ignore_eos=True, stop=[stop])[0]
    assert stopped.finish_reason == "stop"
    assert stop not in stopped.text
    assert free.text.startswith(stopped.text)
    assert stopped.text == free.text[: free.text.index(stop)]


def test_string_prompts_and_chat_template(tiny_with_tokenizer):
    model = tiny_with_tokenizer
    prompt = model.tokenizer.apply_chat_template([{"role": "user", "content": "hi"}])
    assert prompt.endswith("<|im_start|>assistant\n")
    by_text = generate(model, [prompt], max_tokens=5, ignore_eos=True)[0]
    by_ids = generate(model, [model.tokenizer.encode(prompt)], max_tokens=5, ignore_eos=True)[0]
    assert by_text.token_ids == by_ids.token_ids
    assert by_text.text == model.tokenizer.decode(by_text.token_ids)


def test_generate_cli(tiny_with_tokenizer):
    import subprocess
    import sys

    out = subprocess.run(
        [sys.executable, "-m", "faasmoe.cli", "generate", str(tiny_with_tokenizer.path), "--prompt", "Hello",
         "--prompt", "Bye", "--max-tokens", "4", "--chat"],
        capture_output=True, text=True, timeout=120,
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.count("completion (4 tokens") == 2
    bad = subprocess.run([sys.executable, "-m", "faasmoe.cli", "generate", "/nonexistent", "--prompt", "x"],
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "no config.json" in bad.stderr
