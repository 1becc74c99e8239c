"""The `qna` command's entry point: the least that can be loaded before Ctrl-C is
handled as the command handles it.

The console script imports this module, and so the `qna` package (whose imports are
all lazy) and `qna.entrypoints`, before `main` runs: whatever they import is a window
in which Ctrl-C prints a traceback. Keep all three to the standard library's already
loaded modules (not even contextlib).
"""

from __future__ import annotations

import sys

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
            try:  # noqa: SIM105 -- contextlib.suppress would load contextlib up front
                sys.stderr.write("qna: error: interrupted\n")
            except OSError:
                pass
        sys.exit(EXIT_INTERRUPTED)
    run()
