"""The payoff: per-expert scale to zero against whole-model scale to zero and always-on (issue 22).

    python bench/payoff.py                      # trained model + random model, 16 tenants, 120 s trace,
                                                # keep-alive sweep {1, 5, 15, 60, 300} s (~70 min on 2 cores)
    python bench/payoff.py --models trained --keep-alives 5,60 --duration 60   # a shorter look
    python bench/payoff.py --models trained --repeats 3   # each setup 3 times, percentiles over all their requests

Tenants (bench/payofflib/tenants.py): half use the trained base shared, half each their own ESFT fine-tune
of it (only the experts with the highest affinity to their domain trained) as a private model. Arrivals are
Gamma (CV 1 and 4) at 0.01-1 requests/s per tenant, prompts are real held-out text of each tenant's domain
(bench/payofflib/trace.py). Setups (bench/payofflib/deploy.py): always-on, whole-model scale to zero at each
keep-alive, faasmoe at each keep-alive, all replaying the same trace; at one keep-alive both scale-to-zero
setups run again on the trained model with the checkpoints' page cache dropped every half second. Each run reports weight GiB·s
held (device tier; experts and trunk apart; workers' host caches, the page cache and KV + process overhead
apart), p50/p99 TTFT with cold starts, ITL, cold-request %, completed; then the Pareto frontier of GiB·s
against p99 TTFT and, at the tightest p99 TTFT both scale-to-zero setups meet, faasmoe's least GiB·s over
theirs. The same sweep on a random-weights model of the same shape shows what trained routing buys. Each
tenant's greedy tokens are checked against transformers on its own checkpoint.
Writes bench/results/payoff.md, payoff.json and payoff.png.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import psutil  # noqa: E402

from bench.payofflib import frontier, tenants  # noqa: E402
from bench.payofflib.deploy import SETUPS, SetupRun  # noqa: E402
from bench.payofflib.measure import run  # noqa: E402
from bench.payofflib.reference import check_outputs  # noqa: E402
from bench.payofflib.repeats import pool  # noqa: E402
from bench.payofflib.trace import build_trace, describe  # noqa: E402
from faasmoe.serve.config import MICRO_BATCH_MIN_TOKENS, REMOTE_MICRO_BATCHES  # noqa: E402

RESULTS = ROOT / "bench" / "results"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="trained,random", help="comma list of: trained, random")
    parser.add_argument("--tenants", type=int, default=16,
                        help="tenants (default 16); --fine-tunes of them use a private ESFT fine-tune, the rest the "
                        "shared base")
    parser.add_argument("--fine-tunes", type=int, default=None,
                        help="private tenants, each with its own fine-tune, one domain after another (8 domains; a "
                        "second tenant of a domain trains its own version); default half the tenants")
    parser.add_argument("--duration", type=float, default=120.0, help="trace length in seconds (default 120)")
    parser.add_argument("--keep-alives", default="1,5,15,60,300", help="keep-alive sweep, seconds")
    parser.add_argument("--drop-page-cache-at", type=float, default=15.0,
                        help="keep-alive at which both scale-to-zero setups also run with the page cache dropped "
                        "(0: none)")
    parser.add_argument("--tune-seconds", type=float, default=45.0, help="each ESFT fine-tune's training budget")
    parser.add_argument("--seed", type=int, default=0, help="trace seed")
    parser.add_argument("--setups", default="always-on,whole-model,faasmoe",
                        help="comma list of the setups to run (default: all three)")
    parser.add_argument("--micro-batches", default="2@128",
                        help="faasmoe frontend's --micro-batches; a comma list runs faasmoe once per value, M@N "
                        "with --micro-batch-min-tokens N (default 2@128, the frontend's own default)")
    parser.add_argument("--repeats", type=int, default=1,
                        help="run the whole plan this many times (A B A B each time) and pool each setup's requests "
                        "for its percentiles (one run's p99 is its 5 slowest requests; default 1)")
    parser.add_argument("--out", type=Path, default=RESULTS, help="where payoff.md/json/png go")
    return parser.parse_args(argv)


def machine() -> dict:
    from faasmoe.model.kernels import cpu_isa

    return {"cpu": platform.processor() or platform.machine(), "isa": cpu_isa(), "cores": os.cpu_count(),
            "memory_gib": round(psutil.virtual_memory().total / 2**30, 1), "python": platform.python_version(),
            "torch": __import__("torch").__version__, "load_before": os.getloadavg()}


def plan_runs(keep_alives: list[float], drop_at: float, setups: tuple[str, ...] = SETUPS,
              micro_batches: tuple[tuple[int, int], ...] = ((REMOTE_MICRO_BATCHES, MICRO_BATCH_MIN_TOKENS),),
              ) -> list[tuple[SetupRun, bool]]:
    """Always-on, then whole-model and faasmoe alternating at each keep-alive (A B A B), then the
    page-cache-dropped pair; only the setups asked for, faasmoe once per micro-batch count."""
    def at(k: float) -> list[SetupRun]:
        return [SetupRun("whole-model", k)] + [SetupRun("faasmoe", k, m, n) for m, n in micro_batches]

    runs = [(SetupRun("always-on", float("inf")), False)]
    for k in keep_alives:
        runs += [(r, False) for r in at(k)]
    if drop_at:
        runs += [(r, True) for r in at(drop_at)]
    return [(r, dropped) for r, dropped in runs if r.setup in setups]


def sweep(model: str, args: argparse.Namespace, keep_alives: list[float]) -> dict:
    deployment, streams = tenants.build(ROOT, args.tenants, model == "random",
                                        args.tune_seconds if model == "trained" else min(args.tune_seconds, 15.0),
                                        args.fine_tunes)
    trace = build_trace(deployment.tenants, streams, args.duration, args.seed)
    warm = {t.name: streams[t.domain][:8] for t in deployment.tenants}
    print(f"\n## {model} model: {deployment.models['base'].name}\n{describe(deployment.tenants, args.duration)}; "
          f"{len(trace)} requests", flush=True)
    runs = []
    with tempfile.TemporaryDirectory(prefix="faasmoe-payoff-") as tmp:
        plan = plan_runs(keep_alives, args.drop_page_cache_at if model == "trained" else 0.0, args.setups,
                         args.micro_batches)
        for repeat in range(args.repeats):
            for spec, dropped in plan:
                runs.append(run(spec, deployment, trace, warm, Path(tmp), os.cpu_count() or 1, dropped))
                runs[-1]["repeat"] = repeat
    checks = check_outputs(deployment, trace, runs)
    for r in runs:
        r.pop("token_ids")
    runs = pool(runs)
    for r in runs:
        r.pop("ttft_samples_s")
        r.pop("itl_samples_s")
    return {"base": str(deployment.models["base"]), "models": {k: str(v) for k, v in deployment.models.items()},
            "tenants": [t.__dict__ for t in deployment.tenants], "trace": describe(deployment.tenants, args.duration),
            "requests": len(trace), "runs": runs, "frontier": {s: [r["label"] for r in frontier.frontier(
                [x for x in runs if x["setup"] == s and x["page_cache"] == "kept"])] for s in frontier.SLO_SETUPS},
            "slo_table": frontier.slo_table(runs), "headline": frontier.headline(runs), "outputs": checks}


def _f(value, digits=2, scale=1.0) -> str:
    return "–" if value is None else f"{value * scale:.{digits}f}"


def markdown(doc: dict) -> str:
    m = doc["machine"]
    lines = [f"# Payoff: weight memory at equal p99 TTFT ({doc['date']})", "",
             f"Machine: {m['cpu']}, {m['isa']}, {m['cores']} cores, {m['memory_gib']} GiB; torch {m['torch']}. "
             f"Command: `{doc['command']}`.", ""]
    for model, result in doc["models"].items():
        lines += [f"## {model} model (`{Path(result['base']).name}`), {result['requests']} requests", "",
                  result["trace"], "",
                  "| setup | page cache | weight GiB·s | experts | trunk | page cache GiB·s | KV+process GiB·s "
                  "| TTFT p50 s | TTFT p99 s | ITL p50 ms | cold % | completed |",
                  "|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in result["runs"]:
            g = r["gib_s"]
            label = r["label"]
            if r.get("repeats"):  # pooled: each run's own p99 shows the spread
                label += f" (x{r['repeats']}, p99s " + "/".join(_f(v, 3) for v in r["ttft_p99_per_repeat_s"]) + ")"
            lines.append(f"| {label} | {r['page_cache']} | {_f(g['weights_device'], 3)} | "
                         f"{_f(g['experts_device'], 3)} | {_f(g['trunk'], 3)} | {_f(g['page_cache'], 3)} | "
                         f"{_f(g['kv_and_process'], 1)} | {_f(r['ttft_p50_s'], 3)} | {_f(r['ttft_p99_s'], 3)} | "
                         f"{_f(r['itl_p50_s'], 1, 1000)} | {r['cold_percent']:.0f} | {r['completed']}/{r['requests']} |")
        h = result["headline"]
        if h:
            lines += ["", f"**At p99 TTFT <= {h['slo_s']:.3f} s** (the tightest both scale-to-zero setups meet): "
                      f"faasmoe ({h['runs']['faasmoe']}) holds **{_f(h.get('vs_whole_model'))}x** the weight GiB·s "
                      f"of whole-model ({h['runs']['whole-model']})" + (
                          "." if h.get("vs_always_on") is None else f" and **{_f(h['vs_always_on'])}x** always-on's.")]
        lines += ["", "Least weight GiB·s meeting each p99 TTFT SLO:", "",
                  "| SLO s | always-on | whole-model | faasmoe | faasmoe / whole-model |", "|---|---|---|---|---|"]
        for row in result["slo_table"]:
            cells = [f"{row[s]['gib_s']:.3f} ({row[s]['label']})" if row[s] else "–" for s in frontier.SLO_SETUPS]
            ratio = (row["faasmoe"]["gib_s"] / row["whole-model"]["gib_s"]) if row["faasmoe"] and row["whole-model"] \
                else None
            lines.append(f"| {row['slo_s']:.3f} | " + " | ".join(cells) + f" | {_f(ratio)} |")
        o = result["outputs"]
        lines += ["", f"Outputs: {o['summary']}", ""]
    lines.append(f"![GiB·s against p99 TTFT]({doc['plot']})")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    keep_alives = [float(k) for k in args.keep_alives.split(",") if k]
    models = [m for m in args.models.split(",") if m]
    args.setups = tuple(s for s in args.setups.split(",") if s)
    args.micro_batches = tuple((int(m.partition("@")[0]), int(m.partition("@")[2] or 0))
                               for m in args.micro_batches.split(",") if m)
    if set(args.setups) - set(SETUPS) or not args.setups:
        raise SystemExit(f"--setups: choose from {', '.join(SETUPS)}")
    unknown = set(models) - {"trained", "random"}
    if unknown:
        raise SystemExit(f"--models: unknown {', '.join(sorted(unknown))} (choose trained, random)")
    started = time.monotonic()
    doc = {"date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
           "command": "python bench/payoff.py " + " ".join(argv if argv is not None else sys.argv[1:]),
           "machine": machine(), "models": {}}
    for model in models:
        doc["models"][model] = sweep(model, args, keep_alives)
    args.out.mkdir(parents=True, exist_ok=True)
    doc["plot"] = "payoff.png"
    frontier.plot({m: r["runs"] for m, r in doc["models"].items()}, args.out / "payoff.png")
    doc["elapsed_s"] = round(time.monotonic() - started, 1)
    (args.out / "payoff.json").write_text(json.dumps(doc, indent=1))
    text = markdown(doc)
    (args.out / "payoff.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
