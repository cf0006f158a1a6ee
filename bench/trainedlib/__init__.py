"""A small MoE with trained routing, made on this machine: its corpus, its training, its routing statistics."""
