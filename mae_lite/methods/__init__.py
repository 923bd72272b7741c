"""Methods: a network plus what its training step returns, `(loss, logs)`."""
from .classify import Classify
from .distill import MAEDistill
from .mae import MAE

__all__ = ["Classify", "MAE", "MAEDistill"]
