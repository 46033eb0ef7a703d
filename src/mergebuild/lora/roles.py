"""Before a build: LoRA models only where LoRAs go, checkpoints only where checkpoints go.

Whether a model is a LoRA is read from its safetensors header (no torch), once its file is
known; a mix-up is a recipe error located at the node or output that uses the model.
"""

from __future__ import annotations

from pathlib import Path

from mergebuild.errors import Problem, RecipeError
from mergebuild.recipe.model import Recipe

LORA_TAKERS = ("bake_lora", "merge_loras")  # methods whose `loras` are LoRA files
LORA_MAKERS = {"extract_lora": "an extracted", "merge_loras": "a merged"}  # make LoRA factors


def lora_models(paths: dict[str, Path]) -> set[str]:
    from mergebuild.lora.source import header_is_lora

    out = set()
    for name, path in paths.items():
        try:
            if header_is_lora(path):
                out.add(name)
        except Exception:  # an unreadable file is reported by the build, with its reason
            continue
    return out


def check_roles(recipe: Recipe, paths: dict[str, Path]) -> None:
    """Raise RecipeError for a LoRA used as a checkpoint or a checkpoint used as a LoRA."""
    from mergebuild.engine.methods import REGISTRY

    loras = lora_models(paths)
    made = {n.name: LORA_MAKERS[n.method] for n in recipe.nodes.values() if n.method in LORA_MAKERS}
    problems = []
    bake = "bake it into a checkpoint: `model + lora(NAME, 0.6)` or method bake_lora"
    for node in recipe.nodes.values():
        method = REGISTRY.get(node.method)
        takes_loras = method is not None and method.name in LORA_TAKERS
        for slot, ref in node.inputs.items():
            wants_lora = takes_loras and slot != "base"
            if ref in made and not wants_lora:
                problems.append(
                    Problem(
                        f"merge '{node.name}': '{ref}' is {made[ref]} LoRA (its keys are LoRA "
                        f"factors), not a checkpoint; {bake}",
                        node.location,
                    )
                )
            elif ref in made and recipe.nodes[ref].cache is False:
                problems.append(
                    Problem(
                        f"merge '{node.name}': '{ref}' is {made[ref]} LoRA with 'cache: false'; "
                        "a LoRA made in the recipe is read back from the cache: drop "
                        "'cache: false'",
                        node.location,
                    )
                )
            elif ref in made:
                continue  # built in an earlier pass, then read as a LoRA (execute.py)
            elif ref in loras and not wants_lora:
                where = f"'{method.base_name}' of bake_lora" if takes_loras else "an input"
                problems.append(
                    Problem(
                        f"merge '{node.name}': '{ref}' is a LoRA, not a checkpoint, so it cannot "
                        f"be {where}; {bake}",
                        node.location,
                    )
                )
            elif wants_lora and ref not in loras:
                what = "a checkpoint" if ref in paths else "a merge node (a checkpoint)"
                if ref in paths and paths[ref].suffix.lower() not in (".safetensors", ".sft"):
                    what = "not a .safetensors file (LoRAs are read from .safetensors only)"
                problems.append(
                    Problem(
                        f"merge '{node.name}': '{ref}' is {what}, not a LoRA; {method.name}'s "
                        "'loras' are LoRA files (kohya, LyCORIS or diffusers/PEFT)",
                        node.location,
                    )
                )
    for out in recipe.outputs.values():
        for ref, what in ((out.source, "from"), (out.vae, "vae")):
            if ref is not None and ref in loras:
                problems.append(
                    Problem(
                        f"output '{out.name}': '{ref}' is a LoRA; an output's '{what}' is a "
                        f"checkpoint or a merge node ({bake})",
                        out.location,
                    )
                )
    if problems:
        raise RecipeError(problems)
