"""The VAE: a torch-only SD VAE, our exact tiled decoder/encoder and the VAE memory model."""
