"""GiB·s against p99 TTFT: each setup's Pareto frontier over the keep-alive sweep, and the least weight
memory that meets a latency SLO (the fair comparison of ../shared/WORKLOADS.md)."""

from __future__ import annotations

from pathlib import Path

SLO_SETUPS = ("always-on", "whole-model", "faasmoe")


def point(run: dict) -> tuple[float, float] | None:
    """(p99 TTFT s, weight GiB·s) of a run that completed every request; None otherwise."""
    if run["failed"] or run["ttft_p99_s"] is None or run["gib_s"]["weights_device"] is None:
        return None
    return run["ttft_p99_s"], run["gib_s"]["weights_device"]


def frontier(runs: list[dict]) -> list[dict]:
    """The runs no other run beats on both p99 TTFT and GiB·s, by p99 TTFT."""
    scored = sorted((r for r in runs if point(r)), key=lambda r: point(r))
    out, best = [], float("inf")
    for r in scored:
        if point(r)[1] < best:
            out.append(r)
            best = point(r)[1]
    return out


def least_meeting(runs: list[dict], slo_s: float) -> dict | None:
    """The run with the least weight GiB·s whose p99 TTFT is within `slo_s`."""
    meeting = [r for r in runs if point(r) and point(r)[0] <= slo_s]
    return min(meeting, key=lambda r: point(r)[1]) if meeting else None


def slo_table(runs: list[dict]) -> list[dict]:
    """For every p99 TTFT some run reached (an SLO), the least GiB·s per setup that meets it."""
    slos = sorted({point(r)[0] for r in runs if point(r)})  # exact: a run meets the row of its own p99
    table = []
    for slo in slos:
        row = {"slo_s": slo}
        for setup in SLO_SETUPS:
            best = least_meeting([r for r in runs if r["setup"] == setup and r["page_cache"] == "kept"], slo)
            row[setup] = {"label": best["label"], "gib_s": point(best)[1]} if best else None
        table.append(row)
    return table


def headline(runs: list[dict]) -> dict | None:
    """At the tightest SLO both scale-to-zero setups meet: faasmoe's least GiB·s over whole-model's, and
    over always-on's (where always-on meets it)."""
    kept = [r for r in runs if r["page_cache"] == "kept"]
    best = {}
    for setup in ("whole-model", "faasmoe"):
        points = [point(r) for r in kept if r["setup"] == setup and point(r)]
        if not points:
            return None
        best[setup] = min(p[0] for p in points)
    slo = max(best.values())
    chosen = {s: least_meeting([r for r in kept if r["setup"] == s], slo) for s in SLO_SETUPS}
    out = {"slo_s": slo, "runs": {s: (r["label"] if r else None) for s, r in chosen.items()}}
    if chosen["faasmoe"] and chosen["whole-model"]:
        out["vs_whole_model"] = point(chosen["faasmoe"])[1] / point(chosen["whole-model"])[1]
    always = [r for r in kept if r["setup"] == "always-on" and point(r)]
    if chosen["faasmoe"] and always:  # always-on's memory is what it is, whatever the SLO
        out["vs_always_on"] = point(chosen["faasmoe"])[1] / point(always[0])[1]
    return out


def plot(models: dict[str, list[dict]], path: Path) -> Path:
    """GiB·s (log) against p99 TTFT (log), a curve per setup and model, keep-alives labelled."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(models), figsize=(6.5 * len(models), 5), squeeze=False)
    for ax, (model, runs) in zip(axes[0], models.items()):
        for i, setup in enumerate(SLO_SETUPS):
            for cache, style in (("kept", "-o"), ("dropped", ":x")):
                mine = sorted((r for r in runs if r["setup"] == setup and r["page_cache"] == cache and point(r)),
                              key=lambda r: r["keep_alive_s"])
                if not mine:
                    continue
                xs, ys = zip(*(point(r) for r in mine))
                label = setup + (" (page cache dropped)" if cache == "dropped" else "")
                ax.plot(xs, ys, style, color=f"C{i}", label=label)
                if cache == "kept" and setup != "always-on":
                    for r, x, y in zip(mine, xs, ys):
                        ax.annotate(f"{r['keep_alive_s']:g}s", (x, y), textcoords="offset points", xytext=(4, 4),
                                    fontsize=7, color=f"C{i}")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("p99 TTFT (s), cold starts included")
        ax.set_ylabel("weight GiB·s held (device tier)")
        ax.set_title(model)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
