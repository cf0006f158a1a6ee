"""The clients users already run, driven against a real `faasmoe serve`: what works in each.

    make bench-compat                          # or: python bench/compat.py
    python bench/compat.py --only lm-eval,vllm-bench
    python bench/compat.py --ttft-rounds 3 --ttft-prompts 32

The heavy clients are installed on first use into their own virtualenv, `.venv-compat/` at the repo
root (git-ignored), and reused after: lm-evaluation-harness, guidellm, litellm, langchain-openai,
instructor and openai-agents,
over torch 2.13's CPU build (installed first, or lm-eval pulls a multi-GB CUDA torch). `vllm bench
serve` is vLLM's own client from `.venv-vllm/` (bench/peer.py's installer builds it when missing).
The light ones (the openai SDK, prometheus_client's parser) run from `.venv`, as in the test suite;
promtool and curl are used when on PATH (promtool is Debian's `prometheus` package).

One `faasmoe serve` (one worker process, warm experts) serves the tiny qwen2_moe checkpoint that
`make run` builds (models/tiny-qwen2_moe, built if missing). Then, one client at a time:
* openai 3.x: completions with `echo` + `logprobs` as lm-eval sends them, sync and async, chat
  streaming, the Responses API (plain and streamed), the models list;
* langchain-openai (`invoke`, `stream`, `ainvoke`, `astream`, `use_responses_api`, `with_structured_output`,
  `bind_tools`) and litellm (`completion`, streamed, `acompletion`, `text_completion`, `response_format` with a
  pydantic model, `tools` with `tool_choice="required"`) with model `openai/<name>`;
* instructor (`response_model` in TOOLS and JSON_SCHEMA modes) and the OpenAI Agents SDK (a Runner whose agent
  must call a function tool first, and one with a pydantic `output_type`): issue 24's agent clients;
* lm-eval `local-completions` on a loglikelihood multiple-choice task (bench/compat/mc_tiny.yaml over
  the rows of mc_tiny.jsonl; lm-eval runs in that folder because `data_files` is relative), with
  the checkpoint's tokenizer (`tokenizer_backend=huggingface`), at lm-eval's default batch size 1
  and again with `--batch_size 4` (one request carrying several prompts);
* `vllm bench serve` with `--backend openai` (completions), `openai-chat` and `openai-responses` on
  the same random dataset (long prompts, so prefill dominates TTFT), in alternating rounds; chat's
  TTFT must equal completions' within noise (a stream that sent its first chunk before prefill
  reported a TTFT of a few ms);
* guidellm: a synchronous run on completions and one on chat completions;
* prometheus_client's parser and `promtool check metrics` on `/metrics`; curl streaming a chat.
A client that fails is a row that says how (never dropped). Prints a markdown table (client |
version | what works | command), writes JSON to bench/results/compat.json and each client's output
to bench/results/compat-logs/.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib.metadata
import json
import math
import os
import random
import re
import shutil
import statistics
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(0, str(ROOT))

import peer  # noqa: E402  (bench/peer.py: vLLM's installer, one server at a time, logging)
from peer import log  # noqa: E402

COMPAT_VENV = ROOT / ".venv-compat"
TORCH_SPEC = "torch==2.13.0"  # the CPU build (a wheel on disk here); lm-eval would otherwise pull CUDA torch
COMPAT_SPECS = ("lm_eval==0.4.13", "guidellm==0.8.1", "litellm==1.110.2", "langchain-openai==1.7.4",
                "instructor==1.17.0", "openai-agents==0.24.0")
TASK_DIR = ROOT / "bench" / "compat"
TASK = "faasmoe_mc_tiny"
MODEL = ROOT / "models" / "tiny-qwen2_moe"  # the checkpoint `make run` builds
CLIENTS = ("openai", "langchain-openai", "litellm", "instructor", "openai-agents", "lm-eval", "vllm-bench", "guidellm",
           "prometheus", "curl")
OFFLINE = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "DO_NOT_TRACK": "1",
           "OPENAI_API_KEY": "sk-none", "LITELLM_LOCAL_MODEL_COST_MAP": "True", "TOKENIZERS_PARALLELISM": "false"}


class ClientFailed(RuntimeError):
    """A client exited non-zero or did not do what it should; the message says what it printed."""


# --- the clients' virtualenv ------------------------------------------------------------------------


def ensure_compat_venv() -> None:
    """Install (once) the heavy clients into .venv-compat; a marker holds the specs it was built with."""
    marker = COMPAT_VENV / ".compat-ready"
    wanted = "\n".join((TORCH_SPEC, *COMPAT_SPECS)) + "\n"
    python = COMPAT_VENV / "bin" / "python"
    if marker.exists() and marker.read_text() == wanted and python.exists():
        log(f"reusing {COMPAT_VENV.name}/")
        return
    start = time.monotonic()
    if not python.exists():
        peer._run_step(f"creating {COMPAT_VENV.name}/", [getattr(sys, "_base_executable", sys.executable), "-m",
                                                         "venv", COMPAT_VENV])
    peer._run_step(f"pip install {TORCH_SPEC} into {COMPAT_VENV.name}/", [python, "-m", "pip", "install", TORCH_SPEC],
                   COMPAT_VENV / "pip-torch.log")
    peer._run_step(f"pip install {' '.join(COMPAT_SPECS)} into {COMPAT_VENV.name}/ (a few minutes; log in "
                   f"{COMPAT_VENV.name}/pip-install.log)", [python, "-m", "pip", "install", TORCH_SPEC, *COMPAT_SPECS],
                   COMPAT_VENV / "pip-install.log")
    marker.write_text(wanted)
    log(f"{COMPAT_VENV.name}/ ready after {time.monotonic() - start:.0f} s")


def version_in(venv: Path, dist: str) -> str:
    try:
        return subprocess.check_output([str(venv / "bin" / "python"), "-c",
                                        f"import importlib.metadata as m; print(m.version({dist!r}))"],
                                       text=True, timeout=120).strip()
    except (subprocess.SubprocessError, OSError):
        return "-"


def run_client(name: str, argv: list[str], logs: Path, *, cwd: Path = ROOT, env: dict[str, str] | None = None,
               timeout: float = 1200) -> str:
    """Run one client to its end; its output goes to logs/NAME.log and is returned. Non-zero exit: ClientFailed."""
    start = time.monotonic()
    log(f"{name}: {Path(argv[0]).name} {argv[1] if len(argv[1]) < 40 else '-c SCRIPT'} ...")
    try:
        proc = subprocess.run(argv, cwd=cwd, env={**os.environ, **OFFLINE, **(env or {})}, capture_output=True,
                              text=True, timeout=timeout)
    except subprocess.TimeoutExpired as exc:
        out = (exc.stdout or b"").decode(errors="replace") if isinstance(exc.stdout, bytes) else exc.stdout or ""
        (logs / f"{name}.log").write_text(out)
        raise ClientFailed(f"timed out after {timeout:.0f} s; last output:\n{out[-1500:]}") from None
    out = proc.stdout + proc.stderr
    (logs / f"{name}.log").write_text(out)
    log(f"{name}: exit {proc.returncode} after {time.monotonic() - start:.0f} s")
    if proc.returncode != 0:
        raise ClientFailed(f"exit {proc.returncode}: " + _error_lines(out))
    return out


def _error_lines(out: str, keep: int = 3) -> str:
    """What went wrong, from a client's output: its last error lines and the server's error message, if any."""
    lines = [line.strip() for line in out.splitlines() if line.strip()]
    hits = [line for line in lines if re.search(r"Error|Exception|HTTP|status", line)
            and not line.startswith(("File ", "raise ", "^")) and "leaked" not in line]
    said = re.findall(r'"error": \{"message": "((?:[^"\\]|\\.)*)"', out)
    text = " | ".join((hits or lines)[-keep:])[-800:]
    return f"{text} | the server said: {said[-1]}" if said else text


def checks_row(name: str, version: str, results: dict[str, str], command: str, **details) -> dict:
    """A row from named sub-checks, each "ok" or the error it raised."""
    ok = [check for check, result in results.items() if result == "ok"]
    failed = {check: result for check, result in results.items() if result != "ok"}
    works = ", ".join(ok) or "nothing"
    if failed:
        works += "; FAILS: " + "; ".join(f"{check} ({msg[:300]})" for check, msg in failed.items())
    return {"client": name, "version": version, "ok": not failed, "works": works, "command": command,
            "checks": results, **details}


# --- the light clients, from this venv --------------------------------------------------------------


def check_openai(url: str, model: str, logs: Path) -> dict:
    import openai

    results: dict[str, str] = {}

    def check(name: str, fn: Callable[[], None]) -> None:
        try:
            fn()
            results[name] = "ok"
        except Exception as exc:  # every failure is a finding to report
            results[name] = f"{type(exc).__name__}: {exc}"

    client = openai.OpenAI(base_url=url + "/v1", api_key="sk-none", max_retries=0, timeout=120)
    ids = list(range(10, 30))

    def echo_logprobs() -> None:
        out = client.completions.create(model=model, prompt=[ids], echo=True, logprobs=1, max_tokens=1, temperature=0,
                                        seed=1234)
        lp = out.choices[0].logprobs
        assert len(lp.token_logprobs) == len(ids) + 1, f"{len(lp.token_logprobs)} logprobs for {len(ids)} + 1 tokens"
        assert lp.token_logprobs[0] is None and all(x <= 0 for x in lp.token_logprobs[1:])
        assert all(len(top) >= 1 for top in lp.top_logprobs[1:])

    def completion_stream() -> None:
        chunks = list(client.completions.create(model=model, prompt="Hello", max_tokens=8, stream=True))
        assert chunks and chunks[-1].choices[0].finish_reason

    def chat_stream() -> None:
        chunks = list(client.chat.completions.create(model=model, messages=[{"role": "user", "content": "Hi"}],
                                                     max_tokens=8, stream=True,
                                                     stream_options={"include_usage": True}))
        assert chunks[0].choices[0].delta.role == "assistant" and chunks[-1].usage.completion_tokens == 8

    async def async_chat() -> None:
        async with openai.AsyncOpenAI(base_url=url + "/v1", api_key="sk-none", max_retries=0) as c:
            out = await c.chat.completions.create(model=model, messages=[{"role": "user", "content": "Hi"}], max_tokens=4)
            assert out.usage.completion_tokens == 4
            stream = await c.chat.completions.create(model=model, messages=[{"role": "user", "content": "Hi"}],
                                                     max_tokens=4, stream=True)
            assert [chunk async for chunk in stream]

    def responses() -> None:
        out = client.responses.create(model=model, input="Hi", instructions="Be brief.", max_output_tokens=8)
        assert out.usage.output_tokens >= 1
        events = [e.type for e in client.responses.create(model=model, input="Hi", max_output_tokens=8, stream=True)]
        assert events[0] == "response.created" and events[-1] in ("response.completed", "response.incomplete")

    def models() -> None:
        assert model in [m.id for m in client.models.list()]

    check("completions echo+logprobs (lm-eval's request)", echo_logprobs)
    check("completions streaming", completion_stream)
    check("chat streaming", chat_stream)
    check("async chat + stream", lambda: asyncio.run(async_chat()))
    check("responses.create (+stream)", responses)
    check("models.list", models)
    (logs / "openai.log").write_text(json.dumps(results, indent=2))
    return checks_row("openai", openai.__version__, results, "in `python bench/compat.py` (and `make test`: "
                      "tests/frontend/test_clients.py)")


def check_metrics(url: str, logs: Path) -> list[dict]:
    import prometheus_client
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(url + "/metrics", timeout=60) as response:
        text = response.read().decode()
    (logs / "metrics.txt").write_text(text)
    rows = []
    try:
        families = list(text_string_to_metric_families(text))
        samples = sum(len(f.samples) for f in families)
        rows.append({"client": "prometheus_client parser", "version": importlib.metadata.version("prometheus_client"),
                     "ok": True, "works": f"/metrics parses: {len(families)} families, {samples} samples",
                     "command": "`text_string_to_metric_families(GET /metrics)`"})
    except Exception as exc:  # a parse error is the finding
        rows.append({"client": "prometheus_client parser", "version": prometheus_client.__version__, "ok": False,
                     "works": f"FAILS: {type(exc).__name__}: {exc}", "command": "text_string_to_metric_families"})
    promtool = shutil.which("promtool")
    if promtool is None:
        rows.append({"client": "promtool", "version": "-", "ok": None, "works": "not run: promtool is not on PATH "
                     "(Debian: `apt-get install prometheus`)", "command": "`curl -s $URL/metrics | promtool check metrics`"})
        return rows
    version = subprocess.run([promtool, "--version"], capture_output=True, text=True).stdout.split("\n")[0]
    proc = subprocess.run([promtool, "check", "metrics"], input=text, capture_output=True, text=True, timeout=60)
    lint = (proc.stdout + proc.stderr).strip()
    (logs / "promtool.log").write_text(lint)
    rows.append({"client": "promtool check metrics", "version": version.split()[2] if len(version.split()) > 2 else version,
                 "ok": proc.returncode == 0 and not lint,
                 "works": "no lint" if proc.returncode == 0 and not lint else f"FAILS: exit {proc.returncode}: {lint[:600]}",
                 "command": "`curl -s $URL/metrics | promtool check metrics`"})
    return rows


def check_curl(url: str, model: str, logs: Path) -> dict:
    body = json.dumps({"model": model, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 8,
                       "stream": True})
    argv = ["curl", "-sN", "--fail-with-body", url + "/v1/chat/completions", "-H", "Content-Type: application/json",
            "-d", body]
    out = run_client("curl", argv, logs, timeout=120)
    events = [line for line in out.splitlines() if line.startswith("data: ")]
    ok = bool(events) and events[-1] == "data: [DONE]" and len(events) >= 3
    return {"client": "curl", "version": subprocess.check_output(["curl", "--version"], text=True).split()[1],
            "ok": ok, "works": f"streamed chat: {len(events)} SSE events ending in `data: [DONE]`" if ok else
            f"FAILS: {out[-500:]}", "command": "`curl -sN $URL/v1/chat/completions -d '{..., \"stream\": true}'`"}


# --- langchain-openai and litellm, from .venv-compat ------------------------------------------------

# What both client scripts start with: argv, and check() recording each call's outcome.
CHECKS_PRELUDE = r"""
import asyncio, json, sys
url, model = sys.argv[1], sys.argv[2]
results = {}
def check(name, fn):
    try:
        fn(); results[name] = "ok"
    except Exception as exc:
        results[name] = f"{type(exc).__name__}: {exc}"
