"""Methods: a network plus what its training step returns, `(loss, logs)`."""
from .mae import MAE

__all__ = ["MAE"]
