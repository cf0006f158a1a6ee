"""Text layer: tokenizer, chat template and streaming detokenization for Hugging Face model dirs.

Behaviour follows transformers (v5) on the same directory, so prompts and outputs match the
reference: `encode` equals `AutoTokenizer.encode`, `apply_chat_template` renders like
`apply_chat_template(..., tokenize=False)`.
"""

from __future__ import annotations

import json
import logging
from datetime import datetime
from functools import cached_property
from pathlib import Path
from typing import Any

import jinja2
import jinja2.ext
import tokenizers
from jinja2.sandbox import ImmutableSandboxedEnvironment

logger = logging.getLogger(__name__)

# The named special tokens transformers passes to chat templates (its SPECIAL_TOKENS_ATTRIBUTES).
_NAMED_SPECIAL_TOKENS = (
    "bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token"
)
_REPLACEMENT_CHAR = "\ufffd"


def _token_content(value: Any) -> str | None:
    """HF configs store a special token as a string or as an AddedToken dict {"content": ...}."""
    if isinstance(value, dict):
        return value.get("content")
    return value if isinstance(value, str) else None


def _read_json(path: Path) -> dict:
    if not path.is_file():
        return {}
    with open(path, encoding="utf-8") as f:
        return json.load(f)


class _GenerationTag(jinja2.ext.Extension):
    """Accept `{% generation %}…{% endgeneration %}` (used for assistant masks) and render its body as is."""

    tags = {"generation"}

    def parse(self, parser: Any) -> jinja2.nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_render_body"), [], [], body).set_lineno(lineno)

    def _render_body(self, caller: Any) -> str:
        return caller()


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(
    x: Any, ensure_ascii: bool = False, indent: Any = None, separators: Any = None, sort_keys: bool = False
) -> str:
    # Jinja's own tojson escapes HTML characters; chat templates expect plain json.dumps.
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


def compile_chat_template(source: str) -> jinja2.Template:
    """Compile a chat template in the same sandboxed environment transformers uses."""
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationTag, jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env.from_string(source)


class Tokenizer:
    """A model's tokenizer (tokenizer.json via `tokenizers`) plus its special tokens and chat template."""

    def __init__(
        self,
        backend: tokenizers.Tokenizer,
        config: dict | None = None,
        generation_config: dict | None = None,
        chat_template: str | None = None,
        source: Path | None = None,
    ) -> None:
        self._backend = backend
        self._config = config or {}
        self._source = source
        self.chat_template = chat_template
        self.special_tokens: dict[str, str] = {
            name: content
            for name in _NAMED_SPECIAL_TOKENS
            if (content := _token_content(self._config.get(name))) is not None
        }
        self.bos_token = self.special_tokens.get("bos_token")
        self.eos_token = self.special_tokens.get("eos_token")
        self.pad_token = self.special_tokens.get("pad_token")
        # Encoding must not inherit truncation/padding saved in tokenizer.json (transformers clears them too).
        # BOS/EOS come from tokenizer.json's post-processor alone: transformers v5 ignores the config's
        # add_bos_token/add_eos_token whenever a tokenizer.json exists.
        backend.no_truncation()
        backend.no_padding()
        backend.encode_special_tokens = bool(self._config.get("split_special_tokens", False))
        self._eos_ids = self._collect_eos_ids(generation_config or {})

    @classmethod
    def from_pretrained(cls, model_dir: str | Path) -> Tokenizer:
        """Load tokenizer.json, tokenizer_config.json and generation_config.json from a model dir."""
        model_dir = Path(model_dir)
        tok_path = model_dir / "tokenizer.json"
        if not tok_path.is_file():
            raise FileNotFoundError(f"no tokenizer.json in {model_dir} (expected {tok_path})")
        backend = tokenizers.Tokenizer.from_file(str(tok_path))
        config = _read_json(model_dir / "tokenizer_config.json")
        template = config.get("chat_template")
        if isinstance(template, list):  # older multi-template format: [{"name", "template"}, ...]
            named = {t.get("name"): t.get("template") for t in template}
            template = named.get("default")
        jinja_path = model_dir / "chat_template.jinja"
        if jinja_path.is_file():  # newer HF repos keep the template in its own file, which wins
            template = jinja_path.read_text(encoding="utf-8")
        return cls(
            backend,
            config=config,
            generation_config=_read_json(model_dir / "generation_config.json"),
            chat_template=template,
            source=model_dir,
        )

    def _collect_eos_ids(self, generation_config: dict) -> frozenset[int]:
        ids = generation_config.get("eos_token_id")
        found = set(ids if isinstance(ids, list) else [] if ids is None else [ids])
        if self.eos_token is not None and (eos_id := self._backend.token_to_id(self.eos_token)) is not None:
            found.add(eos_id)
        return frozenset(int(i) for i in found)

    @property
    def backend(self) -> tokenizers.Tokenizer:
        """The underlying `tokenizers.Tokenizer`."""
        return self._backend

    @property
    def eos_token_ids(self) -> frozenset[int]:
        """Ids that end generation: generation_config's eos_token_id(s) and the config's eos token."""
        return self._eos_ids

    @property
    def pad_token_id(self) -> int | None:
        return None if self.pad_token is None else self._backend.token_to_id(self.pad_token)

    @property
    def bos_token_id(self) -> int | None:
        return None if self.bos_token is None else self._backend.token_to_id(self.bos_token)

    @property
    def vocab_size(self) -> int:
        """Number of tokens including added/special ones (transformers' `len(tokenizer)`)."""
        return self._backend.get_vocab_size(with_added_tokens=True)

    def token_to_id(self, token: str) -> int | None:
        return self._backend.token_to_id(token)

    def id_to_token(self, token_id: int) -> str | None:
        return self._backend.id_to_token(token_id)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of text; special tokens written in the text map to their ids."""
        # encode_batch releases the GIL while it works (encode holds it: a long prompt tokenized in a
        # thread would still stall the event loop); a batch of one gives the same ids.
        return self._backend.encode_batch([text], add_special_tokens=add_special_tokens)[0].ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        """Text of ids (ids outside the vocabulary decode to nothing)."""
        # No clean_up_tokenization_spaces: transformers v5 ignores it for BPE, which every family here uses.
        return self._backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    @cached_property
    def _compiled_template(self) -> jinja2.Template:
        if not self.chat_template:
            where = self._source / "tokenizer_config.json" if self._source else "the tokenizer config"
            raise ValueError(f"no chat_template in {where}; this model has no chat format, use completions")
        return compile_chat_template(self.chat_template)

    def apply_chat_template(
        self, messages: list[dict], add_generation_prompt: bool = True, **extra: Any
    ) -> str:
        """Render messages to the prompt string, as transformers' apply_chat_template(tokenize=False)."""
        if not messages:
            raise ValueError("cannot apply a chat template to an empty conversation")
        # transformers drops None-valued keys (OpenAI clients send content=None, tool_calls=None).
        chat = [{k: v for k, v in dict(m).items() if v is not None} for m in messages]
        variables = {**self.special_tokens, **extra}
        variables.setdefault("tools", None)
        variables.setdefault("documents", None)
        return self._compiled_template.render(
            messages=chat, add_generation_prompt=add_generation_prompt, **variables
        )


