"""What naming expert functions by their content costs: hashing a checkpoint to deploy it, and proving a load.

    python bench/digests.py [--model-dir DIR] [--rounds 3]

Deploy: a frontend hashes every byte of a checkpoint it has not seen (`faasmoe.model.content`,
BLAKE3 over every core), once per file identity; then the digests come from the cache. Measured
three ways on the same files: cold (the files dropped from the page cache first, as after a
download or a reboot), warm (in the page cache), and cached (the digest cache's JSON). The rates
scale to a full Qwen1.5-MoE-A2.7B (28.6 GB in bf16) in the table.

Load: a worker hashes the bytes it reads for a block the first time it reads it from a file
(`ExpertStore._read`, the code a cold invoke runs); a reload from the same unchanged file (same
identity, ctime included) is proven by that first hash. The same blocks are loaded without any proof
(`ExpertLayout.load_block`), proven by hashing (a first load) and proven by an earlier hash (a reload),
warm and cold, alternating, to show what each adds.

Prints a table and writes JSON to bench/results/digests.json. Run it alone: it measures the disk and
both cores.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.dispatch import checkpoint  # noqa: E402
from faasmoe.engine.functions import block_content  # noqa: E402
from faasmoe.model.checkpoint import CheckpointReader, ExpertLayout  # noqa: E402
from faasmoe.model.config import MoEConfig  # noqa: E402
from faasmoe.model.content import CheckpointDigests, DigestCache, ProvenBlocks  # noqa: E402
from faasmoe.model.kernels import cpu_isa  # noqa: E402
from runtime import protocol as p  # noqa: E402
from runtime.policies import make_eviction, make_keep_alive  # noqa: E402
from tests.pagecache import drop_page_cache, page_cache_bytes  # noqa: E402
from worker.memory import ExpertStore, HostCache  # noqa: E402

FULL_MODEL_BYTES = 28.6e9  # Qwen1.5-MoE-A2.7B, bf16 safetensors


def drop(files: list[Path]) -> bool:
    for file in files:
        drop_page_cache(file)
    return all(page_cache_bytes(file) == 0 for file in files)


def deploy(path: Path, files: list[Path], rounds: int) -> dict:
    """Seconds to digest the whole checkpoint: cold, warm, cached."""
    size = sum(f.stat().st_size for f in files)
    out: dict = {"bytes": size, "cold_s": [], "warm_s": [], "cached_s": [], "cold_dropped": True}
    for _ in range(rounds):
        for mode in ("cold", "warm"):
            with tempfile.TemporaryDirectory() as tmp:
                if mode == "cold":
                    out["cold_dropped"] &= drop(files)
                cache = DigestCache(Path(tmp))
                start = time.perf_counter()
                CheckpointDigests.of(CheckpointReader(path), cache)
                out[f"{mode}_s"].append(time.perf_counter() - start)
                assert cache.hashed_bytes == size
                start = time.perf_counter()
                CheckpointDigests.of(CheckpointReader(path), DigestCache(Path(tmp)))  # a restart: from the JSON
                out["cached_s"].append(time.perf_counter() - start)
    for mode in ("cold", "warm"):
        best = min(out[f"{mode}_s"])
        out[f"{mode}_gb_s"] = size / best / 1e9
        out[f"{mode}_full_model_s"] = FULL_MODEL_BYTES / (size / best)
    return out


PROOFS = ("plain", "hashed", "reloaded")  # no proof; a first load, hashed; a reload, proven by that hash


def loads(path: Path, files: list[Path], rounds: int, blocks: int) -> dict:
    """Median seconds to load one expert block, by proof, from a warm and a cold page cache."""
    config = MoEConfig.from_pretrained(path)
    reader = CheckpointReader(path)
    layout = ExpertLayout(reader, config)
    layer = config.moe_layers[0]
    dtype = torch.bfloat16
    with tempfile.TemporaryDirectory() as tmp:
        digests = CheckpointDigests.of(reader, DigestCache(Path(tmp)))
    specs = [p.FunctionSpec(f"bench/{layer}/{e}", str(path), layer, e, 1, "bfloat16",
                            content=block_content(layout, digests, layer, e, 1, dtype)) for e in range(blocks)]
    store = ExpertStore(torch.device("cpu"), 1 << 40, HostCache(0, pin=False), make_eviction("lru"),
                        lambda spec: make_keep_alive("fixed", ttl_s=60))
    times: dict[str, list[float]] = {f"{cache}_{proof}": [] for cache in ("warm", "cold") for proof in PROOFS}
    for _ in range(rounds):
        for cache in ("warm", "cold"):
            for proof in PROOFS:  # alternating: A B C A B C
                if cache == "warm":
                    for spec in specs:
                        layout.load_block(layer, spec.first, 1, dtype)
                else:
                    drop(files)
                if proof == "hashed":
                    store.proven = ProvenBlocks()  # a worker that never read these blocks
                for spec in specs:
                    start = time.perf_counter()
                    if proof == "plain":
                        layout.load_block(layer, spec.first, 1, dtype)
                    else:
                        store._read(spec)
                    times[f"{cache}_{proof}"].append(time.perf_counter() - start)
    out = {k: statistics.median(v) for k, v in times.items()}
    out["block_bytes"] = config.expert_bytes(dtype)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-dir", help="a checkpoint (default: the 1- or 2-layer Qwen1.5-MoE-A2.7B shape)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--blocks", type=int, default=16, help="expert blocks per load round")
    args = parser.parse_args()
    path = checkpoint(args)
    files = sorted(path.glob("*.safetensors"))
    machine = {"cpu": platform.processor() or platform.machine(), "isa": cpu_isa(), "cores": os.cpu_count(),
               "torch": torch.__version__, "load_before": os.getloadavg()[0]}
    print(f"checkpoint {path} ({sum(f.stat().st_size for f in files) / 1e9:.2f} GB), {machine['isa']}, "
          f"{machine['cores']} cores, load {machine['load_before']:.2f}", flush=True)
    d = deploy(path, files, args.rounds)
    rows = [("deploy: hash every byte, cold", f"{min(d['cold_s']):.2f} s", f"{d['cold_gb_s']:.2f} GB/s",
             f"{d['cold_full_model_s']:.0f} s"),
            ("deploy: hash every byte, warm", f"{min(d['warm_s']):.2f} s", f"{d['warm_gb_s']:.2f} GB/s",
             f"{d['warm_full_model_s']:.0f} s"),
            ("deploy: digests from the cache", f"{statistics.median(d['cached_s']) * 1e3:.1f} ms", "", "")]
    print(f"\n{'':34} {'this checkpoint':>16} {'rate':>12} {'28.6 GB model':>14}")
    for row in rows:
        print(f"{row[0]:34} {row[1]:>16} {row[2]:>12} {row[3]:>14}")
    if not d["cold_dropped"]:
        print("(the OS kept some pages: 'cold' is partly warm)")
    ld = loads(path, files, args.rounds, args.blocks)
    print(f"\none expert block ({ld['block_bytes'] / 2**20:.1f} MiB bf16), median of {args.rounds * args.blocks}:")
    for cache in ("warm", "cold"):
        plain, hashed, reloaded = (ld[f"{cache}_{proof}"] for proof in PROOFS)
        print(f"  {cache:5} page cache: no proof {plain * 1e3:6.2f} ms · hashed (first load) {hashed * 1e3:6.2f} ms "
              f"({hashed / plain:.2f}x) · proven before (reload) {reloaded * 1e3:6.2f} ms ({reloaded / plain:.2f}x)")
    out = ROOT / "bench" / "results" / "digests.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"machine": machine, "checkpoint": str(path), "deploy": d, "loads": ld,
                               "time": time.time()}, indent=1))
    print(f"\nwrote {out.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
