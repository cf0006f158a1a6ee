"""Quantized checkpoints through `faasmoe serve`: remote experts on worker processes and `--experts in-process`,
token for token and logprob for logprob against the in-process model, with the workers holding quantized bytes."""

from __future__ import annotations

import urllib.request

import openai
import pytest
import torch

from faasmoe.engine.offline import generate
from faasmoe.model.config import MoEConfig
from faasmoe.model.moe_model import MoEModel
from faasmoe.model.quantize import quantize_checkpoint
from faasmoe.model.synthetic.checkpoint_writer import init_checkpoint

from ..processes import faasmoe, free_port, serving

METHODS = ("fp8", "gptq-int4", "awq-int4")
PROMPT = [12, 250, 7, 99, 31, 5]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("quantized-serve")
    plain = init_checkpoint(root / "plain", "mixtral", seed=7, progress=False)
    fused = init_checkpoint(root / "fused", "mixtral", seed=7, progress=False, expert_format="fused")
    quantized = {m: quantize_checkpoint(plain, root / m, m, desc_act=m == "gptq-int4") for m in METHODS}
    return quantized | {"fp8-fused": quantize_checkpoint(fused, root / "fp8-fused", "fp8")}


def expected(path, block_size: int):
    return generate(MoEModel.from_pretrained(path, expert_block_size=block_size), [PROMPT], max_tokens=8,
                    ignore_eos=True)[0]


def completion(port: int, model: str):
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0, timeout=120)
    return client.completions.create(model=model, prompt=PROMPT, max_tokens=8, temperature=0, logprobs=1,
                                      extra_body={"ignore_eos": True}).choices[0]


def test_remote_experts_serve_every_format_as_the_in_process_model_does(models, tmp_path):
    port = free_port()
    entries = "".join(f'[[models]]\nname = "{m}"\npath = "{p}"\nexpert_block_size = 2\n\n' for m, p in models.items())
    config = tmp_path / "faasmoe.toml"
    config.write_text(f'[server]\nport = {port}\nworkers = 1\ndevice = "cpu"\nstate = "{tmp_path / "state.db"}"\n\n'
                      + entries)
    server = serving(port, "--config", str(config))
    try:
        for method, path in models.items():
            choice, reference = completion(port, method), expected(path, 2)
            assert choice.text == reference.text, method
            assert torch.allclose(torch.tensor(choice.logprobs.token_logprobs), torch.tensor(reference.logprobs),
                                  atol=1e-5), method
        cfg = {m: MoEConfig.from_pretrained(p) for m, p in models.items()}
        held = _metric(port, "faasmoe_resident_expert_bytes", 'tier="device"')
        quantized = sum(c.num_experts * len(c.moe_layers) * c.expert_bytes() for c in cfg.values())
        assert 0 < held <= quantized  # bf16 or fp32 blocks would hold 2-8x more
    finally:
        server.stop()


def test_in_process_experts_serve_a_quantized_checkpoint(models, tmp_path):
    port = free_port()
    proc = faasmoe("serve", str(models["awq-int4"]), "--experts", "in-process", "--port", str(port),
                   "--state", str(tmp_path / "state.db"), "--api-key", "unused")
    try:
        proc.wait_for("faasmoe serving", timeout=60)
        model = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused").models.list().data[0].id
        choice = completion(port, model)
        reference = expected(models["awq-int4"], 16)
        assert choice.text == reference.text
    finally:
        assert proc.stop() == 0, proc.output


def _metric(port: int, name: str, label: str) -> float:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=30) as response:
        text = response.read().decode()
    return sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith(name + "{") and label in line)
