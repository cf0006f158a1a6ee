"""A checkpoint that changes under a running server is never served as if it had not: replaced
atomically (a new file renamed over the old) or truncated in place while its experts were scaled to
zero, the next request fails with an error that names the cause, not a 200 with other weights."""

from __future__ import annotations

import json
import os
import shutil
import time
import urllib.error
import urllib.request

import pytest

from faasmoe.model.checkpoint import CheckpointReader
from faasmoe.model.synthetic.checkpoint_writer import init_checkpoint

from ..processes import free_port, serving

KEY = "fm-changed-0123456789abcdefghijklmnopqrstuvw"
PROMPT = [(i * 53 + 7) % 900 + 20 for i in range(64)]  # 64 tokens x top-2: every expert of every layer is hit
LAST = 2  # the tiny qwen2_moe's last MoE layer


def call(server, path: str, body: dict | None = None) -> tuple[int, dict]:
    request = urllib.request.Request(server.url + path, None if body is None else json.dumps(body).encode(),
                                     {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read() or b"{}")


def complete(server, model: str) -> tuple[int, dict]:
    return call(server, "/v1/completions", {"model": model, "prompt": PROMPT, "max_tokens": 2, "temperature": 0})


@pytest.fixture
def server(tmp_path):
    models = {name: init_checkpoint(tmp_path / name, "qwen2_moe", seed=seed, progress=False)
              for name, seed in (("replaced", 31), ("truncated", 32))}
    port = free_port()
    proc = serving(port, *map(str, models.values()), "--port", str(port), "--workers", "1", "--device", "cpu",
                   "--keep-alive", "1", "--expert-block-size", "4", "--state", str(tmp_path / "state.db"),
                   env={"FAASMOE_API_KEY": KEY})
    proc.models = models
    yield proc
    proc.stop()


def test_a_replaced_or_truncated_checkpoint_fails_with_its_cause(server, tmp_path):
    for model in server.models:
        assert complete(server, model)[0] == 200
    deadline = time.monotonic() + 30
    while call(server, "/admin/cluster")[1]["distinct_resident_bytes"] > 0:  # every block scaled to zero
        assert time.monotonic() < deadline, "the experts never scaled to zero"
        time.sleep(0.2)

    other = init_checkpoint(tmp_path / "other", "qwen2_moe", seed=33, progress=False)
    target = server.models["replaced"] / "model.safetensors"
    staged = target.with_name("model.safetensors.new")
    shutil.copyfile(other / "model.safetensors", staged)
    os.replace(staged, target)  # atomically: the worker's open descriptor still reads the old file
    cut = CheckpointReader(server.models["truncated"]).entry(f"model.layers.{LAST}.mlp.experts.0.down_proj.weight")
    os.truncate(cut.file, cut.offset + 16)  # in place, through an expert of the last layer and all after it

    status, out = complete(server, "replaced")
    assert status == 500, out
    assert "content_mismatch" in out["error"]["message"] and "hash to" in out["error"]["message"], out
    status, out = complete(server, "truncated")
    assert status in (500, 503) and status != 200, out
    assert "truncated" in out["error"]["message"], out
