"""Expert functions named by content, end to end: a base and two fine-tunes of it served by one
`faasmoe serve` hold the blocks they share once, each answers as transformers does on its own
checkpoint, a private fine-tune stays private and pays for itself, and a load whose bytes are not
what its id names is refused with an error that says so.

tunea: one expert of one layer fine-tuned whole (ESFT), private to tenant acme.
tuneb: three values changed a third of the way into one expert's down_proj (between any samples).
solo: a copy of the base served with `dedupe = false`, whose expert bytes change on disk after start.
"""

from __future__ import annotations

import concurrent.futures
import json
import urllib.error
import urllib.request

import pytest
import torch

from faasmoe.model.config import MoEConfig
from faasmoe.model.synthetic.checkpoint_writer import init_checkpoint

from ..checkpoint_edits import copy_checkpoint, overwrite_middle, retrain_tensor
from ..processes import free_port, serving

transformers = pytest.importorskip("transformers")

KEYS = {"acme": "fm-acme-shared-0123456789abcdefghijklmnopq", "globex": "fm-globex-shared-0123456789abcdefghijklmno"}
PROMPT = [(i * 37 + 11) % 900 + 20 for i in range(128)]  # 128 tokens x top-2: every expert of every layer is hit
TOKENS = 4


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("shared")
    base = init_checkpoint(root / "base", "qwen2_moe", seed=21, progress=False)
    config = MoEConfig.from_pretrained(base)
    first, last = config.moe_layers[0], config.moe_layers[-1]
    tunea = copy_checkpoint(base, root / "tunea")
    for seed, proj in enumerate(("gate_proj", "up_proj", "down_proj")):
        retrain_tensor(tunea, f"model.layers.{first}.mlp.experts.3.{proj}.weight", seed=seed)
    tuneb = copy_checkpoint(base, root / "tuneb")
    overwrite_middle(tuneb, f"model.layers.{last}.mlp.experts.6.down_proj.weight")
    solo = copy_checkpoint(base, root / "solo")
    return {"base": base, "tunea": tunea, "tuneb": tuneb, "solo": solo, "changed": (first, 3, last, 6)}


@pytest.fixture(scope="module")
def server(checkpoints, tmp_path_factory):
    root = tmp_path_factory.mktemp("shared-serve")
    block = MoEConfig.from_pretrained(checkpoints["base"]).expert_bytes(torch.float32)
    port = free_port()
    models = "".join(
        f'[[models]]\nname = "{name}"\npath = "{checkpoints[name]}"\nexpert_block_size = 1\nkeep_alive = 600\n{extra}\n'
        for name, extra in (("base", ""), ("tunea", 'sharing = "private"\nowner = "acme"\n'), ("tuneb", ""),
                            ("solo", "dedupe = false\n")))
    config = root / "faasmoe.toml"
    config.write_text(
        f'[server]\nport = {port}\nworkers = 1\ndevice = "cpu"\nstate = "{root / "state.db"}"\n\n{models}'
        f'[[tenants]]\nname = "acme"\nmodels = ["*"]\napi_keys = ["{KEYS["acme"]}"]\nadmin = true\n'
        f'memory_quota = {block * 3 // 2}\n'  # a block and a half: what only acme uses, not what it shares
        f'[[tenants]]\nname = "globex"\nmodels = ["*"]\napi_keys = ["{KEYS["globex"]}"]\n')
    proc = serving(port, "--config", str(config))
    yield proc
    proc.stop()