class IncrementalDetokenizer:
    """Turns a stream of token ids into text deltas that never end inside a UTF-8 character.

    Like vLLM/TGI: decode a small window from `prefix` (context, so leading-space rules apply as in
    a full decode) and emit what it adds past the already-emitted `read` point. The streamed text
    equals a full decode for byte-level BPE; with SentencePiece byte fallback it does for valid
    UTF-8, but a stray invalid byte token may differ (ByteFallback blanks its whole byte run).
    """

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = True) -> None:
        self._tokenizer = tokenizer
        self._skip = skip_special_tokens
        self._ids: list[int] = []
        self._prefix = 0  # window start: context tokens whose text was already emitted
        self._read = 0  # tokens before this are fully emitted
        self._prefix_text = ""  # decode(ids[prefix:read])
        self._held = 0  # chars past prefix_text already emitted while the window ends incomplete
        self._pieces: list[str] = []

    def _decode(self, ids: list[int]) -> str:
        return self._tokenizer.decode(ids, skip_special_tokens=self._skip)

    def push(self, token_id: int) -> str:
        """Add one token id; return the newly completed text (possibly empty)."""
        self._ids.append(token_id)
        text = self._decode(self._ids[self._prefix :])
        # Only a trailing run of U+FFFD can change with later bytes (an incomplete character);
        # everything before it is final and can go out now.
        stable = text.rstrip(_REPLACEMENT_CHAR)
        start = len(self._prefix_text) + self._held
        delta = stable[start:]
        self._held += len(delta)
        if len(stable) == len(text) and len(text) > len(self._prefix_text):
            # Clean character boundary: slide the window so each step decodes only a few tokens.
            self._prefix, self._read = self._read, len(self._ids)
            self._prefix_text = self._decode(self._ids[self._prefix : self._read])
            self._held = 0
        if delta:
            self._pieces.append(delta)
        return delta

    def flush(self) -> str:
        """Return whatever is still held back (end of stream); an unfinished character stays U+FFFD."""
        text = self._decode(self._ids[self._prefix :])
        delta = text[len(self._prefix_text) + self._held :]
        self._prefix = self._read = len(self._ids)
        self._prefix_text = ""
        self._held = 0
        if delta:
            self._pieces.append(delta)
        return delta

    @property
    def text(self) -> str:
        """All text emitted so far."""
        return "".join(self._pieces)

    @property
    def token_ids(self) -> list[int]:
        return list(self._ids)
