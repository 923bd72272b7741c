"""Pieces shared by the console commands: recipe construction from arguments, one-line errors."""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Callable, Optional

from ..errors import UserError
from ..recipes import Recipe, resolve_recipe
from ..recipes.options import parse_pairs


def build_recipe(spec: str, options: Optional[list[str]], batch_size: Optional[int] = None,
                 max_epoch: Optional[int] = None) -> Recipe:
    """The recipe named by `-f`, with `--exp-options`, then `-b` and `-e` applied on top."""
    recipe = resolve_recipe(spec)(**parse_pairs(options))
    cli = {k: v for k, v in (("batch_size", batch_size), ("max_epoch", max_epoch)) if v is not None}
    if cli:
        recipe.update(cli)
    return recipe


def make_output_dir(path: Path) -> None:
    """Create the run's output folder, or stop with one line naming it (a read-only or non-existent mount, a
    path under a regular file), before any process is spawned or any collective is entered."""
    try:
        Path(path).mkdir(parents=True, exist_ok=True)
    except OSError as e:
        reason = e.strerror or type(e).__name__
        raise UserError(f"cannot create the output folder {path} ({reason}); set output_dir=... (--exp-options) "
                        "to a writable folder") from None


STOPPED = 3  # exit status of a run stopped by a signal after saving its checkpoint
DISK_FULL = 4  # a write met a full disk, a quota or a read-only file system; the last good checkpoint is intact


def exit_status(e: UserError) -> int:
    """1 for a diverged run, 3 for one stopped by a signal (checkpoint saved), 4 for a full disk, 2 for bad input."""
    from ..errors import DiskFull, NonFiniteLoss, Stopped

    return STOPPED if isinstance(e, Stopped) else DISK_FULL if isinstance(e, DiskFull) else (
        1 if isinstance(e, NonFiniteLoss) else 2)


def run_cli(prog: str, fn: Callable[[], int]) -> int:
    """Run `fn`; a UserError becomes `prog: error: message` on one line and exit status 2 (1 for a diverged run,
    3 for a run stopped by a signal with its checkpoint saved, 4 for a full disk: `exit_status`)."""
    from ..errors import Stopped

    try:
        return fn()
    except UserError as e:  # Stopped: asked to stop (SIGTERM, ...) with a checkpoint saved, not an error
        print(f"{prog}: {'' if isinstance(e, Stopped) else 'error: '}{e}", file=sys.stderr)
        return exit_status(e)
