"""Structured outputs: what a request constrains its output to, compiled by llguidance, applied per token.

A request names a constraint (a JSON schema, any JSON object, a regex, a choice of strings, or a Lark / GBNF
grammar); `GrammarCompiler.compile` turns it into a `Grammar` for one tokenizer and vocabulary (cached by
the constraint's text: an agent sends the same schema on every call), and each sequence gets its own
`GrammarMatcher`, which gives the tokens allowed next as a mask over the logits and follows the tokens
sampled. EOS is allowed only where the grammar accepts; once nothing can follow, the sequence stops.

llguidance, against xgrammar (bench/grammar.py, README): it compiles 3-18x faster and is one wheel without
dependencies; xgrammar's masks are faster per step on JSON schemas, which matters at wide batches. JSON is generated
compact (no free whitespace between tokens): a model that may put any whitespace anywhere can loop on it,
which a random or small model does.
"""

from __future__ import annotations

import functools
import json
import threading
import weakref
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from faasmoe.model.tokenizer import Tokenizer

GRAMMAR_CACHE_SIZE = 512  # compiled grammars kept per tokenizer
JSON_OPTIONS = {"whitespace_flexible": False}  # llguidance's JsonCompileOptions
MAX_SCHEMA_DEPTH = 128  # nesting levels of a schema (a deeper one is a 400, not a stack overflow)
_BYTE_BITS = torch.tensor([1 << i for i in range(8)], dtype=torch.uint8)


class StructuredOutputError(ValueError):
    """A request field that constrains the output (a schema, a grammar, tools) and cannot be served as sent;
    `param` names it. The HTTP layer answers it as a 400 naming that field."""

    def __init__(self, message: str, param: str) -> None:
        super().__init__(message)
        self.param = param


@dataclass(frozen=True)
class StructuredOutput:
    """A request's output constraint: `kind` is json_schema, json_object, regex, choice or grammar; `spec` its
    text (a JSON schema, a regex, a JSON list of choices, a grammar); `param` the request field it came from."""

    kind: str
    spec: str
    param: str

    @classmethod
    def json_schema(cls, schema: Any, param: str) -> StructuredOutput:
        if isinstance(schema, str):
            try:
                schema = json.loads(schema)
            except json.JSONDecodeError as exc:
                raise StructuredOutputError(f"{param} is not valid JSON: {exc}.", param) from None
        if not isinstance(schema, dict):
            raise StructuredOutputError(f"{param} must be a JSON schema (an object), got {type(schema).__name__}.",
                                        param)
        return cls("json_schema", json.dumps(strict_objects(schema, param)), param)  # key order kept: fields come in it

    @classmethod
    def choice(cls, options: Any, param: str) -> StructuredOutput:
        if not isinstance(options, list) or not options or not all(isinstance(o, str) for o in options):
            raise StructuredOutputError(f"{param} must be a non-empty list of strings.", param)
        return cls("choice", json.dumps(options), param)


_SCHEMA_MAPS = ("properties", "patternProperties", "$defs", "definitions", "dependentSchemas")


def strict_objects(schema: Any, param: str = "schema", depth: int = 0) -> Any:
    """The schema with every object that lists its properties closed to others unless it says otherwise
    (`additionalProperties` false where not given), as xgrammar's strict mode reads schemas in vLLM: a model
    should write the fields asked for, and an open object lets a small one write unbounded extra fields.
    allOf and its members are left open (closing them would make the conjunction unsatisfiable). A schema
    nested deeper than MAX_SCHEMA_DEPTH is refused (StructuredOutputError naming `param`)."""
    if depth > MAX_SCHEMA_DEPTH:
        raise StructuredOutputError(f"{param} is nested deeper than {MAX_SCHEMA_DEPTH} levels.", param)
    if isinstance(schema, list):
        return [strict_objects(item, param, depth + 1) for item in schema]
    if not isinstance(schema, dict):
        return schema
    out = {}
    for key, value in schema.items():
        if key in _SCHEMA_MAPS and isinstance(value, dict):  # name -> schema: the names are not keywords
            out[key] = {name: strict_objects(sub, param, depth + 1) for name, sub in value.items()}
        elif key in ("allOf", "const", "enum", "default", "examples"):
            out[key] = value
        else:
            out[key] = strict_objects(value, param, depth + 1)
    if "properties" in out and not {"additionalProperties", "patternProperties", "allOf"} & out.keys():
        out["additionalProperties"] = False
    return out


