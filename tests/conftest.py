"""Shared fixtures: tiny real checkpoints, built once per session."""

from __future__ import annotations

import os

import torch

# Tests run on 2 cores next to other processes; one thread per torch op keeps timings sane.
torch.set_num_threads(int(os.environ.get("FAASMOE_TEST_THREADS", "1")))
