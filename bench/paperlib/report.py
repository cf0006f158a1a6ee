"""The Markdown report of one benchmark: setups, per tenant, the paper's numbers, sweeps, calibration."""

from __future__ import annotations

from bench.paperlib.calibrate import PUBLISHED as SKEW_PUBLISHED

# The FaaSMoE paper (arXiv 2604.26881): Qwen1.5-MoE-A2.7B on a CPU server, 6 tenants, totals.
PUBLISHED = {
    "source": "FaaSMoE paper, arXiv 2604.26881 (Qwen1.5-MoE-A2.7B, CPU server, 6 tenants, BIG-Bench)",
    "tenants": 6,
    "setups": {
        "baseline": {"cpu_percent": 1126.8, "memory_gb": 217.5},
        "local-distribution": {"cpu_percent": 428.7, "memory_gb": 50.4},
        "faasmoe-shared": {"cpu_percent": 326.4, "memory_gb": 72.3},
        "faasmoe-private": {"cpu_percent": 408.5, "memory_gb": 91.0},
    },
    "block_size_optimum": "U-shaped memory over 6-30 experts per function (of 60), minimum at 20",
}
GOAL_MEMORY_RATIO = 0.25  # faasmoe-shared memory <= 1/4 of the baseline
GOAL_ITL_RATIO = 1.5  # and inter-token latency p50 <= 1.5x the baseline's


def gib(n: float | None) -> str:
    """Bytes in GiB, or MiB / KiB when small (toy models)."""
    if n is None:
        return "-"
    if abs(n) >= 2**30 or n == 0:
        return f"{n / 2**30:.2f} GiB"
    return f"{n / 2**20:.1f} MiB" if abs(n) >= 2**20 else f"{n / 2**10:.0f} KiB"


def ms(s: float | None) -> str:
    return "-" if s is None else f"{s * 1e3:.0f}"


def num(x: float | None, fmt: str = ".1f") -> str:
    return "-" if x is None else format(x, fmt)


def ratio(a: float | None, b: float | None) -> str:
    return "-" if a is None or not b else f"{a / b:.2f}x"


