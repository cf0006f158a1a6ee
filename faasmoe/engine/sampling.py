"""Next-token choice: greedy, or temperature + top-k / min-p / nucleus (top-p) sampling with a per-request
seed, after vLLM's logits adjustments (logit_bias; repetition, frequency and presence penalties)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from faasmoe.engine.structured import Grammar


@dataclass
class SamplingParams:
    """How one request picks tokens and when it stops (OpenAI-style fields)."""

    max_tokens: int = 16
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] | None = None  # stop on these besides the model's EOS tokens
    ignore_eos: bool = False
    top_k: int = 0  # keep the k most likely tokens; 0 (or vLLM's -1) = all
    min_p: float = 0.0  # drop tokens less likely than min_p x the most likely one
    presence_penalty: float = 0.0  # OpenAI's: minus this for every token already generated
    frequency_penalty: float = 0.0  # OpenAI's: minus this times how often it was generated
    repetition_penalty: float = 1.0  # HF's / vLLM's: logits of prompt and output tokens /= it (x it if negative)
    logit_bias: dict[int, float] | None = None  # OpenAI's: added to those tokens' logits
    grammar: Grammar | None = None  # structured output: only tokens it allows are sampled
    skip_special_tokens: bool = True  # drop special tokens' text from the output (vLLM's default)

    def __post_init__(self) -> None:
        if self.max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {self.max_tokens}")
        if not 0.0 <= self.temperature <= 100.0:
            raise ValueError(f"temperature must be in [0, 100], got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        if self.top_k == -1:
            self.top_k = 0
        if self.top_k < 0:
            raise ValueError(f"top_k must be -1, 0 (all) or positive, got {self.top_k}")
        if not 0.0 <= self.min_p <= 1.0:
            raise ValueError(f"min_p must be in [0, 1], got {self.min_p}")
        for name in ("presence_penalty", "frequency_penalty"):
            if not -2.0 <= getattr(self, name) <= 2.0:
                raise ValueError(f"{name} must be in [-2, 2], got {getattr(self, name)}")
        if not self.repetition_penalty > 0.0:
            raise ValueError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")

    @property
    def adjusts_logits(self) -> bool:
        return bool(self.logit_bias) or self.presence_penalty != 0.0 or self.frequency_penalty != 0.0 \
            or self.repetition_penalty != 1.0


class Sampler:
    """Draws one sequence's tokens; owns its random generator so a seed reproduces a stream."""

    def __init__(self, params: SamplingParams, device: torch.device | str = "cpu") -> None:
        self.params = params
        self.generator: torch.Generator | None = None
        if params.temperature > 0:
            self.generator = torch.Generator(device=device)
            if params.seed is not None:
                self.generator.manual_seed(params.seed)
            else:
                self.generator.seed()

    def __call__(self, logits: torch.Tensor, prompt: list[int] = (), output: list[int] = (),
                 argmax: int | None = None, allowed: torch.Tensor | None = None) -> int:
        """logits [V] (and the tokens so far, for the penalties) -> the next token id. `argmax`: the
        logits' argmax when the caller has it (a whole batch's in one op); greedy takes it as is.
        `allowed`: bool [V], the only tokens that may be chosen (a grammar's), applied after the penalties."""
        p = self.params
        if p.adjusts_logits:
            logits, argmax = adjust_logits(logits, p, prompt, output), None
        if allowed is not None and (self.generator is not None or argmax is None or not bool(allowed[argmax])):
            # (greedy whose choice the grammar allows needs no mask: the masked argmax is the same token)
            logits, argmax = logits.masked_fill(~allowed, float("-inf")), None
        if self.generator is None:
            return int(torch.argmax(logits)) if argmax is None else argmax
        probs = torch.softmax(logits.float() / p.temperature, dim=-1)
        if p.top_p < 1.0 or p.top_k > 0 or p.min_p > 0.0:
            sorted_probs, order = torch.sort(probs, descending=True)
            if p.top_k > 0:
                sorted_probs[p.top_k:] = 0.0
            if p.min_p > 0.0:
                sorted_probs[sorted_probs < p.min_p * sorted_probs[0]] = 0.0
            if p.top_p < 1.0:
                # Keep the smallest prefix whose mass reaches top_p of what is left (always at least one token).
                sorted_probs = sorted_probs / sorted_probs.sum()
                drop = sorted_probs.cumsum(-1) - sorted_probs >= p.top_p
                sorted_probs[drop] = 0.0
            choice = torch.multinomial(sorted_probs / sorted_probs.sum(), 1, generator=self.generator)
            return int(order[choice])
        return int(torch.multinomial(probs, 1, generator=self.generator))


