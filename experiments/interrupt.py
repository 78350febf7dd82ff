"""Ctrl-C that is never lost: a run stops at the next step even when Python swallowed it.

Python's default SIGINT handler raises ``KeyboardInterrupt`` at whatever bytecode runs next. When
that is a garbage-collector callback or a ``__del__`` (JAX registers one, ``_xla_gc_callback``),
Python prints "Exception ignored in ..." and goes on: the run kept training and finished as if
Ctrl-C had not been pressed (seen in CI, ``tests/test_cli.py``). :func:`catching_ctrl_c` installs a
handler that also records the request, and :func:`raise_if_interrupted` (the training loop calls
it every step) raises it again where it cannot be swallowed.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator

__all__ = ["catching_ctrl_c", "interrupted", "raise_if_interrupted"]

_requested = False


def _handler(signum: int, frame: object) -> None:
    del signum, frame
    global _requested
    _requested = True
    raise KeyboardInterrupt


def interrupted() -> bool:
    """Whether Ctrl-C was pressed inside :func:`catching_ctrl_c`."""
    return _requested


def raise_if_interrupted() -> None:
    """``KeyboardInterrupt`` if Ctrl-C was pressed (and perhaps swallowed) since the context began."""
    if _requested:
        raise KeyboardInterrupt


@contextlib.contextmanager
def catching_ctrl_c() -> Iterator[None]:
    """Records SIGINT for :func:`raise_if_interrupted` (main thread only; elsewhere, and where
    SIGINT is ignored, as in a pytest-xdist worker, it changes nothing)."""
    global _requested
    _requested = False
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.getsignal(signal.SIGINT)
    if previous is signal.SIG_IGN:
        yield
        return
    signal.signal(signal.SIGINT, _handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
        _requested = False
