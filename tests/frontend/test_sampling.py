"""The sampler's options (vLLM's and OpenAI's): top_k, min_p, logit_bias and the penalties, by their math."""

from __future__ import annotations

import pytest
import torch

from faasmoe.engine.sampling import Sampler, SamplingParams, adjust_logits


def logits(seed: int = 0, vocab: int = 50) -> torch.Tensor:
    return torch.randn(vocab, generator=torch.Generator().manual_seed(seed)) * 3


def test_top_k_1_is_greedy() -> None:
    for seed in range(20):
        x = logits(seed)
        sampler = Sampler(SamplingParams(temperature=1.5, top_k=1, seed=seed))
        assert {sampler(x) for _ in range(20)} == {int(torch.argmax(x))}


def test_top_k_and_min_p_bound_what_is_drawn() -> None:
    x = logits(1)
    top = set(torch.topk(x, 3).indices.tolist())
    sampler = Sampler(SamplingParams(temperature=2.0, top_k=3, seed=0))
    drawn = {sampler(x) for _ in range(400)}
    assert drawn == top  # all three show up at temperature 2, nothing else
    probs = torch.softmax(x / 2.0, -1)
    allowed = set(torch.nonzero(probs >= 0.2 * probs.max()).flatten().tolist())
    sampler = Sampler(SamplingParams(temperature=2.0, min_p=0.2, seed=0))
    assert {sampler(x) for _ in range(400)} <= allowed and len(allowed) < 50
    assert SamplingParams(top_k=-1).top_k == 0  # vLLM's "all"


def test_a_huge_logit_bias_forces_a_token() -> None:
    x = logits(2)
    weakest = int(torch.argmin(x))
    for temperature in (0.0, 1.0):
        sampler = Sampler(SamplingParams(temperature=temperature, logit_bias={weakest: 100.0}, seed=0))
        assert {sampler(x) for _ in range(20)} == {weakest}
    banned = int(torch.argmax(x))
    assert Sampler(SamplingParams(logit_bias={banned: -100.0}))(x) != banned


def test_repetition_penalty_is_hf_repetition_penalty_logits_processor() -> None:
    from transformers import RepetitionPenaltyLogitsProcessor

    x = logits(3)
    prompt, output = [1, 4, 4, 9], [9, 17, 30]
    for penalty in (1.3, 0.7):
        ours = adjust_logits(x, SamplingParams(repetition_penalty=penalty), prompt, output)
        ids = torch.tensor([prompt + output])
        theirs = RepetitionPenaltyLogitsProcessor(penalty)(ids, x.clone()[None])[0]
        assert torch.allclose(ours, theirs), penalty
        assert torch.equal(ours[[i for i in range(50) if i not in prompt + output]],
                           x[[i for i in range(50) if i not in prompt + output]])


def test_frequency_and_presence_penalties_are_openais() -> None:
    x = logits(4)
    output = [3, 3, 3, 7]
    ours = adjust_logits(x, SamplingParams(frequency_penalty=0.5, presence_penalty=1.25), [3, 11], output)
    want = x.clone()
    want[3] -= 3 * 0.5 + 1.25
    want[7] -= 1 * 0.5 + 1.25
    assert torch.allclose(ours, want)  # the prompt's tokens (11) are not penalised
    # a strong penalty makes greedy leave the token it repeated
    top = int(torch.argmax(x))
    assert Sampler(SamplingParams(frequency_penalty=2.0))(x, [], [top] * 20) != top


@pytest.mark.parametrize("kwargs", [{"top_k": -2}, {"min_p": 1.5}, {"presence_penalty": 3}, {"repetition_penalty": 0}])
def test_out_of_range_options_are_refused(kwargs: dict) -> None:
    with pytest.raises(ValueError):
        SamplingParams(**kwargs)


def test_step_scores_are_the_ops_on_each_row() -> None:
    from faasmoe.engine.sampling import score_rows

    g = torch.Generator().manual_seed(3)
    hidden, head = torch.randn(3, 8, generator=g), torch.randn(50, 8, generator=g)
    scores = score_rows(lambda h: h @ head.T, hidden, top=4)
    for i in range(3):
        row = hidden[i] @ head.T
        assert scores.argmax[i] == int(torch.argmax(row))
        assert torch.allclose(scores.log_probs[i], torch.log_softmax(row, -1), atol=1e-6)
        assert scores.top_ids[i].tolist() == torch.topk(row, 4).indices.tolist()
    assert score_rows(lambda h: h @ head.T, hidden, top=0).top_ids is None
    one = score_rows(lambda h: h @ head.T, hidden, top=1)
    assert one.top_ids[:, 0].tolist() == one.argmax
    assert torch.equal(one.top_values[:, 0], one.log_probs.max(dim=-1).values)
    tied = score_rows(lambda h: h, torch.tensor([[0.0, 2.0, 1.0, 2.0]]), top=1)
    assert tied.argmax == [1] and tied.top_ids.tolist() == [[1]]  # the first of equal maxima, as argmax
    assert score_rows(lambda h: h @ head.T, hidden, top=80).top_ids.shape == (3, 50)  # no more than the vocabulary


def test_a_given_argmax_is_greedy_only_without_logit_adjustments() -> None:
    x = logits(4)
    best, weakest = int(torch.argmax(x)), int(torch.argmin(x))
    assert Sampler(SamplingParams())(x, argmax=best) == best
    # The argmax of the raw logits no longer holds once a bias moved them: the sampler looks again.
    assert Sampler(SamplingParams(logit_bias={weakest: 100.0}))(x, argmax=best) == weakest
    drawn = {Sampler(SamplingParams(temperature=1.0, seed=s))(x, argmax=best) for s in range(40)}
    assert len(drawn) > 1  # a sampling request draws; the argmax does not decide for it
