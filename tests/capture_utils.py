"""Prefect's console log handler and pytest's ``capsys``.

Prefect's console handler (a rich Console on the root logger) keeps the stream it was created
with. Under pytest that can be a capture stream that is closed later, and from then on every
Prefect log line fails inside rich, up to a RecursionError that fails the flow being tested. The
fixture below gives the handler a stream that always writes to whatever ``sys.stderr`` is at the
time (the current test's capture), so CLI tests can read stderr with ``capsys``.
"""
import logging
import sys

import pytest


class CurrentStderr:
    """A text stream that forwards to the current ``sys.stderr``."""

    encoding = "utf-8"
    closed = False

    def write(self, text: str) -> int:
        try:
            return sys.stderr.write(text)
        except ValueError:  # a capture closed under us: drop the line
            return len(text)

    def flush(self) -> None:
        try:
            sys.stderr.flush()
        except ValueError:
            pass

    def isatty(self) -> bool:
        return False


_STREAM = CurrentStderr()


def _prefect_console_handlers():
    from prefect.logging.handlers import PrefectConsoleHandler

    alive = [ref() for ref in list(logging._handlerList)]  # every handler not yet collected
    return [h for h in alive if isinstance(h, PrefectConsoleHandler)]


@pytest.fixture(autouse=True)
def prefect_console_follows_capsys(capsys):
    for h in _prefect_console_handlers():
        h.stream = _STREAM
        h.console.file = _STREAM
    yield
