"""Write a small, real byte-level BPE tokenizer (Qwen2-style) into a model directory.

`faasmoe model init` uses this so a freshly generated checkpoint loads with both our
`faasmoe.text.Tokenizer` and transformers' `AutoTokenizer`, offline and deterministically.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable
from pathlib import Path

from tokenizers import (
    AddedToken,
    Regex,
    Tokenizer,
    decoders,
    models,
    normalizers,
    pre_tokenizers,
    processors,
    trainers,
)

logger = logging.getLogger(__name__)

SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
MODEL_MAX_LENGTH = 32768

# The split regex of Qwen2's tokenizer: transformers' Qwen2Tokenizer rebuilds its pipeline with
# this exact pattern, so using it here keeps our tokenizer.json and AutoTokenizer in agreement.
PRETOKENIZE_REGEX = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
)

# ChatML as Qwen uses it (a default system message when none is given), with tools the Qwen2.5 way: the
# functions listed in the system turn, calls in <tool_call> tags (the hermes parser's format), results
# in <tool_response> tags. Without tools or tool messages it renders exactly Qwen1.5's template.
CHAT_TEMPLATE = (
    "{%- set system = messages[0]['content'] if messages[0]['role'] == 'system' else 'You are a helpful assistant.' %}"
    "{%- if tools %}"
    "{{ '<|im_start|>system\\n' + system + '\\n\\n# Tools\\n\\nThese functions can be called. Their signatures, "
    "one per line, between <tools> and </tools>:\\n<tools>' }}"
    "{%- for tool in tools %}{{ '\\n' + (tool | tojson) }}{%- endfor %}"
    "{{ '\\n</tools>\\n\\nTo call one, answer with its name and arguments as JSON between <tool_call> and "
    "</tool_call>:\\n<tool_call>\\n{\\\"name\\\": <function name>, \\\"arguments\\\": <arguments object>}\\n</tool_call>"
    "<|im_end|>\\n' }}"
    "{%- elif messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- for message in messages %}"
    "{%- if message['role'] == 'system' %}"
    "{%- if not tools %}{{ '<|im_start|>system\\n' + message['content'] + '<|im_end|>\\n' }}{%- endif %}"
    "{%- elif message['role'] == 'assistant' and message['tool_calls'] is defined %}"
    "{{ '<|im_start|>assistant\\n' + message['content'] }}"
    "{%- for call in message['tool_calls'] %}"
    "{{ ('\\n' if message['content'] or not loop.first else '') + '<tool_call>\\n{\\\"name\\\": \\\"' "
    "+ call['function']['name'] + '\\\", \\\"arguments\\\": ' + "
    "(call['function']['arguments'] if call['function']['arguments'] is string "
    "else call['function']['arguments'] | tojson) + '}\\n</tool_call>' }}"
    "{%- endfor %}"
    "{{ '<|im_end|>\\n' }}"
    "{%- elif message['role'] == 'tool' %}"
    "{{ '<|im_start|>user\\n<tool_response>\\n' + message['content'] + '\\n</tool_response><|im_end|>\\n' }}"
    "{%- else %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{%- endif %}"
)

# Training text: English prose, chat turns, code and multi-byte text (accents, CJK, emoji), so
# that merges cover common words and some multi-byte characters also span several byte tokens.
CORPUS = [
    "The quick brown fox jumps over the lazy dog. The dog sleeps; the fox runs away into the forest.",
    "A mixture of experts routes each token to a few experts. Only the experts that are used stay"
    " resident in memory, and the others scale to zero when they are idle.",
    "Serverless functions start cold, load their weights, answer requests and are evicted when the"
    " memory budget is full. The scheduler decides where each function runs.",
    "Hello! How are you today? I am fine, thank you. What would you like to talk about?",
    "Can you explain how attention works in a transformer model? Each token attends to the previous"
    " tokens with a softmax over scaled dot products of queries and keys.",
    "Once upon a time there was a little robot who wanted to learn how to paint the sky at sunset.",
    "It's a good day, isn't it? We're going to the market, and they'll be there too. I've seen it.",
    "The numbers are 0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 42, 100, 2024 and 3.14159.",
    "user: write a function that adds two numbers\nassistant: Here is a Python function:\n",
    "def add(a: int, b: int) -> int:\n    \"\"\"Return the sum of a and b.\"\"\"\n    return a + b\n",
    "import torch\nimport torch.nn as nn\n\nclass Expert(nn.Module):\n"
    "    def __init__(self, hidden_size: int, intermediate_size: int) -> None:\n"
    "        super().__init__()\n"
    "        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=False)\n"
    "        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=False)\n"
    "        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)\n\n"
    "    def forward(self, x: torch.Tensor) -> torch.Tensor:\n"
    "        return self.down_proj(nn.functional.silu(self.gate_proj(x)) * self.up_proj(x))\n",
    "for i in range(10):\n    if i % 2 == 0:\n        print(f\"even {i}\")\n    else:\n        continue\n",
    "function greet(name) {\n  return `Hello, ${name}!`;\n}\nconsole.log(greet(\"world\"));\n",
    "#include <stdio.h>\nint main(void) {\n    printf(\"hello, world\\n\");\n    return 0;\n}\n",
    "SELECT name, count(*) FROM users WHERE active = 1 GROUP BY name ORDER BY name;",
    '{"model": "tiny", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 16}',
    "Café, naïve, résumé, über, São Paulo, Zürich, façade, jalapeño, crème brûlée, El Niño.",
    "Les élèves étudient à l'école. Der Bär läuft über die Straße. ¿Dónde está la estación?",
    "Привет, как дела? Это тест. Ελληνικά γράμματα: α β γ δ ε. שלום עולם. مرحبا بالعالم.",
    "你好，世界！今天天气很好。我们一起学习机器学习和人工智能。专家混合模型很有趣。",
    "こんにちは世界。東京は大きな都市です。ありがとうございます。",
    "안녕하세요. 만나서 반갑습니다. 한국어 텍스트입니다.",
    "Emoji: 😀 😃 😄 😁 🚀 🎉 ❤️ 👍 🤖 🧠 🌍 🔥 ✨ 👩‍💻 🇫🇷 — and symbols: € £ ¥ © ® ™ ∑ ∞ ≈ ≠ ≤ ≥ → ←.",
    "Math: α + β = γ, ∫ f(x) dx, √2 ≈ 1.414, π ≈ 3.14, e^{iπ} + 1 = 0.",
]


def _corpus_lines() -> list[str]:
    # A few repetitions make frequent pairs clearly frequent without growing the stored text.
    return CORPUS * 3


def _build_tokenizer(vocab_size: int, lines: Iterable[str] | None = None) -> Tokenizer:
    tok = Tokenizer(models.BPE(unk_token=None, fuse_unk=False, byte_fallback=False))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    # Specials are added after training so they take the last ids, as in Qwen's vocabulary.
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size - len(SPECIAL_TOKENS),
        min_frequency=2,
        show_progress=False,
        initial_alphabet=sorted(pre_tokenizers.ByteLevel.alphabet()),
        special_tokens=[],
    )
    tok.train_from_iterator(_corpus_lines() if lines is None else lines, trainer=trainer)
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    return tok


def _tokenizer_config(special_ids: dict[str, int]) -> dict:
    return {
        "add_bos_token": False,
        "add_prefix_space": False,
        "added_tokens_decoder": {
            str(special_ids[t]): {
                "content": t,
                "lstrip": False,
                "normalized": False,
                "rstrip": False,
                "single_word": False,
                "special": True,
            }
            for t in SPECIAL_TOKENS
        },
        "additional_special_tokens": ["<|im_start|>", "<|im_end|>"],
        "bos_token": None,
        "chat_template": CHAT_TEMPLATE,
        "clean_up_tokenization_spaces": False,
        "eos_token": "<|im_end|>",
        "errors": "replace",
        "model_max_length": MODEL_MAX_LENGTH,
        "pad_token": "<|endoftext|>",
        "split_special_tokens": False,
        "tokenizer_class": "Qwen2Tokenizer",
        "unk_token": None,
    }


def write_tokenizer_files(out_dir: Path, vocab_size: int, corpus: Iterable[str] | None = None) -> dict[str, int]:
    """Write tokenizer.json and tokenizer_config.json into out_dir; return the special token ids.

    The whole vocabulary (256 byte tokens, merges, specials) fits in vocab_size; merges stop
    earlier when the corpus (the small embedded one unless `corpus` is given) supports no more, so
    large vocab sizes leave unused ids.
    """
    min_size = 256 + len(SPECIAL_TOKENS)
    if vocab_size < min_size:
        raise ValueError(f"vocab_size must be >= {min_size} (256 byte tokens + specials), got {vocab_size}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tok = _build_tokenizer(vocab_size, corpus)
    special_ids = {t: tok.token_to_id(t) for t in SPECIAL_TOKENS}
    size = tok.get_vocab_size(with_added_tokens=True)
    if size > vocab_size:  # the trainer's budget already excludes the specials; keep the promise explicit
        raise AssertionError(f"tokenizer vocab {size} exceeds vocab_size {vocab_size}")
    (out_dir / "tokenizer.json").write_text(tok.to_str(pretty=True), encoding="utf-8")
    config = _tokenizer_config(special_ids)
    (out_dir / "tokenizer_config.json").write_text(
        json.dumps(config, indent=2, ensure_ascii=False) + "\n", encoding="utf-8"
    )
    logger.info("wrote tokenizer (%d tokens, vocab_size %d) to %s", size, vocab_size, out_dir)
    return special_ids