class Grammar:
    """One compiled constraint for one tokenizer: a matcher at its start, built once (off the event loop, when
    the request is prepared; a complex grammar takes 100 ms or more), copied for each sequence."""

    def __init__(self, start, vocab_size: int) -> None:
        self._start = start
        self.vocab_size = vocab_size

    def matcher(self) -> GrammarMatcher:
        return GrammarMatcher(self._start.deep_copy(), self.vocab_size)


class GrammarMatcher:
    """A sequence's position in its grammar."""

    def __init__(self, matcher, vocab_size: int) -> None:
        self._matcher = matcher
        self.vocab_size = vocab_size

    def allowed(self) -> torch.Tensor:
        """Bool [vocab_size]: the tokens the grammar allows next (EOS only where it accepts)."""
        packed = torch.frombuffer(bytearray(self._matcher.compute_bitmask()), dtype=torch.uint8)
        bits = (packed[:, None] & _BYTE_BITS).ne(0).reshape(-1)  # little-endian within each byte
        return bits[: self.vocab_size]

    def consume(self, token: int) -> bool:
        """Advance by a sampled token; False if the grammar refuses it (the matcher is then in error)."""
        return bool(self._matcher.consume_token(token))

    @property
    def done(self) -> bool:
        """Nothing can follow: the output is complete."""
        return bool(self._matcher.is_stopped())



class GrammarCompiler:
    """Compiles constraints for one tokenizer and logits width; llguidance's tokenizer view is built once
    (about a second for a 152k vocabulary), on the first constrained request."""

    def __init__(self, tokenizer: Tokenizer, vocab_size: int) -> None:
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size
        self._ll_tokenizer = None
        self._lock = threading.Lock()
        self._compile = functools.lru_cache(maxsize=GRAMMAR_CACHE_SIZE)(self._compile_uncached)

    @property
    def ll_tokenizer(self):
        with self._lock:
            if self._ll_tokenizer is None:
                import llguidance

                eos = sorted(self.tokenizer.eos_token_ids)
                self._ll_tokenizer = llguidance.LLTokenizer(self.tokenizer.backend.to_str(), n_vocab=self.vocab_size,
                                                            eos_token=eos or None)
            return self._ll_tokenizer

    def compile(self, constraint: StructuredOutput) -> Grammar:
        """The grammar for `constraint` (cached by kind and text); StructuredOutputError naming its field if the
        engine cannot compile it."""
        try:
            return self._compile(constraint.kind, constraint.spec)
        except ValueError as exc:
            raise StructuredOutputError(f"{constraint.param}: the grammar engine cannot compile it: {exc}",
                                        constraint.param) from None

    def _compile_uncached(self, kind: str, spec: str) -> Grammar:
        import llguidance

        if kind == "json_schema":
            text = llguidance.LLMatcher.grammar_from_json_schema(spec, overrides=JSON_OPTIONS)
        elif kind == "json_object":
            text = llguidance.LLMatcher.grammar_from_json_schema('{"type": "object"}', overrides=JSON_OPTIONS)
        else:
            text = llguidance.grammar_from({"regex": "regex", "choice": "choice", "grammar": "grammar"}[kind], spec)
        is_error, messages = llguidance.LLMatcher.validate_grammar_with_warnings(text, self.ll_tokenizer)
        if is_error:
            raise ValueError(messages[0])
        return Grammar(llguidance.LLMatcher(self.ll_tokenizer, text, log_level=0), self.vocab_size)


_compilers: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_compilers_lock = threading.Lock()


def compiler_for(tokenizer: Tokenizer, vocab_size: int) -> GrammarCompiler:
    """The compiler of a tokenizer and logits width (one per deployment, made on first use)."""
    with _compilers_lock:
        by_vocab = _compilers.setdefault(tokenizer, {})
        if vocab_size not in by_vocab:
            by_vocab[vocab_size] = GrammarCompiler(tokenizer, vocab_size)
        return by_vocab[vocab_size]