# What agents ask for (issue 24): a bounded object (a random model must be able to finish it) and a tool.
from typing import Annotated
import pydantic
class Ticket(pydantic.BaseModel):
    title: str = pydantic.Field(max_length=12)
    priority: int = pydantic.Field(ge=1, le=5)
    urgent: bool
def get_weather(city: Annotated[str, pydantic.StringConstraints(max_length=10)]) -> str:
    'The weather in a city.'
    return "sunny"
"""

LANGCHAIN = CHECKS_PRELUDE + r"""
from langchain_openai import ChatOpenAI
llm = ChatOpenAI(base_url=url + "/v1", api_key="sk-none", model=model, max_tokens=8, max_retries=0)
def invoke():
    assert llm.invoke("Hi").usage_metadata["output_tokens"] == 8
def stream():
    assert list(llm.stream("Hi"))
async def ainvoke():
    assert (await llm.ainvoke("Hi")).usage_metadata["output_tokens"] == 8
async def astream():
    assert [c async for c in llm.astream("Hi")]
async def both():  # one event loop: the model caches its async HTTP client, bound to the loop that made it
    for name, fn in (("ainvoke", ainvoke), ("astream", astream)):
        try:
            await fn(); results[name] = "ok"
        except Exception as exc:
            results[name] = f"{type(exc).__name__}: {exc}"
