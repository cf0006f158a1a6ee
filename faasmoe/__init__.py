"""FaaSMoE: serverless Mixture-of-Experts serving; experts are functions that scale to zero.

Layers, each importing only the ones below it: `model` (math and checkpoints) <- `engine`
(batching, expert executors) <- `api` (HTTP); `tenancy` (tenants, limits, ledger); `serve`
(the all-in-one process); `cli`. The FaaS control plane is `runtime/`, the execution plane `worker/`.
"""
