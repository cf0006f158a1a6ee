"""A small MoE with trained routing, made on this machine, and its routing beside published trained MoEs'.

    python bench/trained_model.py [--seconds 720] [--stats-only]

Builds (once; cached under models/trained-qwen2_moe-KEY) a qwen2_moe with 32 routed experts (top-4), a shared
expert, 4 layers and its own byte-level BPE tokenizer, trained on a mixed-domain corpus this machine ships
(Python sources, C headers, man pages in several languages) with a load-balancing loss over the global batch
(bench/trainedlib/train.py). Then measures its routing on held-out documents of each domain
(bench/trainedlib/routing.py): experts of a layer one request touches by 8/32/64/256 tokens, consecutive
tokens' shared top-k, each domain's top-8 share and cold tail, beside a uniform random router and the
published numbers (../shared/WORKLOADS.md). Writes bench/results/trained_routing.json.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.trainedlib.train import DONE, TrainSpec, build, corpus, default_dir  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=TrainSpec.seconds, help="training budget")
    parser.add_argument("--out", type=Path, default=None, help="where the checkpoint goes (default: models/...)")
    parser.add_argument("--requests", type=int, default=24, help="held-out requests per domain for the statistics")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    spec = replace(TrainSpec(), seconds=args.seconds)
    out = args.out or default_dir(ROOT, spec)
    started = time.monotonic()
    path = build(out, spec)
    report = json.loads((path / DONE).read_text())
    print(f"{path}: {report['steps']} steps in {report['train_seconds']:.0f}s of training "
          f"({report['total_seconds']:.0f}s in all, {time.monotonic() - started:.0f}s now); "
          f"loss {report['losses'][0][1]:.2f} -> {report['losses'][-1][1]:.2f}", flush=True)
    from bench.trainedlib.routing import measure, print_table

    held_out = {name: docs for name, (_, docs) in corpus(spec).items()}
    stats = measure(path, held_out, args.requests)
    print_table(stats)
    results = ROOT / "bench" / "results" / "trained_routing.json"
    results.parent.mkdir(parents=True, exist_ok=True)
    results.write_text(json.dumps({"checkpoint": str(path), "spec": asdict(spec), "training": report, "routing": stats},
                                  indent=1))
    print(f"wrote {results.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
