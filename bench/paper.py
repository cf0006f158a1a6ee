"""The FaaSMoE paper's multi-tenant comparison, on real processes on loopback (issue 5).

    python bench/paper.py                  # 6 tenants, 1-layer Qwen1.5-MoE-A2.7B shape, 4 setups
    python bench/paper.py --quick          # 3 tenants, a 30 s schedule: under 5 minutes on 2 cores
    python bench/paper.py --sweep all      # + block size, keep-alive, eviction and router-skew sweeps
    python bench/paper.py --toy            # tiny model, 2 tenants, seconds (the CI test's size)
    python bench/paper.py --private-models --tenants 8   # each tenant its own fine-tune (seed = tenant)

Setups (bench/paperlib/setups.py): baseline (a full in-process model per tenant), whole-model (the
same, unloading trunk and experts together after the experts' keep-alive idle and reloading the whole
model on the next request: scale to zero per model, the Knative / Ray Serve way), faasmoe-private
(per-tenant frontends, private expert functions on one worker pool), faasmoe-shared (one frontend,
shared functions, cross-tenant batching), local-distribution (per-tenant trunks, shared functions on
always-on workers). Every setup replays the same seeded schedule (bench/paperlib/workload.py), so
the completed work is the same; each is measured from the same run: CPU % and RSS over all its
processes, resident expert bytes, GPU memory on CUDA, client-side TTFT and inter-token latency,
throughput and cold starts, GiB·s held (RSS integrated over the window) and the TTFT of cold requests
(sent after their tenant idled for the keep-alive), per tenant and in total. With --private-models
every tenant has its own checkpoint of one architecture (6-12 tenants' fine-tunes: different
seeds). Sweeps rerun faasmoe-shared with one knob changed. Prints Markdown, writes
bench/results/paper.md, paper.json and paper_*.png.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import platform
import shlex
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import psutil  # noqa: E402

from bench.paperlib import calibrate, checkpoints, plots, report  # noqa: E402
from bench.paperlib.runner import RunPlan, run  # noqa: E402
from bench.paperlib.setups import SETUPS, SetupOptions, auto_threads  # noqa: E402
from bench.paperlib.workload import LengthDistribution, WorkloadSpec, build_schedule, token_subsets  # noqa: E402

# Calibrated (bench/paperlib/calibrate.py): S = 0.15 gives the busiest expert ~1.6x the mean load
# of its layer (Zipf target over 60 experts, top-4), inside Mixtral-8x7B's published 1.1-1.7x.
DEFAULT_SKEW = 0.15
SWEEPS = ("block", "keep-alive", "eviction", "skew")
MODES = {
    # tenants, schedule seconds, expert keep-alive seconds, requests/s per tenant while ON
    "full": dict(tenants=6, duration=120.0, keep_alive=10.0, rate=0.25),
    "quick": dict(tenants=3, duration=30.0, keep_alive=5.0, rate=0.4),
    "toy": dict(tenants=2, duration=4.0, keep_alive=1.0, rate=2.0),
}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="3 tenants, 30 s schedule, keep-alive 5 s (< 5 min)")
    size.add_argument("--toy", action="store_true", help="tiny preset, 2 tenants, 4 s schedule (CI)")
    parser.add_argument("--tenants", type=int, help="tenants (default: 6; quick 3; toy 2)")
    parser.add_argument("--duration", type=float, help="schedule length in seconds (default: 120; quick 30)")
    parser.add_argument("--rate", type=float, help="requests/s per tenant while ON (default: 0.25)")
    parser.add_argument("--seed", type=int, default=0, help="workload seed")
    parser.add_argument("--private-models", action="store_true",
                        help="each tenant its own fine-tune of the model (same architecture, weights seeded by the "
                        "tenant's index), served in every setup; use with --tenants 6..12")
    parser.add_argument("--setups", default=",".join(SETUPS), help=f"comma list of: {', '.join(SETUPS)}")
    parser.add_argument("--layers", type=int, help="layers of the real-shaped preset (default: 1)")
    parser.add_argument("--skew", type=float, default=None, help=f"router skew S (default: {DEFAULT_SKEW})")
    parser.add_argument("--block-size", type=int, default=4, help="experts per function (default: 4)")
    parser.add_argument("--keep-alive", type=float, help="expert keep-alive seconds (default: 10; quick 5)")
    parser.add_argument("--keep-alive-policy", choices=("fixed", "adaptive"), default="fixed")
    parser.add_argument("--eviction", choices=("lru", "freq"), default="lru")
    parser.add_argument("--dtype", default=None, help="compute dtype (default: the checkpoint's)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (trunks and workers)")
    parser.add_argument("--workers", type=int, default=1, help="worker processes of the FaaSMoE pool")
    parser.add_argument("--threads", default="auto",
                        help="torch threads per process (OMP_NUM_THREADS): a number, 'default' (torch's own) or "
                        "'auto' (the default: the cores divided among the setup's concurrently busy frontends, "
                        "so no setup oversubscribes the machine)")
    parser.add_argument("--trunk-keep-alive", type=float, default=0.0,
                        help="unload idle tenants' trunks after this long (0 = never, the default)")
    parser.add_argument("--sweep", default="", help=f"comma list of {', '.join(SWEEPS)}, or all")
    parser.add_argument("--sweep-blocks", default="1,4,10,20,30,60")
    parser.add_argument("--sweep-keep-alives", default="1,10,60,adaptive")
    parser.add_argument("--sweep-skews", default="0,0.15,0.5,1.0,1.5")
    parser.add_argument("--sweep-memory-fraction", type=float, default=0.6,
                        help="eviction sweep (a 2-layer model at least): worker budget as a fraction of all expert "
                        "bytes, at least 1.1 layers' worth (default 0.6)")
    parser.add_argument("--out-dir", type=Path, default=ROOT / "bench" / "results")
    parser.add_argument("--prefix", default="paper", help="output file names: PREFIX.md, PREFIX.json, PREFIX_*.png")
    parser.add_argument("--models-root", type=Path, default=ROOT / "models")
    parser.add_argument("--no-plots", action="store_true")
    parser.add_argument("--build-only", action="store_true", help="build the checkpoint, print its path, exit")
    args = parser.parse_args(argv)
    args.mode = "toy" if args.toy else "quick" if args.quick else "full"
    defaults = MODES[args.mode]
    args.tenants = args.tenants or defaults["tenants"]
    args.duration = args.duration or defaults["duration"]
    args.keep_alive = args.keep_alive if args.keep_alive is not None else defaults["keep_alive"]
    args.rate = args.rate or defaults["rate"]
    args.skew = DEFAULT_SKEW if args.skew is None else args.skew
    if args.threads not in ("auto", "default"):
        args.threads = int(args.threads)
    args.setups = [s.strip() for s in args.setups.split(",") if s.strip()]
    for s in args.setups:
        if s not in SETUPS:
            parser.error(f"--setups: unknown setup {s!r}")
    wanted = [s.strip() for s in args.sweep.split(",") if s.strip()]
    args.sweep = list(SWEEPS) if wanted == ["all"] else wanted
    for s in args.sweep:
        if s not in SWEEPS:
            parser.error(f"--sweep: unknown sweep {s!r}; choose from {', '.join(SWEEPS)} or all")
    if args.private_models and {"skew", "eviction"} & set(args.sweep):
        parser.error("--private-models: the skew and eviction sweeps change the one checkpoint; run them without it")
    return args


def workload_spec(args: argparse.Namespace, model_dir: Path) -> WorkloadSpec:
    vocab = json.loads((model_dir / "config.json").read_text())["vocab_size"]
    spec = WorkloadSpec(tenants=args.tenants, duration_s=args.duration, rate_on=args.rate, vocab_size=vocab,
                        avoid_ids=tuple(checkpoints.special_ids(model_dir)), seed=args.seed)
    if args.mode == "toy":
        spec = dataclasses.replace(spec, prompt=LengthDistribution(8, 0.3, 2, 16),
                                   output=LengthDistribution(6, 0.3, 2, 10), subset_size=8)
    return spec


def machine() -> dict:
    import torch

    info = {"machine": platform.machine(), "cpus": os.cpu_count(), "ram_bytes": psutil.virtual_memory().total,
            "python": platform.python_version(), "torch": torch.__version__,
            "load_average": [round(x, 2) for x in os.getloadavg()]}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def check_memory(args: argparse.Namespace, model_dir: Path) -> None:
    """Refuse to start N full models that cannot fit: the machine would swap or kill processes."""
    full = [s for s in ("baseline", "whole-model") if s in args.setups]  # whole-model: when all tenants are busy
    if not full or args.device != "cpu":
        return
    weights = sum(f.stat().st_size for f in model_dir.glob("*.safetensors"))
    need = args.tenants * (weights + 600 * 2**20)
    available = psutil.virtual_memory().available
    if need > available:
        raise SystemExit(f"{full[0]} needs ~{need / 2**30:.1f} GiB for {args.tenants} full models but "
                         f"{available / 2**30:.1f} GiB is available: use fewer --tenants or free memory")


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    started = time.time()
    size = checkpoints.SIZES[args.mode]
    if args.layers:
        size = dataclasses.replace(size, layers=args.layers)
    model_dir = checkpoints.ensure_checkpoint(size, args.skew, args.models_root)
    if args.build_only:
        print(model_dir)
        return {"model_dir": str(model_dir)}
    spec = workload_spec(args, model_dir)
    schedule = build_schedule(spec)
    tenants = spec.tenant_names()
    subsets = token_subsets(spec)
    warm = {t: subsets[t][:4] for t in tenants}
    check_memory(args, model_dir)
    tenant_models = None
    if args.private_models:  # tenant i's fine-tune has seed i: tenant-0's is the main checkpoint
        tenant_models = {t: checkpoints.ensure_checkpoint(size, args.skew, args.models_root, seed=i)
                         for i, t in enumerate(tenants)}
    options = SetupOptions(model_dir=model_dir, dtype=args.dtype or size.dtype, device=args.device,
                           block_size=args.block_size, keep_alive_s=args.keep_alive,
                           keep_alive_policy=args.keep_alive_policy, eviction=args.eviction, workers=args.workers,
                           trunk_keep_alive_s=args.trunk_keep_alive,
                           # On a GPU the host tier is separate (pinned) RAM: keep the worker's default there.
                           host_cache=1 if args.device == "cpu" else None,
                           threads=None if args.threads in ("auto", "default") else args.threads,
                           tenant_models=tenant_models)
    facts = checkpoints.model_facts(size, args.skew, options.dtype)
    fast = args.mode == "toy"
    meta = {
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "command": "python bench/paper.py " + shlex.join(argv if argv is not None else sys.argv[1:]),
        "mode": args.mode, "machine": machine(), "model": facts.name, "model_dir": str(model_dir),
        "model_facts": dataclasses.asdict(facts), "skew": args.skew, "workload": spec.describe(),
        "workload_spec": spec.as_dict(), "requests": len(schedule), "options": options.describe(),
        "threads": args.threads, "private_models": args.private_models,
    }
    print(f"{meta['command']}\nmodel: {facts.name}, router skew {args.skew:g}\nworkload: {spec.describe()} "
          f"-> {len(schedule)} requests", flush=True)

    def plan(setup: str, opts: SetupOptions, label: str = "") -> RunPlan:
        if args.threads == "auto":
            opts = dataclasses.replace(opts, threads=auto_threads(setup, len(tenants), os.cpu_count() or 1))
        return RunPlan(setup, opts, schedule, tenants, warm, facts.layers, facts.num_experts,
                       sample_interval_s=0.25 if fast else 0.5, probe_interval_s=0.5 if fast else 1.0,
                       tail_s=0.5 if fast else 2.0, label=label)

    with tempfile.TemporaryDirectory(prefix="faasmoe-paper-") as tmp:
        workdir = Path(tmp)
        results = []
        for setup in args.setups:
            print(f"running {setup} ...", flush=True)
            results.append(run(plan(setup, options), workdir))
        sweeps = run_sweeps(args, options, size, facts, results, plan, workdir)
    calibration = calibration_rows(args, model_dir, schedule, results, sweeps)
    meta["elapsed_s"] = round(time.time() - started, 1)
    meta["load_average_end"] = [round(x, 2) for x in os.getloadavg()]
    doc = {"meta": meta, "setups": results, "sweeps": sweeps, "calibration": calibration,
           "published": report.PUBLISHED}
    args.out_dir.mkdir(parents=True, exist_ok=True)
    markdown = report.markdown(doc)
    print("\n" + markdown)
    (args.out_dir / f"{args.prefix}.md").write_text(markdown)
    for r in [*results, *(row for rows in sweeps.values() for row in rows)]:
        r.pop("token_ids", None)  # used for the calibration only
    (args.out_dir / f"{args.prefix}.json").write_text(json.dumps(doc, indent=1))
    written = [] if args.no_plots else plots.write_all(doc, args.out_dir, args.prefix)
    print(f"wrote {args.out_dir / args.prefix}.md, .json" + "".join(f", {p.name}" for p in written), flush=True)
    return doc


def run_sweeps(args, options: SetupOptions, size, facts, results: list[dict], plan, workdir: Path) -> dict:
    """Each sweep reruns faasmoe-shared with one knob changed (a point equal to the main run reuses it)."""
    main_shared = next((r for r in results if r["setup"] == "faasmoe-shared"), None)
    sweeps: dict[str, list[dict]] = {}
    for name in args.sweep:
        points: list[tuple[str, object, SetupOptions]] = []
        if name == "block":
            points = [(f"block={b}", int(b), dataclasses.replace(options, block_size=int(b)))
                      for b in args.sweep_blocks.split(",")]
        elif name == "keep-alive":
            for v in args.sweep_keep_alives.split(","):
                if v.strip() == "adaptive":
                    points.append(("keep-alive=adaptive", "adaptive",
                                   dataclasses.replace(options, keep_alive_policy="adaptive")))
                else:
                    points.append((f"keep-alive={v}s", float(v), dataclasses.replace(
                        options, keep_alive_s=float(v), keep_alive_policy="fixed")))
        elif name == "eviction":
            # A worker must hold one whole layer's routed blocks at once (a prefill touches them all,
            # and one invoke message acquires every block it calls), so the budget sits between one
            # layer's experts and all of them: that needs a model of 2 layers or more.
            ev_size = dataclasses.replace(size, layers=max(2, size.layers)) if size.layers else size
            ev_facts = checkpoints.model_facts(ev_size, args.skew, options.dtype)
            total = ev_facts.layers * ev_facts.layer_expert_bytes
            budget = max(int(args.sweep_memory_fraction * total), int(1.1 * ev_facts.layer_expert_bytes))
            model_dir = checkpoints.ensure_checkpoint(ev_size, args.skew, args.models_root)
            for e in ("lru", "freq"):  # a long keep-alive: the budget, not the timer, decides
                points.append((f"eviction={e} ({ev_facts.layers} layers, budget {budget / total:.0%} of experts)", e,
                               dataclasses.replace(options, model_dir=model_dir, eviction=e, worker_memory=budget,
                                                   keep_alive_s=600.0)))
        elif name == "skew":
            for s in args.sweep_skews.split(","):
                model_dir = checkpoints.ensure_checkpoint(size, float(s), args.models_root)
                points.append((f"skew={s}", float(s), dataclasses.replace(options, model_dir=model_dir)))
        rows = []
        for label, value, opts in points:
            if main_shared is not None and opts == options:
                row = dict(main_shared, label=label)
                print(f"  sweep {label}: the main faasmoe-shared run", flush=True)
            else:
                print(f"running sweep {label} ...", flush=True)
                try:
                    row = run(plan("faasmoe-shared", opts, label), workdir)
                except Exception as exc:  # one broken point must not lose the others
                    print(f"  sweep {label} failed: {exc}", flush=True)
                    rows.append({"sweep": name, "value": value, "label": label, "error": str(exc)[-600:]})
                    continue
            row = {k: v for k, v in row.items() if k not in ("timeline", "heat_map")}
            row["sweep"], row["value"] = name, value
            rows.append(row)
        sweeps[name] = rows
    return sweeps


def calibration_rows(args, model_dir: Path, schedule, results: list[dict], sweeps: dict) -> list[dict]:
    """The router-skew calibration of the main checkpoint (on the main run's tokens) and of every
    checkpoint of the skew sweep (on its own run's tokens)."""
    source = next((r for r in results if r["setup"] == "faasmoe-shared"), results[0] if results else None)
    rows = [calibrate.calibrate(model_dir, args.skew, schedule, source["token_ids"] if source else None)]
    for row in sweeps.get("skew", []):
        if row["value"] != args.skew and "error" not in row:
            ckpt = checkpoints.checkpoint_dir(checkpoints.SIZES[args.mode] if not args.layers else
                                              dataclasses.replace(checkpoints.SIZES[args.mode], layers=args.layers),
                                              row["value"], args.models_root)
            rows.append(calibrate.calibrate(ckpt, row["value"], schedule, row.get("token_ids")))
    return sorted(rows, key=lambda r: r["skew"])


if __name__ == "__main__":
    main()
