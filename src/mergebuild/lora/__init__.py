"""LoRA and LyCORIS files as recipe inputs: read, map to checkpoint keys, ΔW, bake (streamed).

A LoRA holds small factors per module; a checkpoint holds the full weights. `formats` groups a
file's tensors into modules and names the algorithm, `keymap` finds each module's checkpoint
tensor, `delta` turns factors into ΔW, and `source` presents a LoRA to the engine as ΔW tensors
under checkpoint key names, so a bake streams key by key like every merge.
"""
