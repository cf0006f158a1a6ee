"""Text layer: our tokenizer, chat template and streaming detokenizer against transformers."""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import pytest
import tokenizers
import tokenizers.processors

from faasmoe.model.synthetic.tokenizer_files import SPECIAL_TOKENS, write_tokenizer_files
from faasmoe.model.tokenizer import IncrementalDetokenizer, Tokenizer

transformers = pytest.importorskip("transformers")

TEXTS = [
    "Hello world! The quick brown fox jumps over the lazy dog.",
    "def add(a: int, b: int) -> int:\n    return a + b\n\n\n",
    "  leading and   inner   spaces\t\ttabs\r\nwindows lines  ",
    "Café, naïve, résumé, Zürich — crème brûlée. e\u0301 (decomposed, NFC-normalised)",
    "你好，世界！今天天气很好。こんにちは。안녕하세요.",
    "emoji 😀🚀 👩‍💻 🇫🇷 ❤️ 🧠🔥✨ and 🦀 (not in the corpus)",
    "<|im_start|>user\nhi there<|im_end|>\n<|im_start|>assistant\nhello<|endoftext|>",
    "It's 2024; we've 3.14159 reasons. I'll go, they're here.",
    "",
]

CHAT = [
    {"role": "user", "content": "Write a haiku about experts 🤖"},
    {"role": "assistant", "content": "Idle experts sleep,\nwoken by a single token —\n寒い朝に。"},
    {"role": "user", "content": "Now one in French, s'il vous plaît."},
]


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("tok")
    write_tokenizer_files(out, 512)
    return out


@pytest.fixture(scope="module")
def tok(tok_dir: Path) -> Tokenizer:
    return Tokenizer.from_pretrained(tok_dir)


@pytest.fixture(scope="module")
def hf(tok_dir: Path):
    return transformers.AutoTokenizer.from_pretrained(str(tok_dir))


@pytest.mark.parametrize("text", TEXTS)
def test_encode_matches_transformers(tok: Tokenizer, hf, text: str) -> None:
    assert tok.encode(text) == hf.encode(text)
    assert tok.encode(text, add_special_tokens=False) == hf.encode(text, add_special_tokens=False)


@pytest.mark.parametrize("text", TEXTS)
def test_decode_round_trips(tok: Tokenizer, hf, text: str) -> None:
    ids = tok.encode(text)
    expected = text.replace("e\u0301", "é")  # the NFC normalizer composes it
    assert tok.decode(ids, skip_special_tokens=False) == expected
    assert tok.decode(ids, skip_special_tokens=True) == hf.decode(ids, skip_special_tokens=True)


def test_special_tokens(tok: Tokenizer, tok_dir: Path, hf) -> None:
    ids = write_tokenizer_files(tok_dir, 512)
    assert set(ids) == set(SPECIAL_TOKENS)
    assert {t: tok.token_to_id(t) for t in SPECIAL_TOKENS} == ids
    assert tok.eos_token_ids == frozenset({ids["<|im_end|>"]}) == frozenset({hf.eos_token_id})
    assert tok.pad_token_id == ids["<|endoftext|>"] == hf.pad_token_id
    assert tok.bos_token_id is None
    assert tok.vocab_size == len(hf) <= 512
    assert tok.encode("<|im_end|>") == [ids["<|im_end|>"]]


@pytest.mark.parametrize("add_generation_prompt", [True, False])
@pytest.mark.parametrize("with_system", [True, False])
def test_chat_template_matches_transformers(
    tok: Tokenizer, hf, add_generation_prompt: bool, with_system: bool
) -> None:
    chat = ([{"role": "system", "content": "Be brief."}] if with_system else []) + CHAT
    ours = tok.apply_chat_template(chat, add_generation_prompt=add_generation_prompt)
    ref = hf.apply_chat_template(chat, tokenize=False, add_generation_prompt=add_generation_prompt)
    assert ours == ref
    assert ours.startswith("<|im_start|>system\n")
    assert ours.endswith("<|im_start|>assistant\n") == add_generation_prompt
    assert tok.encode(ours) == hf.encode(ours)


