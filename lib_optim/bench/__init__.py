"""Benchmarks: attention kernels, whole generations, regional compile and the VAE, side by side in one run."""
