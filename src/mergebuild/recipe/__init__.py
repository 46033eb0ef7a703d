"""Recipe parsing and validation: YAML text → validated, resolved `Recipe`."""

from mergebuild.recipe.load import load_recipe
from mergebuild.recipe.model import ModelInput, NodeSpec, OutputSpec, Recipe

__all__ = ["ModelInput", "NodeSpec", "OutputSpec", "Recipe", "load_recipe"]
