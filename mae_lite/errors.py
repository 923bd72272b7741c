"""Errors meant for the user: the CLI prints their message as one line and exits, without a traceback."""


class UserError(Exception):
    """Bad input (option, path, data, checkpoint) with a message that names the problem and the fix."""


class NonFiniteLoss(UserError):
    """The loss became NaN or infinite; the last checkpoint on disk is left intact."""


class Stopped(UserError):
    """Training was asked to stop (SIGTERM, SIGUSR1, Ctrl-C) and saved a checkpoint that --resume continues."""


class DiskFull(UserError):
    """A write of the run (checkpoint, reconstructions) met a full disk, a quota or a read-only file system; the
    last good checkpoint is left intact. Its own exit status (4), so a scheduler can tell it from a training error."""
