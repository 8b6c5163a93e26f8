"""erasure: remove a concept from text-to-image diffusion models (RGD and baselines) on diffusers."""

__version__ = "0.1.0"