def responses():
    r = ChatOpenAI(base_url=url + "/v1", api_key="sk-none", model=model, max_tokens=8, max_retries=0,
                   use_responses_api=True)
    assert r.invoke("Hi").usage_metadata["output_tokens"] >= 1
    assert list(r.stream("Hi"))
def structured():
    big = ChatOpenAI(base_url=url + "/v1", api_key="sk-none", model=model, max_tokens=300, max_retries=0)
    assert isinstance(big.with_structured_output(Ticket).invoke("File a ticket."), Ticket)
def tools():
    big = ChatOpenAI(base_url=url + "/v1", api_key="sk-none", model=model, max_tokens=300, max_retries=0)
    from langchain_core.tools import tool
    calls = big.bind_tools([tool(get_weather)], tool_choice="any").invoke("Weather in Oslo?").tool_calls
    assert calls and calls[0]["name"] == "get_weather" and isinstance(calls[0]["args"]["city"], str)
check("invoke", invoke)
check("stream", stream)
asyncio.run(both())
check("use_responses_api (invoke, stream)", responses)
check("with_structured_output(pydantic)", structured)
check("bind_tools(tool_choice='any')", tools)
print("RESULTS " + json.dumps(results))
"""

LITELLM = CHECKS_PRELUDE + r"""
import litellm
kw = dict(model="openai/" + model, api_base=url + "/v1", api_key="sk-none", max_tokens=8)
msgs = [{"role": "user", "content": "Hi"}]
def completion():
    assert litellm.completion(messages=msgs, **kw).usage.completion_tokens == 8
