"""A base and its tenants' expert-specialised fine-tunes (ESFT) on one pool: what content-named functions hold.

    python bench/shared.py [--family qwen2_moe] [--tenants 2] [--tuned-experts 1] [--block-size 1]
    python bench/shared.py --trained [--tenants 4] [--tune-seconds 45]

With --trained, the base is bench/trained_model.py's checkpoint (trained routing, its own tokenizer) and
each tenant's fine-tune is made as ESFT makes it (bench/trainedlib/esft.py: the experts with the highest
token selection ratio on the tenant's domain, top_p 0.2, trained on that domain); each model is prompted
with held-out text of its tenant's domain.

Builds a base checkpoint (`faasmoe model init`, the tiny preset unless --preset) and --tenants copies of
it, each with --tuned-experts experts of every MoE layer retrained (--tuned-layers 1: of its first MoE
layer only, as in the issue's case), serves them all with `faasmoe serve`, sends every model a 128-token
prompt (every expert of every layer is hit), and reads /admin/cluster: the expert functions the models
use and the distinct ones the workers hold, with sharing on (the default) and off (`dedupe = false` on
every model, i.e. one private copy per model as before content ids). Prints a table; writes
bench/results/shared.json.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from faasmoe.model.config import MoEConfig  # noqa: E402
from faasmoe.model.synthetic.checkpoint_writer import init_checkpoint  # noqa: E402
from tests.checkpoint_edits import copy_checkpoint, retrain_tensor  # noqa: E402
from tests.processes import free_port, serving  # noqa: E402

KEY = "fm-bench-shared-0123456789abcdefghijklmnopqrs"
PROMPT = [(i * 37 + 11) % 900 + 20 for i in range(128)]


def build(root: Path, args: argparse.Namespace) -> dict[str, Path]:
    base = init_checkpoint(root / "base", args.family, preset=args.preset, seed=1, progress=False)
    config = MoEConfig.from_pretrained(base)
    prefix = "block_sparse_moe" if args.family == "mixtral" else "mlp"
    names = ("w1", "w3", "w2") if args.family == "mixtral" else ("gate_proj", "up_proj", "down_proj")
    models = {"base": base}
    for t in range(args.tenants):
        tuned = copy_checkpoint(base, root / f"tune{chr(ord('a') + t)}")
        for layer in config.moe_layers[: args.tuned_layers]:
            for k in range(args.tuned_experts):  # each tenant its own experts: (t * n + k) of every layer
                expert = (t * args.tuned_experts + k) % config.num_experts
                for i, name in enumerate(names):
                    retrain_tensor(tuned, f"model.layers.{layer}.{prefix}.experts.{expert}.{name}.weight", seed=t * 97 + i)
        models[tuned.name] = tuned
    return models


def build_trained(root: Path, args: argparse.Namespace) -> tuple[dict[str, Path], dict[str, list[int]]]:
    """The trained base and one ESFT fine-tune per tenant (a domain each); each model's prompt."""
    from bench.trainedlib.esft import domain_stream, fine_tune
    from bench.trainedlib.train import TrainSpec, build, corpus, default_dir

    spec = TrainSpec()
    base = build(default_dir(ROOT, spec), spec)
    texts = corpus(spec)
    names = sorted(texts)
    models, prompts = {"base": base}, {}
    for t in range(args.tenants):
        domain = names[t % len(names)]
        train, held = texts[domain]
        out = ROOT / "models" / f"esft-{base.name}-{domain}-{args.tune_seconds:g}s"
        models[f"tune-{domain}"] = fine_tune(base, out, domain_stream(base, train), seconds=args.tune_seconds, seed=t)
        prompts[f"tune-{domain}"] = domain_stream(base, held)[:128].tolist()
    prompts["base"] = domain_stream(base, texts[names[0]][1])[128:256].tolist()
    return models, prompts


