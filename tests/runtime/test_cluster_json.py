"""The cluster JSON names tenants' private functions only to admins, even when a worker lost their spec."""

from __future__ import annotations

from runtime import protocol as p
from runtime.cluster import worker_json


def test_a_private_block_is_not_named_in_the_public_view_even_without_its_owner() -> None:
    info = p.WorkerInfo("w0", "127.0.0.1:1", "cpu", 1, 100, 100)
    shared = p.FunctionSpec("m/0/0@abc", "/m", 0, 0, 1, "float32", 10)
    private = p.FunctionSpec("acme:m/0/1@def", "/m", 0, 1, 1, "float32", 10, "acme")
    # A host-cache entry whose spec the worker no longer has comes back with an empty owner.
    lost = p.FunctionSpec("acme:m/0/2@fed", "", -1, 0, 0)
    stats = p.Stats(1, info, [p.ResidentFunction(shared, "device", 10), p.ResidentFunction(private, "device", 10),
                              p.ResidentFunction(lost, "host", 10)], {"host_bytes": 10})
    public = worker_json(stats, private=False)
    assert public["resident_functions"] == ["m/0/0@abc"] and public["host_functions"] == []
    assert public["resident_bytes"] == 30  # the bytes still count
    admin = worker_json(stats, private=True)
    assert admin["resident_functions"] == ["acme:m/0/1@def", "m/0/0@abc"] and admin["host_functions"] == ["acme:m/0/2@fed"]
