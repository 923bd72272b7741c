"""Optional dependencies, imported where a feature uses them: pre-training, fine-tuning and the CLI's options work
without them, and a feature that needs one says in one line which extra installs it."""
from __future__ import annotations

import importlib
from types import ModuleType

from .errors import UserError

# import name -> (the pip requirement pyproject.toml pins, the mae-lite extra that installs it)
PACKAGES = {
    "pycocotools": ("pycocotools==2.0.11", "detection"),
    "cv2": ("opencv-python-headless==4.14.0.94", "segmentation"),
    "webdataset": ("webdataset==1.0.2", "shards"),
    "braceexpand": ("braceexpand==0.1.7", "shards"),
    "sklearn": ("scikit-learn==1.9.1", "findings"),
}


def require(module: str, feature: str) -> ModuleType:
    """`module` (e.g. "pycocotools.coco") imported, or a UserError naming `feature`, the extra and the pin."""
    top = module.split(".")[0]
    try:
        return importlib.import_module(module)
    except ImportError as e:
        pin, extra = PACKAGES[top]
        missing = isinstance(e, ModuleNotFoundError) and (e.name or "").split(".")[0] == top
        # an installed but broken package (a missing shared library, a numpy ABI mismatch) is not "not installed"
        state = "which is not installed" if missing else f"which fails to import ({' '.join(str(e).split())[:120]})"
        raise UserError(f"{feature} needs {top}, {state}: pip install 'mae-lite[{extra}]' (or pip install {pin})"
                        ) from None
