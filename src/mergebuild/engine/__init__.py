"""The merge engine: tensor IO, merge methods, and the streaming executor (imports torch)."""
