"""Shared fixtures: tiny real checkpoints, built once per session."""

from __future__ import annotations

import os
import tempfile

import torch

# Content digests of the checkpoints tests build go to a cache of this run's own, not the user's ~/.cache.
os.environ.setdefault("FAASMOE_CACHE_DIR", tempfile.mkdtemp(prefix="faasmoe-test-cache-"))

# Tests run on 2 cores next to other processes; one thread per torch op keeps timings sane.
torch.set_num_threads(int(os.environ.get("FAASMOE_TEST_THREADS", "1")))
