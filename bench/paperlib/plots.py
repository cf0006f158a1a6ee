"""The benchmark's PNGs: memory over time, memory and latency against block size, expert heat maps."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
from matplotlib.colors import LogNorm, Normalize

GIB = 2**30


def memory_over_time(doc: dict, path: Path) -> Path:
    """RSS (solid) and resident expert bytes (dashed) of every setup over its run; CPU below."""
    fig, (mem, cpu) = plt.subplots(2, 1, figsize=(10, 7), sharex=True, height_ratios=[2, 1])
    for i, s in enumerate(doc["setups"]):
        tl, color = s["timeline"], f"C{i}"
        mem.plot(tl["t_s"], [b / GIB for b in tl["rss_bytes"]], color=color, label=f"{s['setup']} RSS")
        if tl.get("gpu_bytes"):
            mem.plot(tl["t_s"], [(b or 0) / GIB for b in tl["gpu_bytes"]], color=color, ls=":",
                     label=f"{s['setup']} GPU memory")
        mem.plot(tl["resident_t_s"], [b / GIB for b in tl["resident_expert_bytes"]], color=color, ls="--",
                 label=f"{s['setup']} resident experts")
        cpu.plot(tl["t_s"], tl["cpu_percent"], color=color, label=s["setup"])
        mem.axvline(tl["window_s"], color=color, lw=0.6, alpha=0.5)
    mem.set_ylabel("GiB")
    mem.set_title(f"{doc['meta']['model']}, {len(doc['setups'][0]['per_tenant'])} tenants "
                  "(t = 0: first scheduled request; thin lines: last token)", fontsize=10)
    mem.legend(fontsize=7, ncol=2)
    cpu.set_ylabel("CPU % (100 = one core)")
    cpu.set_xlabel("seconds")
    cpu.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def block_size(doc: dict, path: Path) -> Path | None:
    """Memory and latency of faasmoe-shared against experts per function."""
    rows = sorted((r for r in doc.get("sweeps", {}).get("block", []) if "error" not in r), key=lambda r: r["value"])
    if not rows:
        return None
    x = [r["value"] for r in rows]
    fig, (mem, lat) = plt.subplots(1, 2, figsize=(11, 4))
    mem.plot(x, [r["rss_bytes_mean"] / GIB for r in rows], "o-", label="RSS mean")
    mem.plot(x, [r["rss_bytes_peak"] / GIB for r in rows], "o:", label="RSS peak")
    mem.plot(x, [(r["resident_expert_bytes_mean"] or 0) / GIB for r in rows], "s--", label="resident experts mean")
    mem.set_xlabel("experts per function")
    mem.set_ylabel("GiB")
    mem.set_title("faasmoe-shared memory")
    mem.legend(fontsize=8)
    for key, style, label in (("itl_p50_s", "o-", "ITL p50"), ("itl_p99_s", "o:", "ITL p99"),
                              ("ttft_p50_s", "s--", "TTFT p50")):
        lat.plot(x, [(r[key] or 0) * 1e3 for r in rows], style, label=label)
    lat.set_xlabel("experts per function")
    lat.set_ylabel("ms")
    lat.set_yscale("log")
    lat.set_title("faasmoe-shared latency")
    lat.legend(fontsize=8)
    for ax in (mem, lat):
        ax.set_xscale("log")
        ax.set_xticks(x, [str(v) for v in x])
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def heat_maps(doc: dict, path: Path) -> Path | None:
    """Layer x expert: fraction of probes an expert was resident, and its function's hits."""
    setups = [s for s in doc["setups"] if s.get("heat_map")]
    if not setups:
        return None
    layers = len(setups[0]["heat_map"]["hits"])
    fig, axes = plt.subplots(len(setups), 2, figsize=(12, 1.2 + len(setups) * (0.6 + 0.25 * layers)), squeeze=False)
    for row, s in zip(axes, setups):
        h = s["heat_map"]
        im = row[0].imshow(h["resident_fraction"], aspect="auto", vmin=0, vmax=1, cmap="viridis",
                           interpolation="nearest")
        fig.colorbar(im, ax=row[0], fraction=0.03)
        row[0].set_title(f"{s['setup']}: fraction of time resident (block {h['block_size']})", fontsize=9)
        hits = [[max(v, 0) + 1 for v in line] for line in h["hits"]]
        low, high = min(map(min, hits)), max(map(max, hits))
        wide = high >= 20 * low  # a log scale only where the counts span decades
        norm = LogNorm(vmin=low, vmax=high) if wide else Normalize(vmin=0, vmax=max(high, 1))
        im = row[1].imshow(hits, aspect="auto", cmap="magma", norm=norm, interpolation="nearest")
        fig.colorbar(im, ax=row[1], fraction=0.03)
        row[1].set_title(f"{s['setup']}: calls of the expert's function (+1{', log' if wide else ''})", fontsize=9)
        for ax in row:
            ax.set_ylabel("layer")
            ax.set_yticks(range(layers))
            ax.set_xlabel("expert")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_all(doc: dict, out_dir: Path, prefix: str) -> list[Path]:
    written = [memory_over_time(doc, out_dir / f"{prefix}_memory.png"),
               block_size(doc, out_dir / f"{prefix}_blocksize.png"),
               heat_maps(doc, out_dir / f"{prefix}_heatmap.png")]
    return [p for p in written if p is not None]
