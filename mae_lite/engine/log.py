"""Logging: one text log per launch in the output folder, console lines that do not break tqdm bars."""
from __future__ import annotations

import logging
import sys
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


class _LogFile(logging.FileHandler):
    """The run's text log. A write that fails (a full disk, a quota) turns it off with one console line, instead of
    a traceback for every later record; the run itself then stops at its next checkpoint with the reason."""

    def handleError(self, record: logging.LogRecord) -> None:
        err = sys.exc_info()[1]
        if not isinstance(err, OSError):
            return super().handleError(record)
        LOGGER.removeHandler(self)
        try:
            self.close()
        except OSError:  # closing flushes the same unwritable buffer
            pass
        LOGGER.warning("warning: the log file %s cannot be written (%s): the log goes to the console only from here",
                       self.baseFilename, err.strerror or err)


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
    fh = _LogFile(path, mode="a")
    fh.setFormatter(fmt)
    LOGGER.addHandler(fh)
    return path


def close_logging() -> None:
    for h in list(LOGGER.handlers):
        h.close()
        LOGGER.removeHandler(h)
