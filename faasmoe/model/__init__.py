"""The model: HF configs and checkpoints, tokenizer, layers and kernels, KV cache, the trunk,
expert blocks and `MoEModel`. Imports nothing else of the project (workers load it too)."""

from faasmoe.model.config import MoEConfig
from faasmoe.model.moe_model import MoEModel

__all__ = ["MoEConfig", "MoEModel"]
