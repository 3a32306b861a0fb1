"""One exception type for user-facing errors, and the CLI wrapper that prints it in one line."""

from __future__ import annotations

import sys
from collections.abc import Callable


class SdatcError(Exception):
    """An error caused by input, configuration or environment; shown to the user without a traceback."""


def run_cli(main: Callable[[list[str] | None], int | None], argv: list[str] | None = None) -> None:
    """Run a script's ``main``; turn SdatcError / Ctrl-C into a one-line message and exit status.

    Set ``SDATC_TRACEBACK=1`` to see the full traceback of a user-facing error.
    """
    import os

    try:
        code = main(argv)
    except SdatcError as e:
        if os.environ.get("SDATC_TRACEBACK"):
            raise
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted: partial outputs were left under temporary names only", file=sys.stderr)
        sys.exit(130)
    sys.exit(code or 0)
