"""Device resolution of `faasmoe serve`: the worker pool's devices and where the trunk runs (no GPU needed)."""

from __future__ import annotations

import pytest

from faasmoe.serve import devices
from faasmoe.serve.devices import resolve_devices, trunk_device


@pytest.mark.parametrize("spec,gpus,pool,trunk", [
    (None, 0, ["cpu"], "cpu"),
    (None, 2, ["cuda:0", "cuda:1"], "cuda:0"),  # no --device on a GPU box: the trunk goes to the GPU too
    ("cuda", 2, ["cuda:0", "cuda:1"], "cuda:0"),
    ("cuda:1", 2, ["cuda:1"], "cuda:1"),  # not cuda:0
    ("cuda:1,cuda:0", 2, ["cuda:1", "cuda:0"], "cuda:1"),
    ("cpu", 2, ["cpu"], "cpu"),
])
def test_pool_and_trunk_devices(spec, gpus, pool, trunk) -> None:
    assert resolve_devices(spec, cuda_devices=gpus) == pool
    assert trunk_device(spec, cuda_devices=gpus) == trunk


@pytest.mark.parametrize("spec,gpus,message", [("cuda", 0, "not available"), ("cuda:2", 2, "cuda:0..cuda:1"),
                                                ("cuda:0", 0, "no CUDA device"), (",", 1, "name cpu")])
def test_devices_that_do_not_exist_are_errors(spec, gpus, message) -> None:
    with pytest.raises(ValueError, match=message):
        resolve_devices(spec, cuda_devices=gpus)


def test_the_default_asks_torch(monkeypatch) -> None:
    monkeypatch.setattr(devices.torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(devices.torch.cuda, "device_count", lambda: 3)
    assert trunk_device(None) == "cuda:0" and resolve_devices(None) == ["cuda:0", "cuda:1", "cuda:2"]
    monkeypatch.setattr(devices.torch.cuda, "is_available", lambda: False)
    assert trunk_device(None) == "cpu"


def test_serve_puts_the_trunk_where_the_pool_is(monkeypatch, tmp_path) -> None:
    from faasmoe.model.synthetic.checkpoint_writer import init_checkpoint
    from faasmoe.serve.process import FrontendProcess, ServeOptions

    model = init_checkpoint(tmp_path / "tiny", "qwen2_moe", seed=1, progress=False)
    monkeypatch.setattr(devices, "cuda_device_count", lambda: 2)
    for flag, want in ((None, "cuda:0"), ("cuda:1", "cuda:1"), ("cpu", "cpu")):
        process = FrontendProcess(ServeOptions(model_dirs=[model], device=flag, state=tmp_path / "state.db"))
        process.client = object()  # remote experts: nothing is loaded onto the (absent) GPU
        monkeypatch.setattr("faasmoe.serve.process.RemoteExpertExecutor", lambda *args: None)
        assert process._deployment(process.config.models[0]).spec.device == want
