"""One exception type for user-facing errors, and the CLI wrapper that prints it in one line."""

from __future__ import annotations

import sys
from collections.abc import Callable


class SdatcError(Exception):
    """An error caused by input, configuration or environment; shown to the user without a traceback."""


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
