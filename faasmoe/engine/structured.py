"""Structured outputs: what a request constrains its output to, compiled by llguidance, applied per token.

A request names a constraint (a JSON schema, any JSON object, a regex, a choice of strings, or a Lark / GBNF
grammar); `GrammarCompiler.compile` turns it into a `Grammar` for one tokenizer and vocabulary (cached by
the constraint's text: an agent sends the same schema on every call), and each sequence gets its own
`GrammarMatcher`, which gives the tokens allowed next as a mask over the logits and follows the tokens
sampled. EOS is allowed only where the grammar accepts; once nothing can follow, the sequence stops.

llguidance was chosen over xgrammar by measurement (bench/grammar.py): see the README. JSON is generated
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

KINDS = ("json_schema", "json_object", "regex", "choice", "grammar")
GRAMMAR_CACHE_SIZE = 512  # compiled grammars kept per tokenizer
JSON_OPTIONS = {"whitespace_flexible": False}  # llguidance's JsonCompileOptions


class StructuredOutputError(ValueError):
    """A constraint the grammar engine cannot compile; `param` names the request field that holds it."""

    def __init__(self, message: str, param: str) -> None:
        super().__init__(message)
        self.param = param


@dataclass(frozen=True)
class StructuredOutput:
    """A request's output constraint: `kind` is one of KINDS; `spec` its text (a JSON schema, a regex, a JSON
    list of choices, a grammar); `param` the request field it came from."""

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
        return cls("json_schema", json.dumps(strict_objects(schema)), param)  # key order kept: fields come in it

    @classmethod
    def choice(cls, options: Any, param: str) -> StructuredOutput:
        if not isinstance(options, list) or not options or not all(isinstance(o, str) for o in options):
            raise StructuredOutputError(f"{param} must be a non-empty list of strings.", param)
        return cls("choice", json.dumps(options), param)


_SCHEMA_MAPS = ("properties", "patternProperties", "$defs", "definitions", "dependentSchemas")


def strict_objects(schema: Any) -> Any:
    """The schema with every object that lists its properties closed to others unless it says otherwise
    (`additionalProperties` false where not given), as xgrammar's strict mode reads schemas in vLLM: a model
    should write the fields asked for, and an open object lets a small one write unbounded extra fields.
    allOf and its members are left open (closing them would make the conjunction unsatisfiable)."""
    if isinstance(schema, list):
        return [strict_objects(item) for item in schema]
    if not isinstance(schema, dict):
        return schema
    out = {}
    for key, value in schema.items():
        if key in _SCHEMA_MAPS and isinstance(value, dict):  # name -> schema: the names are not keywords
            out[key] = {name: strict_objects(sub) for name, sub in value.items()}
        else:
            out[key] = value if key in ("allOf", "const", "enum", "default", "examples") else strict_objects(value)
    if "properties" in out and not {"additionalProperties", "patternProperties", "allOf"} & out.keys():
        out["additionalProperties"] = False
    return out


class Grammar:
    """One compiled constraint for one tokenizer: makes a matcher per sequence."""

    def __init__(self, compiler: GrammarCompiler, text: str, constraint: StructuredOutput) -> None:
        self._compiler = compiler
        self.text = text
        self.constraint = constraint

    def matcher(self) -> GrammarMatcher:
        import llguidance

        return GrammarMatcher(llguidance.LLMatcher(self._compiler.ll_tokenizer, self.text, log_level=0),
                              self._compiler.vocab_size)


class GrammarMatcher:
    """A sequence's position in its grammar."""

    def __init__(self, matcher, vocab_size: int) -> None:
        self._matcher = matcher
        self.vocab_size = vocab_size
        self._bits = torch.tensor([1 << i for i in range(8)], dtype=torch.uint8)

    def allowed(self) -> torch.Tensor:
        """Bool [vocab_size]: the tokens the grammar allows next (EOS only where it accepts)."""
        packed = torch.frombuffer(bytearray(self._matcher.compute_bitmask()), dtype=torch.uint8)
        bits = (packed[:, None] & self._bits).ne(0).reshape(-1)  # little-endian within each byte
        return bits[: self.vocab_size]

    def consume(self, token: int) -> bool:
        """Advance by a sampled token; False if the grammar refuses it (the matcher is then in error)."""
        return bool(self._matcher.consume_token(token))

    @property
    def done(self) -> bool:
        """Nothing can follow: the output is complete."""
        return bool(self._matcher.is_stopped())

    @property
    def error(self) -> str:
        return self._matcher.get_error() if self._matcher.is_error() else ""


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
        """The grammar for `constraint` (cached); StructuredOutputError naming its field if it cannot be."""
        return self._compile(constraint.kind, constraint.spec, constraint.param)

    def _compile_uncached(self, kind: str, spec: str, param: str) -> Grammar:
        import llguidance

        constraint = StructuredOutput(kind, spec, param)
        try:
            if kind == "json_schema":
                text = llguidance.LLMatcher.grammar_from_json_schema(spec, overrides=JSON_OPTIONS)
            elif kind == "json_object":
                text = llguidance.LLMatcher.grammar_from_json_schema('{"type": "object"}', overrides=JSON_OPTIONS)
            else:
                text = llguidance.grammar_from({"regex": "regex", "choice": "choice", "grammar": "grammar"}[kind], spec)
        except (ValueError, TypeError) as exc:
            raise StructuredOutputError(f"{param}: the grammar engine cannot compile it: {exc}", param) from None
        is_error, messages = llguidance.LLMatcher.validate_grammar_with_warnings(text, self.ll_tokenizer)
        if is_error:
            raise StructuredOutputError(f"{param}: the grammar engine cannot compile it: {messages[0]}", param)
        return Grammar(self, text, constraint)


_compilers: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_compilers_lock = threading.Lock()


def compiler_for(tokenizer: Tokenizer, vocab_size: int) -> GrammarCompiler:
    """The compiler of a tokenizer and logits width (one per deployment, made on first use)."""
    with _compilers_lock:
        by_vocab = _compilers.setdefault(tokenizer, {})
        if vocab_size not in by_vocab:
            by_vocab[vocab_size] = GrammarCompiler(tokenizer, vocab_size)
        return by_vocab[vocab_size]
