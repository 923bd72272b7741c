"""Recipes by name: built-in names, the original's `*_exp.py` file names, or a user's Python file defining `Exp`."""
from __future__ import annotations

import importlib
import importlib.util
import pkgutil
import sys
from pathlib import Path

from ..errors import UserError
from .base import Recipe
from .finetune import Finetune, FinetuneMAE, FinetuneRPE
from .detection import MaskRCNNViTDet
from .linprobe import LinProbe
from .mae_lite import MaeLite, MaeLiteDemo
from .mae_lite_distill import MaeLiteDistill
from .mocov3 import MoCoV3Recipe
from .transfer import FinetuneTransfer


def _discover() -> dict[str, type[Recipe]]:
    """Every recipe class defined in a module of this package: adding a recipe is adding a file."""
    found: dict[str, type[Recipe]] = {}
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
        module = importlib.import_module(f"{__name__}.{info.name}")
        for obj in vars(module).values():
            if (isinstance(obj, type) and issubclass(obj, Recipe) and obj.__module__ == module.__name__
                    and obj.name != "base"):
                if obj.name in found and found[obj.name] is not obj:
                    raise RuntimeError(f"two recipes are named {obj.name!r}: {found[obj.name]} and {obj}")
                found[obj.name] = obj
    return found


RECIPES: dict[str, type[Recipe]] = _discover()


def _lookup() -> dict[str, type[Recipe]]:
    table = dict(RECIPES)
    for r in RECIPES.values():
        for alias in r.aliases:
            table[alias] = r
    return table


def resolve_recipe(spec: str) -> type[Recipe]:
    """A built-in name (`mae_lite`), the seed's file name (`mae_lite_exp.py`), or a path to a file with `Exp`.

    Built-in names win over files of the same name in the current folder; write `./name.py` to force the file.
    """
    table = _lookup()
    if spec in table and "/" not in spec:
        return table[spec]
    path = Path(spec)
    if not path.is_file():
        raise UserError(f"unknown recipe {spec!r}: use one of {', '.join(sorted(table))}, or a path to a Python file "
                        "that defines `class Exp(Recipe)`")
    mod_name = f"mae_lite_user_recipe_{abs(hash(str(path.resolve())))}"
    spec_ = importlib.util.spec_from_file_location(mod_name, path)
    module = importlib.util.module_from_spec(spec_)
    sys.modules[mod_name] = module
    try:
        spec_.loader.exec_module(module)
    except Exception as e:
        where = f" (line {e.lineno})" if isinstance(e, SyntaxError) else ""
        raise UserError(f"cannot load recipe file {path}{where}: {type(e).__name__}: {e}".splitlines()[0]) from None
    exp = getattr(module, "Exp", None)
    if not (isinstance(exp, type) and issubclass(exp, Recipe)):
        raise UserError(f"{path} must define `class Exp` deriving from a mae_lite recipe (e.g. mae_lite.recipes.MaeLite)")
    return exp


__all__ = ["RECIPES", "Finetune", "FinetuneMAE", "FinetuneRPE", "FinetuneTransfer", "LinProbe", "MaeLite", "MaeLiteDemo",
           "MaeLiteDistill", "MaskRCNNViTDet", "MoCoV3Recipe", "Recipe", "resolve_recipe"]