def measure(models: dict[str, Path], root: Path, block_size: int, dedupe: bool,
            prompts: dict[str, list[int]] | None = None) -> dict:
    port = free_port()
    entries = "".join(f'[[models]]\nname = "{name}"\npath = "{path}"\nexpert_block_size = {block_size}\n'
                      f'keep_alive = 600\ndedupe = {str(dedupe).lower()}\n\n' for name, path in models.items())
    config = root / f"serve-{dedupe}.toml"
    config.write_text(f'[server]\nport = {port}\nworkers = 1\ndevice = "cpu"\nstate = "{root / f"state-{dedupe}.db"}"\n'
                      f'admin_key = "{KEY}"\n\n{entries}')
    proc = serving(port, "--config", str(config), env={"FAASMOE_API_KEY": KEY})
    try:
        for name in models:
            body = {"model": name, "prompt": (prompts or {}).get(name, PROMPT), "max_tokens": 4, "temperature": 0}
            request = urllib.request.Request(proc.url + "/v1/completions", json.dumps(body).encode(),
                                             {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"})
            with urllib.request.urlopen(request, timeout=300) as response:
                assert response.status == 200
        request = urllib.request.Request(proc.url + "/admin/cluster", headers={"Authorization": f"Bearer {KEY}"})
        with urllib.request.urlopen(request, timeout=60) as response:
            cluster = json.loads(response.read())
    finally:
        proc.stop()
    used = sum(m["resident_functions"] for m in cluster["models"].values())
    held = sum(len(w["resident_functions"]) for w in cluster["workers"])
    return {"dedupe": dedupe, "blocks_used": used, "blocks_held": held,
            "expert_bytes_held": cluster["distinct_resident_bytes"],
            "expert_bytes_used": sum(m["device_bytes"] for m in cluster["models"].values()),
            "trunk_bytes_held": cluster["distinct_trunk_bytes"],
            "trunk_bytes_used": sum(m["trunk_bytes"] for m in cluster["models"].values())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--family", default="qwen2_moe", choices=("qwen2_moe", "mixtral", "qwen3_moe", "olmoe"))
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--tenants", type=int, default=2, help="fine-tunes of the base, one per tenant")
    parser.add_argument("--tuned-experts", type=int, default=1, help="experts each fine-tune retrains per tuned layer")
    parser.add_argument("--tuned-layers", type=int, default=1, help="MoE layers each fine-tune retrains (from the first)")
    parser.add_argument("--block-size", type=int, default=1)
    parser.add_argument("--trained", action="store_true", help="the trained base and ESFT fine-tunes (see above)")
    parser.add_argument("--tune-seconds", type=float, default=45.0, help="with --trained: each fine-tune's budget")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="faasmoe-shared-") as tmp:
        root = Path(tmp)
        models, prompts = build_trained(root, args) if args.trained else (build(root, args), None)
        runs = [measure(models, root, args.block_size, dedupe, prompts) for dedupe in (False, True)]
    what = ("trained base, ESFT fine-tunes (top_p 0.2)" if args.trained else
            f"{args.family} {args.preset}; each fine-tune retrains {args.tuned_experts} expert(s) in "
            f"{args.tuned_layers} MoE layer(s)")
    print(f"\n{len(models)} models ({', '.join(models)}), {what}, blocks of {args.block_size}")
    print(f"{'functions':24} {'blocks used':>12} {'blocks held':>12} {'expert MiB held':>16} {'trunk MiB held':>15}")
    for run in runs:
        label = "named by content" if run["dedupe"] else "one copy per model"
        print(f"{label:24} {run['blocks_used']:>12} {run['blocks_held']:>12} {run['expert_bytes_held'] / 2**20:>16.2f} "
              f"{run['trunk_bytes_held'] / 2**20:>15.2f}")
    off, on = runs
    print(f"content-named / per-model copies: experts {on['expert_bytes_held'] / off['expert_bytes_held']:.2f}x, "
          f"trunks {on['trunk_bytes_held'] / off['trunk_bytes_held']:.2f}x")
    out = ROOT / "bench" / "results" / "shared.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"args": vars(args), "models": list(models), "runs": runs, "time": time.time()}, indent=1))
    print(f"wrote {out.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
