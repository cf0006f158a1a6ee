"""Token-mask time per decode step of the grammar engines vLLM and SGLang use, on this CPU (issue 24).

    python bench/grammar.py [--steps 64] [--batches 1,16]
    python bench/grammar.py --decode MODEL_DIR [--tokens 32] [--dtype bfloat16]   # decode tok/s, constrained or not

At a 152k-wide vocabulary (a byte-level BPE trained here with Qwen's vocab_size on the corpus of bench/trainedlib, cached
under models/), each engine compiles the constraints agents send (a JSON schema with nested objects, enums and
arrays; any JSON object; a tool call of one of three functions in <tool_call> tags) and walks them: every step
computes the mask of allowed tokens for each sequence of the batch, then each sequence takes a random allowed
token (seeded), so the walk covers the grammar the way a model's output would. Reported: compile time (first,
then cached), mask time per step at batch 1 and 16 (p50 / p99, ms), and for llguidance its parallel batch fill.
xgrammar is measured when importable (`pip install --no-deps xgrammar apache-tvm-ffi` next to torch and
transformers; it is not a dependency of faasmoe). Writes bench/results/grammar.json.

With --decode, what the constraint costs a real decode instead: faasmoe's batched generation (the engine's
sequences and sampler, every expert in process) on MODEL_DIR (e.g. the Qwen1.5-MoE-A2.7B shape of
`faasmoe model init --preset qwen1.5-moe-a2.7b`), greedy, `--tokens` new tokens at batch 1 and 16, without a
constraint and with a JSON schema that cannot end before them (an object holding an array of >= 64 short
strings), the two alternating A B A B; prints tok/s of each and the ratio. Writes bench/results/grammar_decode.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

VOCAB = 151936
SCHEMA = {"type": "object", "properties": {
    "name": {"type": "string", "maxLength": 24},
    "age": {"type": "integer", "minimum": 0, "maximum": 150},
    "role": {"enum": ["admin", "user", "guest"]},
    "address": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 20},
                                                 "zip": {"type": "string", "pattern": "^[0-9]{5}$"}},
                "required": ["city", "zip"], "additionalProperties": False},
    "tags": {"type": "array", "items": {"type": "string", "maxLength": 8}, "maxItems": 4},
    "active": {"type": "boolean"}},
    "required": ["name", "age", "role", "address", "tags", "active"], "additionalProperties": False}


def tool_schema() -> dict:
    def call(name: str, params: dict) -> dict:
        return {"type": "object", "properties": {"name": {"const": name}, "arguments": params},
                "required": ["name", "arguments"], "additionalProperties": False}
    return {"anyOf": [call("get_weather", {"type": "object", "properties": {"city": {"type": "string", "maxLength": 16},
                                                                           "unit": {"enum": ["c", "f"]}},
                                           "required": ["city", "unit"], "additionalProperties": False}),
                      call("add_user", SCHEMA),
                      call("search", {"type": "object", "properties": {"query": {"type": "string", "maxLength": 32},
                                                                      "limit": {"type": "integer", "maximum": 50}},
                                      "required": ["query"], "additionalProperties": False})]}


def tokenizer_152k() -> Path:
    """A byte-level BPE with Qwen's vocabulary size, trained on the corpus (once; ~1-2 min)."""
    out = ROOT / "models" / "bpe-152k"
    if (out / "tokenizer.json").exists():
        return out
    from bench.trainedlib.corpus import documents, domains
    from faasmoe.model.synthetic.tokenizer_files import write_tokenizer_files

    texts = [doc for d in domains() for doc in documents(d, 2_000_000)]
    write_tokenizer_files(out, VOCAB, texts)
    return out


def walk(mask_of, take, matchers: list, steps: int, rng: random.Random, vocab: int) -> list[float]:
    """`steps` decode steps over the batch: the mask time of each step (s); each sequence then takes a random
    allowed token. A finished sequence restarts (the engines' reset), so the batch stays full."""
    times = []
    for _ in range(steps):
        started = time.perf_counter()
        bitmask = mask_of(matchers)  # the engine's work: the packed mask of every sequence
        times.append(time.perf_counter() - started)
        for i, allowed in enumerate(unpack(bitmask)):
            ids = allowed[:vocab].nonzero().flatten().tolist()
            take(matchers, i, rng.choice(ids) if ids else None)
    return times


def unpack(bitmask: torch.Tensor) -> torch.Tensor:
    bits = torch.tensor([1 << i for i in range(32)], dtype=torch.int64)
    return ((bitmask.to(torch.int64)[:, :, None] & bits) != 0).reshape(bitmask.shape[0], -1)


