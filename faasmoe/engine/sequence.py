"""A `Sequence` owns one request's state: its tokens, KV cache, sampler, text and stop conditions.

Both the offline `generate` and the serving engine advance sequences the same way."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from faasmoe.engine.sampling import Sampler, SamplingParams, logprobs_of

if TYPE_CHECKING:
    import torch

    from faasmoe.model.kv_cache import KVCache
    from faasmoe.model.tokenizer import Tokenizer


@dataclass
class GenerationResult:
    prompt_token_ids: list[int]
    token_ids: list[int]
    text: str
    finish_reason: str  # "stop" (EOS or a stop string) | "length"
    logprobs: list[float] = field(default_factory=list)


class Sequence:
    """One request in flight: its tokens, KV cache, sampler, text and stop conditions."""

    def __init__(
        self,
        prompt: list[int],
        params: SamplingParams,
        cache: KVCache,
        tokenizer: Tokenizer | None,
        eos_ids: frozenset[int],
    ) -> None:
        if not prompt:
            raise ValueError("the prompt must contain at least one token")
        if params.stop and tokenizer is None:
            raise ValueError("stop strings need a tokenizer (no tokenizer.json in the model directory)")
        self.prompt = list(prompt)
        self.params = params
        self.cache = cache
        self.sampler = Sampler(params, cache.device)
        # As vLLM: stop_token_ids stop besides EOS, and ignore_eos ignores EOS alone.
        self.stop_ids = frozenset(params.stop_token_ids or ()) | (frozenset() if params.ignore_eos else eos_ids)
        self._eos_ids = eos_ids
        self.output: list[int] = []
        self.logprobs: list[float] = []
        self.pending: list[int] = list(prompt)  # fed to the model at the next step
        self.finish_reason: str | None = None
        self._detok = None
        if tokenizer is not None:
            from faasmoe.model.tokenizer import IncrementalDetokenizer

            self._detok = IncrementalDetokenizer(tokenizer, skip_special_tokens=params.skip_special_tokens)
        self.text = ""
        # Structured output: this sequence's place in its grammar (None: unconstrained).
        self.matcher = params.grammar.matcher() if params.grammar is not None else None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    def accept(self, logits: torch.Tensor, log_probs: torch.Tensor | None = None, argmax: int | None = None) -> int:
        """Sample from this step's logits [V], record the token and check the stop conditions.
        `log_probs` is their log-softmax and `argmax` their argmax when the caller has them (a whole
        batch's in one op)."""
        allowed = self.matcher.allowed() if self.matcher is not None else None
        token = self.sampler(logits, self.prompt, self.output, argmax, allowed)
        self.output.append(token)
        self.logprobs.append(logprobs_of(logits, token) if log_probs is None else float(log_probs[token]))
        self.pending = [token]
        if self.matcher is not None and (not self.matcher.consume(token) or self.matcher.done):
            # The grammar is complete (EOS included, where it accepted): nothing may follow.
            self.finish_reason = "stop"
            if self._detok is not None and token not in self._eos_ids:
                self._add_text(self._detok.push(token) + self._detok.flush())
            return token
        if token in self.stop_ids:
            self.finish_reason = "stop"
            return token
        if self._detok is not None and self._add_text(self._detok.push(token)):
            return token
        if len(self.output) >= self.params.max_tokens:
            self.finish_reason = "length"
            if self._detok is not None:
                self._add_text(self._detok.flush())
        return token

    def _add_text(self, delta: str) -> bool:
        """Append decoded text; on a stop string, cut the text before it and finish."""
        before = len(self.text)
        self.text += delta
        for stop in self.params.stop:
            # A new match must overlap the delta, so search only from just before it.
            at = self.text.find(stop, max(0, before - len(stop) + 1))
            if at != -1:
                self.text = self.text[:at]
                self.finish_reason = "stop"
                return True
        return False

    def result(self) -> GenerationResult:
        return GenerationResult(self.prompt, self.output, self.text, self.finish_reason or "length", self.logprobs)