def call(server, path: str, tenant: str, body: dict | None = None) -> tuple[int, dict]:
    request = urllib.request.Request(server.url + path, data=None if body is None else json.dumps(body).encode(),
                                     headers={"Authorization": f"Bearer {KEYS[tenant]}",
                                              "Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            return response.status, json.loads(response.read() or b"{}")
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read() or b"{}")


def complete(server, model: str, tenant: str) -> tuple[int, dict]:
    return call(server, "/v1/completions", tenant, {"model": model, "prompt": PROMPT, "max_tokens": TOKENS,
                                                   "temperature": 0, "logprobs": 1, "ignore_eos": True})


def reference(path) -> tuple[list[int], list[float]]:
    """transformers' greedy tokens and their logprobs on this checkpoint."""
    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    ids, logprobs = list(PROMPT), []
    with torch.no_grad():
        for _ in range(TOKENS):
            logits = model(torch.tensor([ids])).logits[0, -1].float()
            token = int(logits.argmax())
            logprobs.append(float(torch.log_softmax(logits, -1)[token]))
            ids.append(token)
    return ids[len(PROMPT):], logprobs


def device_bytes(server) -> float:
    with urllib.request.urlopen(server.url + "/metrics", timeout=60) as response:
        text = response.read().decode()
    return sum(float(line.split()[-1]) for line in text.splitlines()
               if line.startswith("faasmoe_resident_expert_bytes{") and 'tier="device"' in line)


def test_fine_tunes_share_their_base_blocks_and_answer_as_transformers(server, checkpoints):
    from faasmoe.model.tokenizer import Tokenizer

    assert complete(server, "tunea", "globex")[0] == 404  # a private model is invisible to others
    status, models = call(server, "/v1/models", "globex")
    assert status == 200 and "tunea" not in {m["id"] for m in models["data"]}
    for model, tenant in (("base", "globex"), ("tunea", "acme"), ("tuneb", "globex")):
        status, out = complete(server, model, tenant)
        assert status == 200, out
        tokens, logprobs = reference(checkpoints[model])
        assert out["choices"][0]["text"] == Tokenizer.from_pretrained(checkpoints[model]).decode(tokens), model
        served = out["choices"][0]["logprobs"]["token_logprobs"]
        assert torch.allclose(torch.tensor(served), torch.tensor(logprobs), atol=1e-4), (model, served, logprobs)
    # acme's quota (1.5 blocks) counts only the block that only its model uses: tunea runs again.
    assert complete(server, "tunea", "acme")[0] == 200

    status, cluster = call(server, "/admin/cluster", "acme")
    assert status == 200, cluster
    per_model = cluster["models"]["base"]["functions"]
    resident = [f for w in cluster["workers"] for f in w["resident_functions"]]
    assert len(resident) == len(set(resident)) == per_model + 2, (len(resident), per_model)
    for name in ("base", "tunea", "tuneb"):
        assert cluster["models"][name]["resident_functions"] == per_model, (name, cluster["models"][name])
    block = MoEConfig.from_pretrained(checkpoints["base"]).expert_bytes(torch.float32)
    assert cluster["distinct_resident_bytes"] == (per_model + 2) * block == device_bytes(server)
    first, expert_a, last, expert_b = checkpoints["changed"]
    by_name = {name: f for f in cluster["functions"].values() for name in [f["name"]]}
    assert len(cluster["functions"]) == per_model + 2
    own_a = [f for f in cluster["functions"].values() if f["models"] == ["tunea"]]
    own_b = [f for f in cluster["functions"].values() if f["models"] == ["tuneb"]]
    assert [(f["layer"], f["first"], f["owner"], f["tenants"]) for f in own_a] == [(first, expert_a, "acme", ["acme"])]
    assert [(f["layer"], f["first"], f["owner"]) for f in own_b] == [(last, expert_b, "")]
    shared = [f for f in cluster["functions"].values() if len(f["models"]) == 3]
    assert len(shared) == per_model - 2 and all(f["models"] == ["base", "tunea", "tuneb"] for f in shared)
    assert all(f["tenants"] == ["acme", "globex"] and f["owner"] == "" for f in shared)
    assert by_name  # names are for people: model/layer/block of the first model that named the block
    trunks = {name: cluster["models"][name]["trunk_bytes"] for name in ("base", "tunea", "tuneb")}
    assert cluster["distinct_trunk_bytes"] == trunks["base"] == trunks["tunea"] > 0  # one trunk's tensors, shared

    status, dash = call(server, "/admin/dashboard.json", "acme")
    assert status == 200
    shared_with = {m["name"]: m["shared_with"] for m in dash["models"]}
    assert shared_with["tunea"] == {"base": per_model - 1, "tuneb": per_model - 2}, shared_with
    assert shared_with["solo"] == {} and dash["frontend"]["trunk_bytes"] == trunks["base"]

    status, usage = call(server, "/v1/usage?tenant=acme", "acme")
    rows = {row["model"]: row for row in usage["data"]}
    assert rows["tunea"]["expert_invocations"] > 0 and "tuneb" not in rows  # each pays for its own calls
    status, usage = call(server, "/v1/usage?tenant=globex", "acme")
    assert "tunea" not in {row["model"] for row in usage["data"]}


def invoke_messages(server) -> float:
    """Invoke messages the workers have answered (one per worker per layer call)."""
    with urllib.request.urlopen(server.url + "/metrics", timeout=60) as response:
        text = response.read().decode()
    return sum(float(line.split()[-1]) for line in text.splitlines()
               if line.startswith("faasmoe_worker_invoke_seconds_count"))


def test_a_base_and_its_fine_tunes_step_as_one_batch(server):
    """Requests to the base and both fine-tunes at once batch together: the same tokens as each alone, and
    one message per layer for all three (three models stepped apart would send three)."""
    status, dash = call(server, "/admin/dashboard.json", "acme")
    steps_with = {m["name"]: sorted(m["steps_with"]) for m in dash["models"]}
    assert steps_with["base"] == ["tunea", "tuneb"] and steps_with["tunea"] == ["base", "tuneb"], steps_with
    assert steps_with["solo"] == []  # dedupe = false: it steps alone
    jobs = (("base", "globex"), ("tunea", "acme"), ("tuneb", "globex"))
    body = {"prompt": PROMPT[:8], "max_tokens": 24, "temperature": 0, "ignore_eos": True, "logprobs": 1,
            "return_tokens_as_token_ids": True}

    def tokens(model: str, tenant: str) -> list[str]:
        status, out = call(server, "/v1/completions", tenant, {"model": model, **body})
        assert status == 200, out
        return out["choices"][0]["logprobs"]["tokens"]

    before = invoke_messages(server)
    alone = {model: tokens(model, tenant) for model, tenant in jobs}
    apart = invoke_messages(server) - before
    with concurrent.futures.ThreadPoolExecutor(len(jobs)) as pool:
        futures = {model: pool.submit(tokens, model, tenant) for model, tenant in jobs}
        together = {model: f.result() for model, f in futures.items()}
    batched = invoke_messages(server) - before - apart
    assert together == alone
    assert alone["base"] != alone["tunea"] or alone["base"] != alone["tuneb"]  # the tunes' own experts answered
    assert batched < 0.7 * apart, (batched, apart)


def test_a_load_whose_bytes_are_not_its_id_is_refused_with_the_reason(server, checkpoints):
    first, _, _, _ = checkpoints["changed"]
    # solo opts out of sharing: its blocks are its own functions, never loaded yet; change one on disk.
    overwrite_middle(checkpoints["solo"], f"model.layers.{first}.mlp.experts.9.gate_proj.weight")
    status, out = complete(server, "solo", "globex")
    assert status == 500, out
    message = out["error"]["message"]
    assert "content_mismatch" in message and "hash to" in message and f"layer {first}" in message, message
    status, out = complete(server, "base", "globex")  # the worker lives on, and so do the other models
    assert status == 200, out
