"""Stable Diffusion knowledge: architectures, components, UNet blocks, presets (no torch)."""
