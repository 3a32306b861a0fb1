"""One exception type for user-facing errors, and the CLI wrapper that prints it in one line."""

from __future__ import annotations

import errno
import sys
from collections.abc import Callable


class SdatcError(Exception):
    """An error caused by input, configuration or environment; shown to the user without a traceback."""


class MetricUnavailable(SdatcError):
    """A metric, or a metric's network (pyiqa, RAFT), that cannot run here (e.g. its weights are missing); the
    message says what to get. Callers mark the metric missing and go on."""


_OS_REASONS = {
    errno.ENOSPC: "the disk is full (no space left on device)",
    errno.EDQUOT: "the disk quota is exceeded",
    errno.EROFS: "the file system is read-only",
    errno.EACCES: "permission denied",
    errno.EPERM: "operation not permitted (permissions, or a file system that does not allow it)",
    errno.ENAMETOOLONG: "the file name is too long",
    errno.ELOOP: "a symlink loop",
    errno.ENOTDIR: "a part of the path is a file, not a folder",
    errno.EISDIR: "it is a folder",
    errno.EEXIST: "it already exists",
    errno.ENOENT: "no such file or folder",
    errno.EIO: "an input/output error (a failing disk or connection)",
}


def os_reason(e: OSError) -> str:
    """What an OSError means, in words a person can act on (``the disk is full (no space left on device)``)."""
    return _OS_REASONS.get(e.errno, e.strerror or str(e) or type(e).__name__)


def os_error(path, e: OSError, doing: str = "cannot write") -> SdatcError:
    """A one-line SdatcError naming ``path`` for an OSError: ``cannot write out/a.mp4: the disk is full (...)``."""
    return SdatcError(f"{doing} {path}: {os_reason(e)}")


def run_cli(main: Callable[[list[str] | None], int | None], argv: list[str] | None = None) -> None:
    """Run a script's ``main``; turn SdatcError / Ctrl-C / SIGTERM into a one-line message and exit status.

    Set ``SDATC_TRACEBACK=1`` to see the full traceback of a user-facing error.
    """
    import os
    import signal

    def on_term(signum, frame):  # SIGTERM unwinds like Ctrl-C: open outputs remove their temporary files
        raise KeyboardInterrupt

    try:
        signal.signal(signal.SIGTERM, on_term)
    except ValueError:  # not the main thread
        pass
    try:
        code = main(argv)
    except SdatcError as e:
        if os.environ.get("SDATC_TRACEBACK"):
            raise
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted: the unfinished clip's temporary files were removed; finished outputs are kept "
              "(a rerun skips them)", file=sys.stderr)
        sys.exit(130)
    sys.exit(code or 0)