def table(headers: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def setups_table(setups: list[dict]) -> str:
    base = next((s for s in setups if s["setup"] == "baseline"), None)
    rows = []
    for s in setups:
        mem = s.get("gpu_bytes_mean") if s.get("gpu_bytes_mean") is not None else s["rss_bytes_mean"]
        base_mem = None if base is None else (base.get("gpu_bytes_mean") or base["rss_bytes_mean"])
        rows.append([
            s["setup"] + (f" ({s['label']})" if s.get("label") else ""),
            gib(s["rss_bytes_mean"]), gib(s["rss_bytes_peak"]),
            ratio(mem, base_mem) if base else "-",
            num(s.get("gib_seconds")),
            num(s["cpu_percent_mean"], ".0f"), gib(s["resident_expert_bytes_mean"]),
            gib(s.get("gpu_bytes_mean")) if s.get("gpu_bytes_mean") is not None else "-",
            f"{ms(s['ttft_p50_s'])} / {ms(s['ttft_p99_s'])}",
            f"{ms(s.get('cold_ttft_p50_s'))} / {ms(s.get('cold_ttft_p99_s'))} ({s.get('cold_requests', '-')})",
            f"{ms(s['itl_p50_s'])} / {ms(s['itl_p99_s'])}",
            ratio(s["itl_p50_s"], base["itl_p50_s"]) if base else "-",
            num(s["throughput_tok_s"]), s["cold_starts"], f"{s['completed']}/{s['requests']}",
            num(s.get("other_cpu_percent_mean"), ".0f"),
        ])
    return table(["setup", "RSS mean", "RSS peak", "memory vs baseline", "GiB·s held", "CPU % mean",
                  "resident experts", "GPU mem", "TTFT p50/p99 ms", "cold TTFT p50/p99 ms (requests)",
                  "ITL p50/p99 ms", "ITL p50 vs baseline", "tok/s", "cold starts", "completed", "other CPU %"], rows)


def tenants_table(setups: list[dict]) -> str:
    profiles = ("steady", "bursty", "sparse")
    rows = []
    tenants = list(setups[0]["per_tenant"]) if setups else []
    for i, tenant in enumerate(tenants):
        for s in setups:
            t = s["per_tenant"][tenant]
            rows.append([tenant if s is setups[0] else "", profiles[i % 3] if s is setups[0] else "", s["setup"],
                         f"{t['completed']}/{t['requests']}", gib(t.get("rss_bytes_mean")),
                         gib(t.get("resident_expert_bytes_mean")), f"{ms(t['ttft_p50_s'])} / {ms(t['ttft_p99_s'])}",
                         f"{ms(t['itl_p50_s'])} / {ms(t['itl_p99_s'])}", num(t["throughput_tok_s"], ".2f"),
                         "-" if t.get("cold_starts") is None else t["cold_starts"]])
    return table(["tenant", "profile", "setup", "completed", "own processes RSS", "own resident experts",
                  "TTFT p50/p99 ms", "ITL p50/p99 ms", "tok/s", "cold starts (ledger)"], rows)


def paper_table(setups: list[dict]) -> str:
    base = next((s for s in setups if s["setup"] == "baseline"), None)
    pb = PUBLISHED["setups"]["baseline"]
    rows = []
    for s in setups:
        n = len(s["per_tenant"])
        pub = PUBLISHED["setups"].get(s["setup"])
        rows.append([
            s["setup"], num(s["cpu_percent_mean"] / n, ".1f"), gib(s["rss_bytes_mean"] / n),
            ratio(s["cpu_percent_mean"], base["cpu_percent_mean"]) if base else "-",
            ratio(s["rss_bytes_mean"], base["rss_bytes_mean"]) if base else "-",
            num(pub["cpu_percent"] / PUBLISHED["tenants"], ".1f") if pub else "-",
            num(pub["memory_gb"] / PUBLISHED["tenants"], ".2f") if pub else "-",
            ratio(pub["cpu_percent"], pb["cpu_percent"]) if pub else "-",
            ratio(pub["memory_gb"], pb["memory_gb"]) if pub else "-",
        ])
    return table(["setup", "ours: CPU % per tenant", "ours: memory per tenant", "ours: CPU vs baseline",
                  "ours: memory vs baseline", "paper: CPU % per tenant", "paper: GB per tenant",
                  "paper: CPU vs baseline", "paper: memory vs baseline"], rows)


def projection_table(setups: list[dict], facts: dict) -> str:
    """What the measured residency means for the full-depth model (a projection, not a measurement).

    memory ~= process overhead (measured RSS - trunks - resident experts)
              + trunk copies x full-depth trunk bytes + resident expert bytes x full_layers / layers.
    """
    layers, full = facts["layers"], facts["full_layers"]
    trunk_full = facts["fixed_trunk_bytes"] + full * facts["layer_trunk_bytes"]
    trunk_measured = facts["fixed_trunk_bytes"] + layers * facts["layer_trunk_bytes"]
    rows, base_total = [], None
    for s in setups:
        copies = round(s["trunk_bytes"] / trunk_measured) if trunk_measured else 0
        resident = s["resident_expert_bytes_mean"] or 0
        overhead = max(0.0, s["rss_bytes_mean"] - s["trunk_bytes"] - resident)
        experts = resident * full / layers
        total = overhead + copies * trunk_full + experts
        if s["setup"] == "baseline":
            base_total = total
        rows.append([s["setup"], copies, gib(overhead), gib(copies * trunk_full), gib(experts), gib(total),
                     ratio(total, base_total) if base_total else "-"])
    return table(["setup", "trunk copies", "process overhead", "trunks", "resident experts",
                  f"projected total ({full} layers)", "vs baseline"], rows)


def saving_table(setups: list[dict], facts: dict) -> str:
    """Each FaaSMoE setup's RSS saving against the baseline, split by where it comes from."""
    base = next((s for s in setups if s["setup"] == "baseline"), None)
    if base is None:
        return ""
    full_set = facts["layers"] * facts["num_experts"] * facts["expert_bytes"]
    rows = []
    for s in setups:
        if s is base:
            continue
        n = len(s["per_tenant"])
        private = s["setup"] in ("faasmoe-private", "whole-model") or s["options"].get("tenant_models")
        copies = n if private else 1  # expert sets the setup could hold at once
        resident = s["resident_expert_bytes_mean"] or 0
        total = base["rss_bytes_mean"] - s["rss_bytes_mean"]
        trunks = base["trunk_bytes"] - s["trunk_bytes"]
        sharing = (base["resident_expert_bytes_mean"] or 0) - copies * full_set
        scale_to_zero = copies * full_set - resident
        rows.append([s["setup"], gib(total), gib(trunks), gib(sharing), gib(scale_to_zero),
                     gib(total - trunks - sharing - scale_to_zero),
                     f"{resident / (copies * full_set):.0%}" if full_set else "-"])
    return table(["setup", "RSS saved vs baseline", "fewer trunks", "one expert set instead of N",
                  "experts not resident (scale to zero, skew)", "processes and the rest",
                  "experts resident, of those it could hold"], rows)


def goal_lines(setups: list[dict]) -> list[str]:
    base = next((s for s in setups if s["setup"] == "baseline"), None)
    shared = next((s for s in setups if s["setup"] == "faasmoe-shared"), None)
    if base is None or shared is None:
        return ["Goal check needs both baseline and faasmoe-shared."]
    mem = shared["rss_bytes_mean"] / base["rss_bytes_mean"]
    key = "gpu_bytes_mean"
    if shared.get(key) is not None and base.get(key):
        mem = shared[key] / base[key]
    itl = shared["itl_p50_s"] / base["itl_p50_s"] if shared["itl_p50_s"] and base["itl_p50_s"] else None
    same = shared["completed"] == base["completed"] == base["requests"]
    return [
        f"- memory of faasmoe-shared / baseline: {mem:.2f} (goal <= {GOAL_MEMORY_RATIO}; the paper: 0.33): "
        f"{'met' if mem <= GOAL_MEMORY_RATIO else 'NOT met'}",
        f"- ITL p50 of faasmoe-shared / baseline: {num(itl, '.2f')} (goal <= {GOAL_ITL_RATIO}): "
        f"{'met' if itl is not None and itl <= GOAL_ITL_RATIO else 'NOT met'}",
        f"- equal completed work: {'yes' if same else 'NO'} ({shared['completed']} and {base['completed']} "
        f"of {base['requests']} requests)",
    ]


SWEEP_TITLES = {"block": "expert block size (experts per function)", "keep-alive": "keep-alive",
                "eviction": "eviction policy under a worker memory budget", "skew": "router skew S"}


def sweep_table(name: str, rows: list[dict]) -> str:
    failed = [[r["value"], f"failed: {r['error'].splitlines()[-1][:150]}"] + [""] * 10 for r in rows if "error" in r]
    rows = [r for r in rows if "error" not in r]
    body = failed + [[r["value"], gib(r["rss_bytes_mean"]), gib(r["rss_bytes_peak"]), gib(r["resident_expert_bytes_mean"]),
             num(r["cpu_percent_mean"], ".0f"), f"{ms(r['ttft_p50_s'])} / {ms(r['ttft_p99_s'])}",
             f"{ms(r['itl_p50_s'])} / {ms(r['itl_p99_s'])}", num(r["throughput_tok_s"]), r["cold_starts"],
             ", ".join(f"{k} {v}" for k, v in sorted(r.get("evictions", {}).items())) or "-",
             f"{r['completed']}/{r['requests']}", num(r.get("other_cpu_percent_mean"), ".0f")] for r in rows]
    return table([SWEEP_TITLES.get(name, name), "RSS mean", "RSS peak", "resident experts", "CPU %",
                  "TTFT p50/p99 ms", "ITL p50/p99 ms", "tok/s", "cold starts", "evictions", "completed",
                  "other CPU %"], body)


def calibration_table(rows: list[dict]) -> str:
    body = [[f"{r['skew']:g}" + ("" if r["exact"] else " (approx.)"), f"{r['busiest_over_mean']:.2f}",
             f"{r['lru_hit_rate_uniform']:.0%}",
             f"{r['lru_hit_rate_workload']:.0%}" if "lru_hit_rate_workload" in r else "-",
             num(r.get("experts_touched_per_tenant")), num(r.get("experts_touched_all_tenants")),
             f"{r['lru_capacity']} of {r['num_experts']}"] for r in rows]
    return table(["skew S", "busiest / mean load", "LRU 1/8 hits, uniform tokens", "LRU 1/8 hits, this workload",
                  "experts touched per layer: per tenant", "all tenants", "LRU size"], body)


def calibration_lines(rows: list[dict]) -> list[str]:
    """Which published measurement each knob matches, in words."""
    lines = []
    mild = [r for r in rows if 1.1 <= r["busiest_over_mean"] <= 1.7 and r["exact"]]
    if mild:
        values = ", ".join(format(r["skew"], "g") for r in mild)
        lines.append(f"- Mixtral-like mild skew (busiest expert 1.1-1.7x the mean load): S = {values}.")
    workload = [r for r in rows if "lru_hit_rate_workload" in r]
    if workload:
        best = min(workload, key=lambda r: abs(r["lru_hit_rate_workload"] - 0.67))
        lines.append(f"- Short-term reuse: the closest to the published 67% LRU hit rate is S = {best['skew']:g} with "
                     f"{best['lru_hit_rate_workload']:.0%} on this run's tokens; generated tokens of a random model "
                     "are spread over the whole vocabulary, so only prompts carry task locality here.")
    return lines


def markdown(doc: dict) -> str:
    meta, setups = doc["meta"], doc["setups"]
    m = meta["machine"]
    machine = (f"{m['machine']}, {m['cpus']} CPU cores, {m['ram_bytes'] / 2**30:.0f} GiB RAM, Python {m['python']}, "
               f"torch {m['torch']}" + (f", {m['gpu']}" if m.get("gpu") else "")
               + f"; load average at start {m['load_average'][0]}, at end {meta.get('load_average_end', ['?'])[0]}")
    o = meta["options"]
    trunks = (f"unloaded after {o['trunk_keep_alive_s']:g} s idle" if o["trunk_keep_alive_s"] else "never unloaded")
    parts = [
        f"# FaaSMoE against the paper's setups and a whole-model scale-to-zero baseline ({meta['mode']})",
        "",
        f"- date: {meta['date']}; elapsed {meta.get('elapsed_s', '?')} s",
        f"- command: `{meta['command']}`",
        f"- machine: {machine}",
        f"- model: {meta['model']}, router skew S = {meta['skew']:g} (calibration below); compute dtype "
        f"{o['dtype']} on {o['device']}",
        f"- FaaSMoE setups: {o['expert_block_size']} experts per function, keep-alive {o['keep_alive_s']:g} s "
        f"({o['keep_alive_policy']}), eviction {o['eviction']}, {o['workers']} worker process(es), worker host "
        f"cache {'default' if o['host_cache'] is None else 'off' if o['host_cache'] <= 1 else o['host_cache']}, "
        f"trunks {trunks}",
        f"- torch threads per process ({meta.get('threads', '?')}): "
        + ", ".join(f"{s['setup']} {s['options'].get('threads') or 'torch default'}" for s in setups),
        f"- workload: {meta['workload']}; {meta['requests']} requests, the same in every setup"
        + ("; private models: each tenant its own fine-tune (same architecture, seed = tenant index)"
           if meta.get("private_models") else ""),
        "- measured: the window from the first scheduled send to the last token; RSS and CPU % summed over "
        "every process of the setup (psutil, every 0.5 s; CPU 100% = one core busy); GiB·s held = the integral "
        "of that RSS over the window; TTFT and ITL on the client, streaming; cold starts from the workers' "
        "counters (whole-model: the frontends' ledgers, one per reload of trunk and experts); cold TTFT = TTFT "
        f"of the requests sent after their tenant was idle for at least the keep-alive ({o['keep_alive_s']:g} s), "
        "the same requests in every setup. 'other CPU %' is the rest of the machine (this benchmark's client, "
        "and any other job: a high value means the run was disturbed)",
        "",
        "## Setups",
        "",
        setups_table(setups),
        "",
        *goal_lines(setups),
        "",
        "## Where the saving comes from",
        "",
        "RSS saved against the baseline (window means), split: trunks not duplicated; one set of expert "
        "weights instead of one per tenant (shared, local-distribution); experts of that set not resident "
        "(scaled to zero while idle, or never touched); the rest (process count: Python, torch, scheduler, "
        "workers, activations and KV caches).",
        "",
        saving_table(setups, meta["model_facts"]),
        "",
        "## Per tenant",
        "",
        tenants_table(setups),
        "",
        "## Against the paper (per tenant = total / tenants)",
        "",
        paper_table(setups),
        "",
        f"Paper: {PUBLISHED['source']}. It reported no latency and no cold starts.",
        "",
    ]
    facts = meta["model_facts"]
    if facts["layers"] < facts["full_layers"]:
        parts += [
            f"## Projected to all {facts['full_layers']} layers",
            "",
            f"Measured with {facts['layers']} of {facts['full_layers']} layers, where embeddings and lm_head weigh "
            "about as much as all the experts; this scales the measured per-layer expert residency and trunk to "
            "full depth (a projection from this run, not a measurement).",
            "",
            projection_table(setups, facts),
        ]
    for name, rows in doc.get("sweeps", {}).items():
        parts += ["", f"## Sweep: {SWEEP_TITLES.get(name, name)} (faasmoe-shared)", "", sweep_table(name, rows)]
        if name == "eviction" and rows:
            parts += ["", f"Run on its own checkpoint: {rows[0]['label'].partition(' ')[2]}."]
        if name == "block":
            parts += ["", f"Paper: {PUBLISHED['block_size_optimum']}."]
    if doc.get("calibration"):
        parts += ["", "## Router skew calibration", "", calibration_table(doc["calibration"]), "",
                  *calibration_lines(doc["calibration"]), "",
                  f"Published: {SKEW_PUBLISHED['busiest_over_mean']}; {SKEW_PUBLISHED['lru_hit_rate']}. "
                  "Computed from each checkpoint's router (exact for S > 0, where routing depends on the token "
                  "alone; S = 0 is approximated from the embedding)."]
    return "\n".join(parts) + "\n"
