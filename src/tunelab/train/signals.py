"""Graceful stop on SIGTERM / SIGINT: the first signal asks the loop to finish its step, write a
checkpoint and return; a second SIGINT exits at once (the last complete checkpoint stays valid, since a
checkpoint only exists once its manifest is written last).

After the last step is checkpointed the run switches to `raise_from_now()`: a signal then raises
`StopRequested` at once, interrupting the final evaluation or save (the model dir is replaced by a swap, so
an interrupted save leaves the old one or none, never half of one)."""

from __future__ import annotations

import os
import signal
import threading


class StopRequested(BaseException):
    """Raised by a signal once `StopRequest.raise_from_now()` was called (a BaseException, so that no
    `except Exception` on the way swallows it)."""


class StopRequest:
    """Context manager installing the handlers (main thread only); `requested` names the signal."""

    def __init__(self, on_request=None):
        self.requested: str | None = None
        self.on_request = on_request
        self.raising = False
        self._old: dict = {}

    def _handle(self, signum, frame) -> None:
        name = signal.Signals(signum).name
        if self.requested is not None and signum == signal.SIGINT:
            os._exit(130)  # second Ctrl-C: stop now; nothing half-written counts as a checkpoint
        if self.requested is None:
            self.requested = name
            if self.on_request:
                self.on_request(name)
            if self.raising:
                raise StopRequested(name)

    def raise_from_now(self) -> None:
        """From now on a signal raises `StopRequested`; one that already arrived raises it here."""
        self.raising = True
        if self.requested is not None:
            raise StopRequested(self.requested)

    def __enter__(self) -> "StopRequest":
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)
        self._old.clear()