def stream():
    assert list(litellm.completion(messages=msgs, stream=True, **kw))
async def acompletion():
    assert (await litellm.acompletion(messages=msgs, **kw)).usage.completion_tokens == 8
def text_completion():
    assert litellm.text_completion(prompt="Hello", **kw).choices[0].text is not None
check("completion", completion)
check("completion stream", stream)
check("acompletion", lambda: asyncio.run(acompletion()))
def structured():
    out = litellm.completion(messages=[{"role": "user", "content": "A ticket."}], response_format=Ticket,
                             **{**kw, "max_tokens": 300})
    Ticket.model_validate_json(out.choices[0].message.content)
def tools():
    spec = {"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object", "properties": {
        "city": {"type": "string", "maxLength": 10}}, "required": ["city"]}}}
    out = litellm.completion(messages=[{"role": "user", "content": "Oslo?"}], tools=[spec], tool_choice="required",
                             **{**kw, "max_tokens": 300})
    assert json.loads(out.choices[0].message.tool_calls[0].function.arguments)["city"] is not None
check("text_completion", text_completion)
check("response_format=pydantic", structured)
check("tools, tool_choice=required", tools)
print("RESULTS " + json.dumps(results))
"""

INSTRUCTOR = CHECKS_PRELUDE + r"""
import instructor, openai
client = openai.OpenAI(base_url=url + "/v1", api_key="sk-none", max_retries=0)
def mode(m):
    def run():
        ticket = instructor.from_openai(client, mode=m).chat.completions.create(
            model=model, response_model=Ticket, max_retries=0, max_tokens=300,
            messages=[{"role": "user", "content": "File a ticket."}])
        assert isinstance(ticket, Ticket)
    return run
