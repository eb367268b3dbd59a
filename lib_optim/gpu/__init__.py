"""The machine's GPUs and torch, probed without initialising CUDA where possible."""
