"""Synthetic data: generation from diffusion models, quality and memorization audit."""