def test_custom_chat_template_features_match_transformers(tok_dir: Path, tmp_path: Path) -> None:
    # Exercises what real templates use: tojson on non-ASCII/HTML text, namespace, loop controls,
    # raise_exception, the {% generation %} tag, None-valued keys and dict-form special tokens.
    template = (
        "{{ bos_token }}{% set ns = namespace(n=0) %}"
        "{% if tools %}<tools>{{ tools | tojson }}</tools>\n{% endif %}"
        "{% for m in messages %}"
        "  {% if m['role'] not in ['system', 'user', 'assistant'] %}{{ raise_exception('bad role') }}{% endif %}"
        "  {% if m['role'] == 'system' %}{% continue %}{% endif %}"
        "  {% set ns.n = ns.n + 1 %}"
        "  {% if m['role'] == 'assistant' %}{% generation %}{{ m['content'] }}{{ eos_token }}{% endgeneration %}"
        "  {% else %}[{{ ns.n }}] {{ m['content'] }}{% if m.tool_calls is defined %}!{% endif %}\n{% endif %}"
        "{% endfor %}{% if add_generation_prompt %}>>{% endif %}"
    )
    d = tmp_path / "custom"
    shutil.copytree(tok_dir, d)
    cfg = json.loads((d / "tokenizer_config.json").read_text())
    cfg["chat_template"] = template
    cfg["bos_token"] = {"__type": "AddedToken", "content": "<|endoftext|>", "lstrip": False, "normalized": False, "rstrip": False,
                        "single_word": False, "special": True}
    (d / "tokenizer_config.json").write_text(json.dumps(cfg))
    tools = [{"type": "function", "function": {"name": "f", "description": "<b>größe</b> & 日本"}}]
    chat = [{"role": "system", "content": "s"}, {"role": "user", "content": "a<b>", "tool_calls": None}] + CHAT
    ours = Tokenizer.from_pretrained(d)
    ref = transformers.AutoTokenizer.from_pretrained(str(d))
    for gen in (True, False):
        expected = ref.apply_chat_template(chat, tools=tools, tokenize=False, add_generation_prompt=gen)
        assert ours.apply_chat_template(chat, add_generation_prompt=gen, tools=tools) == expected
    assert '"<b>größe</b> & 日本"' in expected
    with pytest.raises(Exception, match="bad role"):
        ours.apply_chat_template([{"role": "tool", "content": "x"}])


def test_generation_config_eos_and_bos(tok_dir: Path, tmp_path: Path) -> None:
    eot, im_start, im_end = (Tokenizer.from_pretrained(tok_dir).token_to_id(t) for t in SPECIAL_TOKENS)
    d = tmp_path / "bos"
    shutil.copytree(tok_dir, d)
    cfg = json.loads((d / "tokenizer_config.json").read_text())
    cfg["bos_token"] = {"__type": "AddedToken", "content": "<|im_start|>", "special": True}
    cfg["add_bos_token"] = True
    (d / "tokenizer_config.json").write_text(json.dumps(cfg))
    # As in Llama/Mixtral files, the BOS comes from tokenizer.json's post-processor.
    backend = tokenizers.Tokenizer.from_file(str(d / "tokenizer.json"))
    backend.post_processor = tokenizers.processors.TemplateProcessing(
        single="<|im_start|> $A", pair="<|im_start|> $A <|im_start|> $B", special_tokens=[("<|im_start|>", im_start)]
    )
    backend.save(str(d / "tokenizer.json"))
    (d / "generation_config.json").write_text(json.dumps({"eos_token_id": [eot, 7]}))
    ours = Tokenizer.from_pretrained(d)
    ref = transformers.AutoTokenizer.from_pretrained(str(d))
    assert ours.eos_token_ids == frozenset({eot, 7, im_end})
    for text in TEXTS[:3]:
        assert ours.encode(text) == ref.encode(text)
        assert ours.encode(text)[0] == im_start
        assert ours.encode(text, add_special_tokens=False) == ref.encode(text, add_special_tokens=False)
    assert ours.bos_token_id == im_start
    (d / "generation_config.json").write_text(json.dumps({"eos_token_id": eot}))
    assert Tokenizer.from_pretrained(d).eos_token_ids == frozenset({eot, im_end})


def _stream(tok: Tokenizer, ids: list[int], skip: bool = True) -> tuple[list[str], str]:
    detok = IncrementalDetokenizer(tok, skip_special_tokens=skip)
    deltas = [detok.push(i) for i in ids]
    tail = detok.flush()
    assert detok.text == "".join(deltas) + tail
    return deltas, tail


@pytest.mark.parametrize("text", TEXTS + ["🎉🎊🎈🦄🐉🌈💫⭐🌙☀️🍕🍣🍜 日本語のテキストと絵文字😀を混ぜる 🇯🇵🇰🇷"])
def test_incremental_detokenizer_matches_full_decode(tok: Tokenizer, text: str) -> None:
    ids = tok.encode(text)
    for skip in (True, False):
        deltas, tail = _stream(tok, ids, skip)
        assert "".join(deltas) + tail == tok.decode(ids, skip_special_tokens=skip)
        assert all("\ufffd" not in d for d in deltas + [tail])
        assert tail == ""  # valid text is fully released by the last push


