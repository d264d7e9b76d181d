"""Being stopped by a signal as an exception, so that every way of being stopped runs the same
clean-up (``finally`` blocks, worker processes stopped, temporary files removed). Torch-free."""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager

from planner.errors import Interrupted

__all__ = ["signals_as_errors"]


@contextmanager
def signals_as_errors() -> Iterator[None]:
    """SIGTERM and SIGHUP raise ``Interrupted`` in the main thread, as Ctrl-C raises
    KeyboardInterrupt. A signal the caller ignores (``nohup``) stays ignored."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, frame: object) -> None:
        raise Interrupted(f"stopped by {signal.Signals(signum).name}", signum)

    old = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGHUP)}
    for s, h in old.items():
        if h is not signal.SIG_IGN:
            signal.signal(s, handler)
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)
