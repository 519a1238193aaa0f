"""Ctrl-C and SIGTERM for the command line, raised only where cleanup can run.

Python raises KeyboardInterrupt in whatever frame is running when the signal arrives. Inside
Numba's JIT compiler (llvmlite finalizers and callbacks from LLVM) that exception is printed
and swallowed, so the conversion runs on to the end, or it leaves LLVM broken and the process
crashes at exit. Here a signal that lands there is held and tried again every ``RETRY`` seconds
(SIGALRM), until it lands in a frame where raising is safe.
"""
from __future__ import annotations

import contextlib
import signal
import sys
import time

RETRY = 0.02
SAY_AFTER = 1.0  # seconds held before the user is told why
UNSAFE_PACKAGES = ("numba", "llvmlite")


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised where the program is so that cleanup runs as for Ctrl-C."""


def unsafe(frame) -> bool:
    """Whether an exception raised in ``frame`` could be swallowed or leave the JIT broken:
    some frame on the stack is in the compiler's packages or in a finalizer (``__del__``)."""
    while frame is not None:
        if frame.f_code.co_name == "__del__" or \
                str(frame.f_globals.get("__name__", "")).partition(".")[0] in UNSAFE_PACKAGES:
            return True
        frame = frame.f_back
    return False


@contextlib.contextmanager
def raised_at_safe_points():
    """Within: SIGINT raises KeyboardInterrupt and SIGTERM raises :class:`Terminated`, in a safe
    frame only. A SIGINT that the caller ignored (``nohup``, a background job) stays ignored.
    Main thread only; the previous handlers are restored on exit."""
    held, said = None, False  # (the latest signal, when the first was held); the notice given

    def deliver(frame):
        nonlocal held, said
        if unsafe(frame):
            if not said and time.monotonic() - held[1] > SAY_AFTER:
                said = True
                print("eqcore: stopping once the JIT compiler finishes (it cannot be stopped safely before)",
                      file=sys.stderr, flush=True)
            signal.setitimer(signal.ITIMER_REAL, RETRY)
            return
        signum, held = held[0], None
        raise Terminated() if signum == signal.SIGTERM else KeyboardInterrupt()

    def on_signal(signum, frame):
        nonlocal held
        held = (signum, time.monotonic() if held is None else held[1])
        deliver(frame)

    def on_alarm(signum, frame):
        if held is not None:
            deliver(frame)

    handlers = {signal.SIGTERM: on_signal, signal.SIGALRM: on_alarm}
    if signal.getsignal(signal.SIGINT) is signal.default_int_handler:
        handlers[signal.SIGINT] = on_signal
    previous = {s: signal.signal(s, h) for s, h in handlers.items()}
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        for s, h in previous.items():
            signal.signal(s, h)