def test_incremental_detokenizer_handles_split_characters(tok: Tokenizer) -> None:
    text = "🦀🦀 中文 ☃ 😀"
    ids = tok.encode(text)
    # The test is only meaningful if some single token is half a character.
    assert any("\ufffd" in tok.decode([i]) for i in ids)
    deltas, _ = _stream(tok, ids)
    assert "".join(deltas) == text
    assert "" in deltas  # output was held back at least once


def test_incremental_detokenizer_on_random_ids(tok: Tokenizer) -> None:
    # A random model emits arbitrary byte tokens, invalid UTF-8 and out-of-vocab ids included.
    rng = random.Random(0)
    ids = [rng.randrange(tok.vocab_size + 8) for _ in range(600)]
    deltas, tail = _stream(tok, ids)
    assert "".join(deltas) + tail == tok.decode(ids)


def test_incremental_detokenizer_decodes_small_windows(tok: Tokenizer, monkeypatch: pytest.MonkeyPatch) -> None:
    sizes: list[int] = []
    real = tok.decode

    def counting_decode(ids: list[int], skip_special_tokens: bool = True) -> str:
        sizes.append(len(ids))
        return real(ids, skip_special_tokens)

    monkeypatch.setattr(tok, "decode", counting_decode)
    ids = tok.encode(" ".join(TEXTS) * 4)
    deltas, tail = _stream(tok, ids)
    assert "".join(deltas) + tail == real(ids)
    assert len(ids) > 300 and max(sizes) <= 8


def test_missing_files_give_clear_errors(tok_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "tokenizer.json")):
        Tokenizer.from_pretrained(tmp_path)
    d = tmp_path / "no_template"
    d.mkdir()
    shutil.copy(tok_dir / "tokenizer.json", d / "tokenizer.json")
    plain = Tokenizer.from_pretrained(d)  # tokenizer_config.json is optional for encode/decode
    assert plain.decode(plain.encode("hi")) == "hi"
    with pytest.raises(ValueError, match="tokenizer_config.json"):
        plain.apply_chat_template(CHAT)


def test_write_tokenizer_files_is_deterministic(tmp_path: Path) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    assert write_tokenizer_files(a, 512) == write_tokenizer_files(b, 512)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        assert (a / name).read_bytes() == (b / name).read_bytes()


@pytest.mark.parametrize("vocab_size", [300, 512, 151936])
def test_vocab_fits_vocab_size(tmp_path: Path, vocab_size: int) -> None:
    ids = write_tokenizer_files(tmp_path, vocab_size)
    tok = Tokenizer.from_pretrained(tmp_path)
    assert tok.vocab_size <= vocab_size
    assert max(ids.values()) == tok.vocab_size - 1
    assert all(tok.token_to_id(t) is not None for t in (chr(0x100 + 32), "Ġ", "Ċ"))  # byte tokens present
    if vocab_size < 10_000:
        assert tok.vocab_size == vocab_size  # small sizes are filled with merges
    hf = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
    assert tok.encode(TEXTS[5]) == hf.encode(TEXTS[5])


def test_vocab_size_too_small_is_rejected(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="vocab_size"):
        write_tokenizer_files(tmp_path, 200)


def test_incremental_detokenizer_with_sentencepiece_style_byte_fallback() -> None:
    # Llama/Mixtral tokenizers: "▁" for spaces, <0xXX> byte-fallback tokens (one U+FFFD per stray
    # byte, not per character) and a decoder that strips the first leading space.
    from tokenizers import decoders, models, normalizers

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    vocab.update({f"<0x{b:02X}>": 3 + b for b in range(256)})
    for piece in ["▁", "a", "b", "c", "▁a", "▁b", "ab", "▁ab", "é", "▁é"]:
        vocab[piece] = len(vocab)
    merges = [("▁", "a"), ("▁", "b"), ("a", "b"), ("▁a", "b"), ("▁", "é")]
    backend = tokenizers.Tokenizer(
        models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", byte_fallback=True, fuse_unk=True)
    )
    backend.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    backend.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    backend.add_special_tokens(["<s>", "</s>"])
    tok = Tokenizer(backend, config={"bos_token": "<s>", "eos_token": "</s>"})
    text = "ab é 你好 😀 c 🦀ab"
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    deltas, tail = _stream(tok, ids)
    assert "".join(deltas) + tail == text and tail == ""
    assert all("\ufffd" not in d for d in deltas)
    # Random ids here are only checked not to fail: ByteFallback turns a whole run of byte tokens
    # into U+FFFDs once one byte in it is invalid, so no bounded window can match a full decode.
    rng = random.Random(1)
    _stream(tok, [rng.randrange(tok.vocab_size) for _ in range(400)])
