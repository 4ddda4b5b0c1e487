"""Pretraining engine: Lightning MAE, contrastive and diffusion objectives."""