check("response_model, Mode.TOOLS", mode(instructor.Mode.TOOLS))
check("response_model, Mode.JSON_SCHEMA", mode(instructor.Mode.JSON_SCHEMA))
print("RESULTS " + json.dumps(results))
"""

AGENTS = CHECKS_PRELUDE + r"""
import openai
from agents import Agent, ModelSettings, OpenAIChatCompletionsModel, Runner, function_tool, set_tracing_disabled
set_tracing_disabled(True)
chat = OpenAIChatCompletionsModel(model=model, openai_client=openai.AsyncOpenAI(base_url=url + "/v1", api_key="sk-none"))
def tool_then_answer():  # the first turn must call the tool; the SDK then lets the model answer
    agent = Agent(name="a", model=chat, tools=[function_tool(get_weather)],
                  model_settings=ModelSettings(tool_choice="required", max_tokens=200))
    result = Runner.run_sync(agent, "Weather in Oslo?", max_turns=4)
    assert any(getattr(i, "type", "") == "tool_call_item" for i in result.new_items), result.new_items
def output_type():
    agent = Agent(name="b", model=chat, output_type=Ticket, model_settings=ModelSettings(max_tokens=300))
    assert isinstance(Runner.run_sync(agent, "File a ticket.", max_turns=2).final_output, Ticket)
