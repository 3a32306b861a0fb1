"""sdatc: diffusion-based compressed video super-resolution (x4) on Stable Diffusion 2.1."""

__version__ = "0.1.0"
