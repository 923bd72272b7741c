"""Logging: one text log per launch in the output folder, console lines that do not break tqdm bars."""
from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Optional

from tqdm import tqdm

LOGGER = logging.getLogger("mae_lite")


class _TqdmHandler(logging.StreamHandler):
    def emit(self, record: logging.LogRecord) -> None:
        try:
            tqdm.write(self.format(record))
        except Exception:  # never let logging kill a run
            self.handleError(record)


def setup_logging(out_dir: Optional[Path], rank: int, prefix: str = "train_log") -> Optional[Path]:
    """Console (rank 0: info, others: warnings) and, on rank 0, `<out_dir>/<prefix>-<timestamp>.txt`."""
    close_logging()
    LOGGER.setLevel(logging.INFO)
    LOGGER.propagate = False
    fmt = logging.Formatter(f"[rank {rank}] %(asctime)s | %(levelname)s | %(message)s", "%Y-%m-%d %H:%M:%S")
    console = _TqdmHandler()
    console.setLevel(logging.INFO if rank == 0 else logging.WARNING)
    console.setFormatter(fmt)
    LOGGER.addHandler(console)
    if rank != 0 or out_dir is None:
        return None
    path = Path(out_dir) / f"{prefix}-{time.strftime('%Y-%m-%d-%H-%M-%S')}.txt"
    fh = logging.FileHandler(path, mode="a")
    fh.setFormatter(fmt)
    LOGGER.addHandler(fh)
    return path


def close_logging() -> None:
    for h in list(LOGGER.handlers):
        h.close()
        LOGGER.removeHandler(h)
