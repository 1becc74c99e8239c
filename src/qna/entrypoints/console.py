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


class SignalsHeld:
    """While inside, each signal whose handler is the one given (one that raises:
    Python's KeyboardInterrupt, say) is recorded in `arrived` instead of raised; the
    handlers are put back on the way out. A signal with any other handler (a caller's
    own, or ignored, as a shell's background job ignores Ctrl-C) is left as it is.
    A class, not a generator with contextlib: this module loads nothing more."""

    def __init__(self, raising: dict[int, object]) -> None:
        self._raising = raising
        self._held: list[int] = []
        self.arrived: list[int] = []

    def __enter__(self) -> SignalsHeld:
        for number, handler in self._raising.items():
            if signal.getsignal(number) is handler:
                signal.signal(number, lambda signum, _frame: self.arrived.append(signum))
                self._held.append(number)
        return self

    def __exit__(self, *_exc: object) -> None:
        for number in self._held:
            signal.signal(number, self._raising[number])  # type: ignore[arg-type]
        self._held.clear()


def main() -> None:
    # Ctrl-C while Python loads the command (click, pydantic: a fraction of a second,
    # more on a busy machine) is held until it is loaded, then told as once it runs:
    # one line and 130. Raised in the middle of the loading, the KeyboardInterrupt
    # printed the import's traceback, or, landing in Python code that pydantic-core
    # runs while it builds a model, came out as a SchemaError.
    with SignalsHeld({signal.SIGINT: signal.default_int_handler}) as held:
        from qna.entrypoints.cli import main as run
    if held.arrived:
        if sys.stderr is not None:  # `2>&-`
            try:  # noqa: SIM105 -- contextlib.suppress would load contextlib up front
                sys.stderr.write("qna: error: interrupted\n")
            except OSError:
                pass
        sys.exit(EXIT_INTERRUPTED)
    run()