def llguidance_runs(tok_path: Path, constraints: dict, batches: list[int], steps: int) -> dict:
    import llguidance
    import llguidance.torch as llt
    from tokenizers import Tokenizer

    text = (tok_path / "tokenizer.json").read_text()
    eos = Tokenizer.from_str(text).token_to_id("<|im_end|>")
    tokenizer = llguidance.LLTokenizer(text, n_vocab=VOCAB, eos_token=eos)
    executor = llguidance.LLExecutor()
    out = {}
    for name, (kind, spec) in constraints.items():
        started = time.perf_counter()
        grammar = (llguidance.LLMatcher.grammar_from_json_schema(spec, overrides={"whitespace_flexible": False})
                   if kind == "json" else llguidance.LLMatcher.grammar_from_lark(spec))
        first = llguidance.LLMatcher(tokenizer, grammar)
        compile_s = time.perf_counter() - started
        for batch in batches:
            matchers = [llguidance.LLMatcher(tokenizer, grammar) for _ in range(batch)]
            bitmask = llt.allocate_token_bitmask(batch, VOCAB)

            def serial(ms, bitmask=bitmask):
                for i, m in enumerate(ms):
                    llt.fill_next_token_bitmask(m, bitmask, i)
                return bitmask

            def parallel(ms, bitmask=bitmask):
                llt.fill_next_token_bitmask_par(executor, [(m, i) for i, m in enumerate(ms)], bitmask)
                return bitmask

            def take(ms, i, token):
                if token is None or not ms[i].consume_token(token) or ms[i].is_stopped():
                    ms[i].reset()

            for label, fill in (("serial", serial), ("parallel", parallel)):
                if batch == 1 and label == "parallel":
                    continue
                times = walk(fill, take, matchers, steps, random.Random(f"{name}:{batch}"), VOCAB)
                out[f"{name} batch {batch} {label}"] = summary(times, compile_s if batch == batches[0] else None)
        del first
    return out


def xgrammar_runs(tok_path: Path, constraints: dict, batches: list[int], steps: int) -> dict:
    import transformers
    import xgrammar

    hf = transformers.PreTrainedTokenizerFast(tokenizer_file=str(tok_path / "tokenizer.json"))
    info = xgrammar.TokenizerInfo.from_huggingface(hf, vocab_size=VOCAB)
    compiler = xgrammar.GrammarCompiler(info)
    out = {}
    for name, (kind, spec) in constraints.items():
        started = time.perf_counter()
        compiled = (compiler.compile_json_schema(json.dumps(spec), any_whitespace=False) if kind == "json"
                    else compiler.compile_grammar(spec))
        compile_s = time.perf_counter() - started
        for batch in batches:
            matchers = [xgrammar.GrammarMatcher(compiled) for _ in range(batch)]
            bitmask = xgrammar.allocate_token_bitmask(batch, VOCAB)

            def fill(ms, bitmask=bitmask):
                for i, m in enumerate(ms):
                    m.fill_next_token_bitmask(bitmask, i)
                return bitmask

            def take(ms, i, token):
                if token is None or not ms[i].accept_token(token) or ms[i].is_terminated():
                    ms[i].reset()

            times = walk(fill, take, matchers, steps, random.Random(f"{name}:{batch}"), VOCAB)
            out[f"{name} batch {batch} serial"] = summary(times, compile_s if batch == batches[0] else None)
    return out


def summary(times: list[float], compile_s: float | None) -> dict:
    ms = sorted(t * 1000 for t in times)
    return {"mask_ms_p50": statistics.median(ms), "mask_ms_p99": ms[int(0.99 * (len(ms) - 1))],
            "mask_ms_mean": statistics.fmean(ms), "compile_ms": None if compile_s is None else compile_s * 1000}


LONG_SCHEMA = {"type": "object", "properties": {"items": {"type": "array", "minItems": 64, "maxItems": 128,
                                                        "items": {"type": "string", "maxLength": 8}}},
               "required": ["items"], "additionalProperties": False}


