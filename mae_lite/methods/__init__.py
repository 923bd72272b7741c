"""Methods: a network plus what its training step returns, `(loss, logs)`."""
from .classify import Classify
from .detect import Detect
from .distill import MAEDistill
from .linprobe import LinearProbe
from .mae import MAE
from .mocov3 import MoCoV3

__all__ = ["Classify", "Detect", "LinearProbe", "MAE", "MAEDistill", "MoCoV3"]
