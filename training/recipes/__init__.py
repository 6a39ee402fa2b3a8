"""Training recipes, one per method, on the interface of :mod:`training.recipes.base`.

``RECIPES`` maps the config's ``recipe`` key to its class; :func:`build_model` assembles
the shared backbone with what the recipe adds to it.
"""
from typing import Dict, Type

from ..models import ReIDBackbone, build_model as build_backbone
from .base import Recipe, TrainContext, unwrap
from .lba import LbARecipe, batch_hard_triplet
from .mce import MCERecipe
from .pea import PEARecipe
from .peca import PECARecipe
from .saai import SAAIRecipe

RECIPES: Dict[str, Type[Recipe]] = {"lba": LbARecipe, "mce": MCERecipe, "saai": SAAIRecipe, "pea": PEARecipe,
                              "peca": PECARecipe}


def recipe_class(cfg: dict) -> Type[Recipe]:
    return RECIPES[cfg["recipe"]]


def build_model(cfg: dict, num_classes: int, log=print) -> ReIDBackbone:
    """The backbone of ``cfg["model"]`` with the recipe's classifier choice and extras."""
    recipe = recipe_class(cfg)
    model = build_backbone(cfg["model"], num_classes, classifier=recipe.uses_classifier(cfg), log=log,
                           bnneck=recipe.uses_bnneck(cfg))
    extras = recipe.build_extras(cfg, model)
    if extras is not None:
        model.extras = extras
    return model


__all__ = ["LbARecipe", "MCERecipe", "PEARecipe", "PECARecipe", "RECIPES", "SAAIRecipe", "Recipe", "TrainContext", "batch_hard_triplet", "build_model",
           "recipe_class", "unwrap"]
