"""The payoff benchmark (bench/payoff.py): per-expert scale to zero against whole-model scale to zero and
always-on, over a keep-alive sweep on a bursty multi-tenant trace of a trained MoE with ESFT tenants."""