def decode(model_dir: Path, tokens: int, dtype: str, batches: list[int], rounds: int = 2) -> dict:
    from faasmoe.engine.offline import generate
    from faasmoe.engine.sampling import SamplingParams
    from faasmoe.engine.structured import StructuredOutput, compiler_for
    from faasmoe.model.moe_model import MoEModel

    model = MoEModel.from_pretrained(model_dir, dtype=getattr(torch, dtype))
    grammar = compiler_for(model.tokenizer, model.config.vocab_size).compile(
        StructuredOutput.json_schema(LONG_SCHEMA, "bench"))
    prompt = model.tokenizer.encode("List the items as JSON.")
    out = {}
    for batch in batches:
        runs: dict[str, list[float]] = {"plain": [], "json schema": []}
        for _ in range(rounds):
            for label, g in (("plain", None), ("json schema", grammar)):
                params = SamplingParams(max_tokens=tokens, temperature=0.0, ignore_eos=True, grammar=g)
                generate(model, [prompt] * batch, params)  # warm: caches, packed weights
                started = time.perf_counter()
                results = generate(model, [prompt] * batch, params)
                took = time.perf_counter() - started
                assert all(len(r.token_ids) == tokens for r in results), "a sequence ended early"
                runs[label].append(batch * tokens / took)
        plain, constrained = statistics.fmean(runs["plain"]), statistics.fmean(runs["json schema"])
        out[f"batch {batch}"] = {"plain_tok_s": runs["plain"], "constrained_tok_s": runs["json schema"],
                                 "ratio": constrained / plain}
        print(f"| {batch} | {' / '.join(f'{x:.2f}' for x in runs['plain'])} | "
              f"{' / '.join(f'{x:.2f}' for x in runs['json schema'])} | {constrained / plain:.3f}x |", flush=True)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=64, help="decode steps per run")
    parser.add_argument("--batches", default="1,16", help="batch sizes")
    parser.add_argument("--decode", type=Path, default=None, metavar="MODEL_DIR",
                        help="measure decode tok/s with and without a constraint on this checkpoint instead")
    parser.add_argument("--tokens", type=int, default=32, help="with --decode: new tokens per sequence")
    parser.add_argument("--dtype", default="bfloat16", help="with --decode: compute dtype")
    args = parser.parse_args()
    batches = [int(b) for b in args.batches.split(",")]
    if args.decode is not None:
        from faasmoe.model.kernels import cpu_isa

        print(f"decode on {args.decode} ({args.dtype}, {cpu_isa()}), {args.tokens} tokens, greedy\n"
              "| batch | tok/s unconstrained (A B A B) | tok/s with a JSON schema | ratio |\n|---|---|---|---|")
        result = {"model": str(args.decode), "dtype": args.dtype, "isa": cpu_isa(), "tokens": args.tokens,
                  "batches": decode(args.decode, args.tokens, args.dtype, batches)}
        out = ROOT / "bench" / "results" / "grammar_decode.json"
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=1))
        return
    tok = tokenizer_152k()
    tool = json.dumps(tool_schema() | {"x-guidance": {"whitespace_flexible": False}})
    constraints = {"json schema": ("json", SCHEMA), "json object": ("json", {"type": "object"}),
                   "tool call": ("lark", f'start: "<tool_call>\\n" %json {tool} "\\n</tool_call>"')}
    from tokenizers import Tokenizer

    from faasmoe.model.kernels import cpu_isa

    print(f"tokenizer: {Tokenizer.from_file(str(tok / 'tokenizer.json')).get_vocab_size()} tokens, logits {VOCAB}")
    results = {"machine": {"cpu": platform.processor() or platform.machine(), "isa": cpu_isa(),
                           "cores": os.cpu_count(), "torch": torch.__version__}, "vocab": VOCAB, "engines": {}}
    results["engines"]["llguidance"] = llguidance_runs(tok, constraints, batches, args.steps)
    try:
        # xgrammar's grammars are EBNF: the tool call is measured as its JSON object alone (the tags are a
        # few fixed tokens either way)
        xgr_constraints = {**constraints, "tool call": ("json", tool_schema())}
        results["engines"]["xgrammar"] = xgrammar_runs(tok, xgr_constraints, batches, args.steps)
    except ImportError as exc:
        results["engines"]["xgrammar"] = f"not measured: {exc}"
    print("| engine | constraint, batch, fill | compile ms | mask p50 ms | mask p99 ms |\n|---|---|---|---|---|")
    for engine, runs in results["engines"].items():
        if isinstance(runs, str):
            print(f"| {engine} | {runs} | | | |")
            continue
        for label, r in runs.items():
            compile_ms = "" if r["compile_ms"] is None else f"{r['compile_ms']:.1f}"
            print(f"| {engine} | {label} | {compile_ms} | {r['mask_ms_p50']:.3f} | {r['mask_ms_p99']:.3f} |")
    out = ROOT / "bench" / "results" / "grammar.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=1))
    print(f"wrote {out.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