@dataclass
class StepScores:
    """What sampling reads of one step's logits [S, V], made in the lm_head's job on the compute thread, so
    the event loop stays free for the streams meanwhile (on the loop, with argmax and topk(1), these took
    1.2-2.1 ms a step at 1-4 sequences over a 152k vocabulary; here, with max, ~0.9 ms at batch 1)."""

    logits: torch.Tensor  # fp32
    log_probs: torch.Tensor  # every row's log-softmax: each token's logprob is recorded
    argmax: list[int]  # each row's most likely token (greedy's choice)
    top_values: torch.Tensor | None  # [S, top] the most likely tokens' logprobs, when some request asked
    top_ids: torch.Tensor | None


def score_rows(logits_of, hidden: torch.Tensor, top: int) -> StepScores:
    """The logits of hidden rows [S, H] (`logits_of`: the trunk's lm_head) and their `StepScores`."""
    logits = logits_of(hidden).float()
    log_probs = torch.log_softmax(logits, dim=-1)
    # max's indices are the first maximum, as argmax's; over a 152k vocabulary on CPU it takes ~75 us a
    # row where argmax takes ~220 and topk(1) ~340 (torch 2.13), so the top-1 alternative comes from it too.
    argmax = logits.max(dim=-1).indices
    top = min(top, logits.shape[-1])
    if top == 1:
        top_ids = argmax[:, None]
        top_values = log_probs.gather(1, top_ids)
    else:
        top_values, top_ids = torch.topk(log_probs, top) if top else (None, None)
    return StepScores(logits, log_probs, argmax.tolist(), top_values, top_ids)


def adjust_logits(logits: torch.Tensor, params: SamplingParams, prompt: list[int] = (),
                  output: list[int] = ()) -> torch.Tensor:
    """vLLM's order: logit_bias, then the repetition penalty (HF's RepetitionPenaltyLogitsProcessor over
    prompt and output tokens), then OpenAI's frequency and presence penalties (output tokens only)."""
    x = logits.float().clone()
    if params.logit_bias:
        ids = torch.tensor(list(params.logit_bias), dtype=torch.long, device=x.device)
        x[ids] += torch.tensor(list(params.logit_bias.values()), dtype=x.dtype, device=x.device)
    if params.repetition_penalty != 1.0 and (prompt or output):
        seen = torch.tensor(sorted(set(prompt) | set(output)), dtype=torch.long, device=x.device)
        picked = x[seen]
        x[seen] = torch.where(picked > 0, picked / params.repetition_penalty, picked * params.repetition_penalty)
    if output and (params.frequency_penalty or params.presence_penalty):
        counts = torch.bincount(torch.tensor(list(output), dtype=torch.long, device=x.device), minlength=x.shape[-1])
        counts = counts[: x.shape[-1]].to(x.dtype)
        x -= params.frequency_penalty * counts + params.presence_penalty * (counts > 0).to(x.dtype)
    return x


PROMPT_LOGPROB_ROWS = 256  # rows of [V] log-softmax computed at once: a long prompt must not hold N x V floats


@dataclass
class PromptLogprob:
    """One prompt token's log-probability given the tokens before it, its rank, and the top alternatives."""

    logprob: float
    rank: int  # 1 = the most likely token
    top_logprobs: dict[int, float]


def prompt_logprobs(logits_of, hidden: torch.Tensor, tokens: list[int], top: int) -> list[PromptLogprob | None]:
    """Each prompt token's logprob under the model given the tokens before it (the first has none: None),
    from the prefill's hidden rows [N, H]; `logits_of` maps rows to logits (the trunk's lm_head)."""
    out: list[PromptLogprob | None] = [None]
    for lo in range(0, len(tokens) - 1, PROMPT_LOGPROB_ROWS):
        hi = min(lo + PROMPT_LOGPROB_ROWS, len(tokens) - 1)
        lsm = torch.log_softmax(logits_of(hidden[lo:hi]).float(), dim=-1)
        nxt = torch.tensor(tokens[lo + 1:hi + 1], device=lsm.device)
        chosen = lsm.gather(1, nxt[:, None])[:, 0]
        ranks = (lsm > chosen[:, None]).sum(-1) + 1
        values, indices = torch.topk(lsm, top, dim=-1) if top > 0 else (None, None)
        for i in range(hi - lo):
            alternatives = {} if values is None else {int(t): float(v) for t, v in zip(indices[i], values[i])}
            out.append(PromptLogprob(float(chosen[i]), int(ranks[i]), alternatives))
    return out


def logprobs_of(logits: torch.Tensor, token: int) -> float:
    """Log-probability of `token` under the model's (untempered) distribution."""
    return float(torch.log_softmax(logits.float(), dim=-1)[token])
