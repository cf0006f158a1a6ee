"""The machinery of `bench/paper.py`, one job per module.

workload     seeded per-tenant request schedules (on/off Poisson, length distributions, token subsets)
checkpoints  the benchmark's model directories (real-shaped presets, router skew, a streaming tokenizer)
setups       the four deployments as real processes on loopback: start, endpoints, stop
loadgen      replays a schedule against the endpoints over streaming HTTP; TTFT and inter-token gaps
sampler      CPU % and RSS of every process of a setup (psutil), GPU memory (pynvml)
probe        resident expert bytes, per-function hits and cold starts, read from the running setup
runner       one measured run of one setup: start, warm up, replay, sample, stop
summary      percentiles and window statistics: the per-setup object of paper.json
calibrate    router skew against published measurements, from the checkpoint's own router
report       the Markdown tables and the JSON
plots        the PNGs
"""
