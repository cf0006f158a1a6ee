"""The cluster JSON names tenants' private functions only to admins, even when a worker lost their spec."""

from __future__ import annotations

from runtime import protocol as p
from runtime.cluster import worker_json


def test_a_private_block_is_not_named_in_the_public_view_even_without_its_owner() -> None:
    info = p.WorkerInfo("w0", "127.0.0.1:1", "cpu", 1, 100, 100)
    shared = p.FunctionSpec("a0c1", "/m", 0, 0, 1, "float32", 10, name="m/0/0")
    private = p.FunctionSpec("d3f4", "/m", 0, 1, 1, "float32", 10, "acme", name="acme:m/0/1")
    # A host-cache entry whose spec the worker no longer has comes back with an empty owner (and layer -1).
    lost = p.FunctionSpec("fed5", "", -1, 0, 0)
    stats = p.Stats(1, info, [p.ResidentFunction(shared, "device", 10), p.ResidentFunction(private, "device", 10),
                              p.ResidentFunction(lost, "host", 10)], {"host_bytes": 10})
    public = worker_json(stats, private=False)
    assert public["resident_functions"] == ["a0c1"] and public["host_functions"] == []
    assert public["resident_bytes"] == 30  # the bytes still count
    admin = worker_json(stats, private=True)
    assert admin["resident_functions"] == ["a0c1", "d3f4"] and admin["host_functions"] == ["fed5"]
