"""Training recipes: a recipe turns a model output and labels into a loss."""
from .lba import LbARecipe, batch_hard_triplet

RECIPES = {"lba": LbARecipe}

__all__ = ["LbARecipe", "RECIPES", "batch_hard_triplet"]
