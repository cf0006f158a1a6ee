"""bench/paper.py at toy size: real processes, two setups and a two-point block sweep.

Checks the shape of what it writes (JSON keys, table rows, PNGs), never its numbers: timing
goals live in bench/, not in tests.
"""

from __future__ import annotations

import json

from bench.paper import main

SETUP_KEYS = {"setup", "rss_bytes_mean", "rss_bytes_peak", "cpu_percent_mean", "resident_expert_bytes_mean",
              "ttft_p50_s", "ttft_p99_s", "itl_p50_s", "itl_p99_s", "throughput_tok_s", "cold_starts",
              "requests", "completed", "per_tenant", "timeline"}


def test_paper_toy_run_writes_table_json_and_plots(tmp_path):
    out = tmp_path / "results"
    main(["--toy", "--setups", "baseline,faasmoe-shared", "--sweep", "block", "--sweep-blocks", "4,16",
          "--out-dir", str(out), "--models-root", str(tmp_path / "models")])

    doc = json.loads((out / "paper.json").read_text())
    assert [s["setup"] for s in doc["setups"]] == ["baseline", "faasmoe-shared"]
    for s in doc["setups"]:
        assert SETUP_KEYS <= set(s), SETUP_KEYS - set(s)
        assert s["completed"] == s["requests"] == doc["meta"]["requests"]  # the same work everywhere
        assert set(s["per_tenant"]) == {"tenant-0", "tenant-1"}
        assert s["timeline"]["t_s"] and len(s["timeline"]["t_s"]) == len(s["timeline"]["rss_bytes"])
    shared = doc["setups"][1]
    assert len(shared["heat_map"]["hits"]) == doc["meta"]["model_facts"]["layers"]
    assert [r["value"] for r in doc["sweeps"]["block"]] == [4, 16]
    assert doc["calibration"] and "busiest_over_mean" in doc["calibration"][0]

    table = (out / "paper.md").read_text()
    for row in ("| baseline |", "| faasmoe-shared |", "| 4 |", "| 16 |"):
        assert row in table
    for name in ("paper_memory.png", "paper_blocksize.png", "paper_heatmap.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name


def test_paper_toy_private_models_whole_model_reloads(tmp_path):
    out = tmp_path / "results"
    # 8 s with a 1 s keep-alive: tenant-0 idles ~2.5 s before its last burst, so its whole model reloads.
    main(["--toy", "--private-models", "--duration", "8", "--setups", "baseline,whole-model", "--no-plots",
          "--out-dir", str(out), "--models-root", str(tmp_path / "models")])

    doc = json.loads((out / "paper.json").read_text())
    base, whole = doc["setups"]
    assert (base["setup"], whole["setup"]) == ("baseline", "whole-model")
    models = whole["options"]["tenant_models"]
    assert len(set(models.values())) == 2  # each tenant its own fine-tune
    for s in doc["setups"]:
        assert {"gib_seconds", "cold_requests", "cold_ttft_p50_s", "cold_ttft_p99_s"} <= set(s)
        assert s["completed"] == s["requests"] == doc["meta"]["requests"]
        assert s["gib_seconds"] > 0 and s["cold_requests"] >= 1
    assert base["cold_starts"] == 0 and whole["cold_starts"] >= 1  # reloads of trunk and experts, from the ledgers
    assert "| whole-model |" in (out / "paper.md").read_text()
