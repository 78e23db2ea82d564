"""kneegen: train diffusion models on knee MRI slices and generate new ones."""

__version__ = "0.1.0"
