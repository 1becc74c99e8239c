"""The `qna` command's entry point: the least that can be loaded before Ctrl-C is
handled as the command handles it.

The console script imports this module, and so the `qna` package (whose imports are
all lazy) and `qna.entrypoints`, before `main` runs: whatever they import is a window
in which Ctrl-C prints a traceback. Keep all three to the standard library's already
loaded modules (not even contextlib), and `signal` (a millisecond).
"""

from __future__ import annotations

import signal
import sys

# As `qna.entrypoints.cli` reports an interrupt (128 + SIGINT), without loading it.
EXIT_INTERRUPTED = 130


def main() -> None:
    # Ctrl-C while Python loads the command (click, pydantic: a fraction of a second,
    # more on a busy machine) is held until it is loaded, then told as once it runs:
    # one line and 130. Raised in the middle of the loading, the KeyboardInterrupt
    # printed the import's traceback, or, landing in Python code that pydantic-core
    # runs while it builds a model, came out as a SchemaError. (A SIGINT the process
    # was started ignoring, as a shell's background job is, stays ignored.)
    held: list[int] = []
    previous = signal.getsignal(signal.SIGINT)
    holding = previous is signal.default_int_handler
    if holding:
        signal.signal(signal.SIGINT, lambda signum, _frame: held.append(signum))
    try:
        from qna.entrypoints.cli import main as run
    finally:
        if holding:
            signal.signal(signal.SIGINT, previous)
    if held:
        if sys.stderr is not None:  # `2>&-`
            try:  # noqa: SIM105 -- contextlib.suppress would load contextlib up front
                sys.stderr.write("qna: error: interrupted\n")
            except OSError:
                pass
        sys.exit(EXIT_INTERRUPTED)
    run()
