"""Sampling pipelines: samplers, window restoration and flow-guided latent warping."""
