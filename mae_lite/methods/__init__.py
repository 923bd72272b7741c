"""Methods: a network plus what its training step returns, `(loss, logs)`."""
from .classify import Classify
from .classify_distill import ClassifyDistill
from .detect import Detect
from .distill import MAEDistill
from .distill_d2 import MAEDistillD2
from .linprobe import LinearProbe
from .mae import MAE
from .mocov3 import MoCoV3
from .segment import Segment

__all__ = ["Classify", "ClassifyDistill", "Detect", "LinearProbe", "MAE", "MAEDistill", "MAEDistillD2", "MoCoV3", "Segment"]
