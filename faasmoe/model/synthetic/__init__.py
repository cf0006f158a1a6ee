"""`faasmoe model init`: presets of real model shapes, random checkpoints in the HF format, and
their tokenizer files, so everything runs without a download."""
