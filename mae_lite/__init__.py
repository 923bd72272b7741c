"""mae-lite: self-supervised pre-training of lightweight Vision Transformers (MAE-Lite, ICML 2023).

Importing the package registers its models in timm: `timm.create_model("mae_vit_tiny_patch16")`.
"""
from . import models  # noqa: F401  (registers the architectures)
from .engine.checkpoint import load_pretrained

__all__ = ["load_pretrained", "models"]

__version__ = "0.1.0"