check("Runner with a function tool (tool_choice=required)", tool_then_answer)
check("output_type=pydantic", output_type)
print("RESULTS " + json.dumps(results))
"""


def check_script(name: str, dist: str, script: str, url: str, model: str, logs: Path, command: str) -> dict:
    out = run_client(name, [str(COMPAT_VENV / "bin" / "python"), "-c", script, url, model], logs, timeout=600)
    line = next((line for line in reversed(out.splitlines()) if line.startswith("RESULTS ")), None)
    if line is None:
        raise ClientFailed("no results printed: " + _error_lines(out))
    return checks_row(name, version_in(COMPAT_VENV, dist), json.loads(line.removeprefix("RESULTS ")), command)


# --- lm-evaluation-harness ----------------------------------------------------------------------------


def check_lm_eval(url: str, model: str, model_dir: Path, logs: Path, batch_size: int) -> dict:
    name = "lm-eval" if batch_size == 1 else f"lm-eval-batch{batch_size}"
    out_dir = logs / f"{name}-results"
    shutil.rmtree(out_dir, ignore_errors=True)
    model_args = (f"model={model},base_url={url}/v1/completions,tokenizer_backend=huggingface,"
                  f"tokenizer={model_dir},num_concurrent=1,max_retries=1")
    argv = [str(COMPAT_VENV / "bin" / "lm_eval"), "--model", "local-completions", "--model_args", model_args,
            "--include_path", ".", "--tasks", TASK, "--output_path", str(out_dir)]
    if batch_size != 1:
        argv += ["--batch_size", str(batch_size)]
    shown = ("`cd bench/compat && lm_eval --model local-completions --model_args model=$MODEL,"
             "base_url=$URL/v1/completions,tokenizer_backend=huggingface,tokenizer=$MODEL_DIR --include_path . "
             f"--tasks {TASK}" + (f" --batch_size {batch_size}" if batch_size != 1 else "") + "`")
    label = "lm-evaluation-harness" + ("" if batch_size == 1 else f" (--batch_size {batch_size})")
    version = version_in(COMPAT_VENV, "lm_eval")
    start = time.monotonic()
    try:
        run_client(name, argv, logs, cwd=TASK_DIR, timeout=900)
    except ClientFailed as exc:
        return {"client": label, "version": version, "ok": False, "works": f"FAILS: {exc}", "command": shown}
    result_file = max(out_dir.rglob("results_*.json"), key=lambda p: p.stat().st_mtime)
    results = json.loads(result_file.read_text())
    scores = results["results"][TASK]
    rows = results["n-samples"][TASK]["effective"]
    requests = sum(len(json.loads(line)["choices"]) for line in (TASK_DIR / "mc_tiny.jsonl").read_text().splitlines()
                   if line.strip())
    elapsed = time.monotonic() - start
    return {"client": label, "version": version, "ok": True,
            "works": f"`local-completions` loglikelihood multiple choice ({rows} questions, {requests} requests): "
                     f"finished, acc {scores['acc,none']:.3f}, acc_norm {scores['acc_norm,none']:.3f} (random weights: "
                     f"chance is 0.25)",
            "command": shown, "accuracy": scores["acc,none"], "acc_norm": scores["acc_norm,none"], "questions": rows,
            "seconds": elapsed}


# --- vllm bench serve -------------------------------------------------------------------------------

VLLM_BACKENDS = {"openai": "/v1/completions", "openai-chat": "/v1/chat/completions", "openai-responses": "/v1/responses"}


def vllm_bench(url: str, model: str, model_dir: Path, logs: Path, backend: str, args: argparse.Namespace,
               round_no: int) -> dict:
    name = f"vllm-bench-{backend}-{round_no}"
    argv = [str(peer.VLLM_VENV / "bin" / "vllm"), "bench", "serve", "--backend", backend, "--endpoint",
            VLLM_BACKENDS[backend], "--base-url", url, "--model", model, "--tokenizer", str(model_dir),
            "--dataset-name", "random", "--random-input-len", str(args.ttft_input_len), "--random-output-len",
            str(args.ttft_output_len), "--num-prompts", str(args.ttft_prompts), "--max-concurrency", "1",
            "--num-warmups", "2", "--ignore-eos", "--seed", str(args.seed), "--disable-tqdm", "--save-result",
            "--save-detailed", "--result-dir", str(logs), "--result-filename", f"{name}.json"]
    (logs / f"{name}.json").unlink(missing_ok=True)
    run_client(name, argv, logs, env=peer.vllm_env(), timeout=900)
    result = json.loads((logs / f"{name}.json").read_text())
    if result.get("failed") or not result.get("completed"):
        raise ClientFailed(f"{result.get('failed')} of {args.ttft_prompts} requests failed: "
                           f"{[e for e in result.get('errors', []) if e][:3]}")
    return {k: result.get(k) for k in ("completed", "failed", "total_input_tokens", "total_output_tokens",
                                       "mean_ttft_ms", "median_ttft_ms", "std_ttft_ms", "p99_ttft_ms", "mean_tpot_ms",
                                       "median_itl_ms", "ttfts")}


def mean_ci(values: list[float]) -> tuple[float, float]:
    """Mean and its standard error."""
    return statistics.fmean(values), (statistics.stdev(values) / math.sqrt(len(values)) if len(values) > 1 else 0.0)


def median_difference(a: list[float], b: list[float], resamples: int = 2000, seed: int = 0) -> tuple[float, float, float]:
    """median(a) - median(b) and its 95% bootstrap interval (medians: a neighbour's job on a shared machine
    puts a few requests far out in the tail, which moves the means)."""
    rng = random.Random(seed)
    diffs = sorted(statistics.median(rng.choices(a, k=len(a))) - statistics.median(rng.choices(b, k=len(b)))
                   for _ in range(resamples))
    return statistics.median(a) - statistics.median(b), diffs[int(0.025 * resamples)], diffs[int(0.975 * resamples)]


def check_vllm_bench(url: str, model: str, model_dir: Path, logs: Path, args: argparse.Namespace) -> list[dict]:
    version = peer.ensure_vllm()
    runs: dict[str, list[dict]] = {b: [] for b in VLLM_BACKENDS}
    errors: dict[str, str] = {}
    for round_no in range(args.ttft_rounds):
        # Alternating, in reversed order every other round, so drift on a shared machine hits each backend alike.
        for backend in list(VLLM_BACKENDS)[::-1 if round_no % 2 else 1]:
            if backend in errors:
                continue
            try:
                runs[backend].append(vllm_bench(url, model, model_dir, logs, backend, args, round_no))
            except (ClientFailed, OSError, json.JSONDecodeError) as exc:
                errors[backend] = str(exc)
    ttfts = {b: [t * 1000 for run in r for t in (run.get("ttfts") or [])] for b, r in runs.items()}
    base = ttfts["openai"]
    rows = []
    for backend, endpoint in VLLM_BACKENDS.items():
        shown = (f"`vllm bench serve --backend {backend} --endpoint {endpoint} --base-url $URL --model $MODEL "
                 f"--tokenizer $MODEL_DIR --dataset-name random --random-input-len {args.ttft_input_len} "
                 f"--random-output-len {args.ttft_output_len} --max-concurrency 1 --ignore-eos`")
        label = f"vllm bench serve --backend {backend}"
        if backend in errors:
            rows.append({"client": label, "version": version, "ok": False, "works": f"FAILS: {errors[backend]}",
                         "command": shown})
            continue
        values = ttfts[backend]
        mean, se = mean_ci(values)
        median = statistics.median(values)
        tpot = statistics.fmean(run["mean_tpot_ms"] for run in runs[backend])
        works = (f"{len(values)} requests of {args.ttft_input_len} random tokens -> {args.ttft_output_len}: TTFT "
                 f"median {median:.0f} ms, mean {mean:.0f} +- {se:.0f} ms (s.e.), TPOT {tpot:.1f} ms")
        row = {"client": label, "version": version, "ok": True, "works": works, "command": shown,
               "ttft_median_ms": median, "ttft_mean_ms": mean, "ttft_se_ms": se, "tpot_ms": tpot,
               "rounds": [{k: v for k, v in run.items() if k != "ttfts"} for run in runs[backend]], "ttfts_ms": values}
        if backend != "openai" and base:
            diff, low, high = median_difference(values, base, seed=args.seed)
            base_median = statistics.median(base)
            # Within noise: the 95% interval of the difference of the medians holds 0, or the difference is under
            # 10% of completions' TTFT. A stream that sent its first chunk before prefill measured a few ms.
            same = low <= 0 <= high or abs(diff) <= 0.10 * base_median
            row["vs_completions"] = {"median_diff_ms": diff, "ci95_ms": [low, high], "ratio_median": median / base_median,
                                     "equal_within_noise": same}
            row["ok"] = same
            row["works"] += (f"; vs completions: medians {diff:+.1f} ms (95% CI {low:+.1f} .. {high:+.1f}), "
                             f"{median / base_median:.2f}x: " + ("equal within noise" if same else "DIFFERENT"))
        rows.append(row)
    return rows


# --- guidellm -----------------------------------------------------------------------------------------


def check_guidellm(url: str, model: str, model_dir: Path, logs: Path, args: argparse.Namespace) -> list[dict]:
    version = version_in(COMPAT_VENV, "guidellm")
    rows = []
    for request_format in ("/v1/completions", "/v1/chat/completions"):
        name = f"guidellm-{request_format.strip('/').replace('/', '-')}"
        out = logs / f"{name}.json"
        out.unlink(missing_ok=True)
        data = f"kind=synthetic_text,prompt_tokens={args.guidellm_prompt_tokens},output_tokens={args.guidellm_output_tokens}"
        argv = [str(COMPAT_VENV / "bin" / "guidellm"), "run", "--backend",
                f"kind=openai_http,target={url},model={model},request_format={request_format}",
                "--profile", "kind=synchronous", "--constraint", f"kind=max_requests,count={args.guidellm_requests}",
                "--tokenizer", f"kind=huggingface_auto,model={model_dir}", "--data", data,
                "--output", f"kind=json,path={out}", "--disable-console-interactive"]
        shown = (f"`guidellm run --backend kind=openai_http,target=$URL,model=$MODEL,request_format={request_format} "
                 f"--profile kind=synchronous --constraint kind=max_requests,count={args.guidellm_requests} "
                 f"--tokenizer kind=huggingface_auto,model=$MODEL_DIR --data {data}`")
        label = f"guidellm ({request_format.removeprefix('/v1/')})"
        try:
            run_client(name, argv, logs, timeout=600)
            metrics = json.loads(out.read_text())["benchmarks"][0]["metrics"]
            totals = metrics["request_totals"]
            ok_count, errored, incomplete = totals["successful"], totals.get("errored", 0), totals.get("incomplete", 0)
            ttft = metrics["time_to_first_token_ms"]["successful"]["median"]
            itl = metrics["inter_token_latency_ms"]["successful"]["median"]
            tok_s = metrics["output_tokens_per_second"]["successful"]["mean"]
            out_tok = metrics["output_token_count"]["successful"]["median"]
            # guidellm sometimes sends one request fewer than max_requests (its scheduler stops early): not a failure
            works = (f"synchronous, {ok_count} of {totals['total']} requests ok: TTFT median {ttft:.0f} ms, ITL median "
                     f"{itl:.1f} ms, {tok_s:.0f} output tok/s, {out_tok:.0f} output tokens per request")
            bad = errored or incomplete or not ok_count
            rows.append({"client": label, "version": version, "ok": not bad,
                         "works": works if not bad else f"FAILS: {errored} errored, {incomplete} incomplete; " + works,
                         "command": shown, "request_totals": totals,
                         "ttft_median_ms": ttft, "itl_median_ms": itl, "output_tok_s": tok_s})
        except (ClientFailed, OSError, KeyError, IndexError, json.JSONDecodeError) as exc:
            rows.append({"client": label, "version": version, "ok": False,
                         "works": f"FAILS: {type(exc).__name__}: {exc}", "command": shown})
    return rows


# --- the table ----------------------------------------------------------------------------------------


def table(rows: list[dict]) -> str:
    lines = ["| client | version | what works | command |", "|---|---|---|---|"]
    for row in rows:
        cells = [row["client"], row["version"], row["works"], row["command"]]
        lines.append("| " + " | ".join(str(c).replace("|", "\\|").replace("\n", " ") for c in cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-dir", help=f"checkpoint to serve; default: {MODEL.relative_to(ROOT)} (built if missing)")
    parser.add_argument("--only", help=f"comma-separated clients, of: {', '.join(CLIENTS)}")
    parser.add_argument("--ttft-rounds", type=int, default=3, help="alternating rounds of the vllm bench backends")
    parser.add_argument("--ttft-prompts", type=int, default=16, help="requests per vllm bench run (one at a time)")
    parser.add_argument("--ttft-input-len", type=int, default=1024)
    parser.add_argument("--ttft-output-len", type=int, default=16)
    parser.add_argument("--guidellm-requests", type=int, default=8)
    parser.add_argument("--guidellm-prompt-tokens", type=int, default=128)
    parser.add_argument("--guidellm-output-tokens", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "compat.json"))
    args = parser.parse_args()
    clients = [c.strip() for c in args.only.split(",")] if args.only else list(CLIENTS)
    unknown = sorted(set(clients) - set(CLIENTS))
    if unknown:
        parser.error(f"--only: unknown client(s) {', '.join(unknown)}; choose from {', '.join(CLIENTS)}")

    started = time.monotonic()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    logs = out.parent.resolve() / "compat-logs"
    logs.mkdir(exist_ok=True)
    if set(clients) & {"langchain-openai", "litellm", "instructor", "openai-agents", "lm-eval", "guidellm"}:
        ensure_compat_venv()
    if "vllm-bench" in clients:
        peer.ensure_vllm()
    model_dir = Path(args.model_dir).resolve() if args.model_dir else MODEL
    if not (model_dir / "config.json").exists():
        peer._run_step(f"building {model_dir} (faasmoe model init)",
                       [sys.executable, "-m", "faasmoe.cli", "model", "init", str(model_dir), "--family", "qwen2_moe",
                        "--preset", "tiny", "--seed", "0"])

    rows: list[dict] = []
    report = {"date": time.strftime("%Y-%m-%d %H:%M"), "checkpoint": str(model_dir.relative_to(ROOT)
              if model_dir.is_relative_to(ROOT) else model_dir), "args": vars(args), "rows": rows}

    def save() -> None:
        out.write_text(json.dumps(report, indent=2, default=str))

    def attempt(name: str, fn: Callable[[], dict | list[dict]]) -> None:
        if name not in clients:
            return
        try:
            got = fn()
        except Exception as exc:  # a client that breaks is a row, never a crash of the rest
            got = {"client": name, "version": "-", "ok": False, "works": f"FAILS: {type(exc).__name__}: {exc}",
                   "command": "-"}
        rows.extend(got if isinstance(got, list) else [got])
        save()

    # The server as bench/peer.py starts it: one worker process, warm experts, state in a temp dir.
    server_args = argparse.Namespace(server_log=False, out=str(out), vllm_kv_gib=1)
    with peer.serving("faasmoe", model_dir, "float32", server_args) as server:
        url, model = server.url, server.model
        log(f"faasmoe serve {model_dir.name} ready at {url} as {model!r} in {server.ready_s:.0f} s")
        attempt("openai", lambda: check_openai(url, model, logs))
        attempt("langchain-openai", lambda: check_script(
            "langchain-openai", "langchain-openai", LANGCHAIN, url, model, logs,
            "`ChatOpenAI(base_url=$URL/v1, model=$MODEL).invoke/stream/ainvoke/astream`, `use_responses_api=True`"))
        attempt("litellm", lambda: check_script(
            "litellm", "litellm", LITELLM, url, model, logs,
            "`litellm.completion(model=\"openai/$MODEL\", api_base=$URL/v1, ...)`, `stream=True`, `acompletion`, "
            "`text_completion`"))
        attempt("instructor", lambda: check_script(
            "instructor", "instructor", INSTRUCTOR, url, model, logs,
            "`instructor.from_openai(OpenAI(base_url=$URL/v1), mode=...).chat.completions.create(response_model=...)`"))
        attempt("openai-agents", lambda: check_script(
            "openai-agents", "openai-agents", AGENTS, url, model, logs,
            "`Runner.run_sync(Agent(model=OpenAIChatCompletionsModel(...), tools=[...] or output_type=...), ...)`"))
        attempt("lm-eval", lambda: check_lm_eval(url, model, model_dir, logs, batch_size=1))
        attempt("lm-eval", lambda: check_lm_eval(url, model, model_dir, logs, batch_size=4))
        attempt("vllm-bench", lambda: check_vllm_bench(url, model, model_dir, logs, args))
        attempt("guidellm", lambda: check_guidellm(url, model, model_dir, logs, args))
        attempt("prometheus", lambda: check_metrics(url, logs))
        attempt("curl", lambda: check_curl(url, model, logs))
        with contextlib.suppress(Exception):
            report["server_version"] = json.loads(urllib.request.urlopen(url + "/version", timeout=10).read())
        (logs / "faasmoe-serve.log").write_text(server.proc.output)

    report["elapsed_s"] = time.monotonic() - started
    save()
    failed = [r["client"] for r in rows if r.get("ok") is False]
    print(f"\nfaasmoe serve {model_dir.name} (one worker), {report['date']}, {report['elapsed_s'] / 60:.1f} min; "
          f"$URL is the server, $MODEL its model name, $MODEL_DIR the checkpoint\n")
    print(table(rows))
    print(f"\n{len(rows) - len(failed)} of {len(rows)} rows work" + (f"; failing: {', '.join(failed)}" if failed else ""))
    print(f"wrote {out}; client output in {logs}")


if __name__ == "__main__":
    main()
