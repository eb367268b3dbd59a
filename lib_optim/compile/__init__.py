"""Regional torch.compile: each UNet/DiT block compiled on its own, reused, restored exactly."""
