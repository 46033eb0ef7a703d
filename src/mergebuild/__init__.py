"""mergebuild: declarative, cached, reproducible Stable Diffusion checkpoint merges."""

__version__ = "0.1.0"
