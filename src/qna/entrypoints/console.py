"""The `qna` command's entry point: the least that can be loaded before Ctrl-C is
handled as the command handles it."""

from __future__ import annotations

import sys
from contextlib import suppress

# As `qna.entrypoints.cli` reports an interrupt (128 + SIGINT), without loading it.
EXIT_INTERRUPTED = 130


def main() -> None:
    try:
        from qna.entrypoints.cli import main as run
    except KeyboardInterrupt:
        # Ctrl-C while Python loads the command (click, pydantic: a fraction of a
        # second, more on a busy machine): one line and 130, as once it runs, not
        # the import's traceback.
        if sys.stderr is not None:  # `2>&-`
            with suppress(OSError):
                sys.stderr.write("qna: error: interrupted\n")
        sys.exit(EXIT_INTERRUPTED)
    run()
