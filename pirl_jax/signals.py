"""SIGTERM before the training loop takes it over: the program ends cleanly, exit status 0.

`program.run_program` installs the handler at start-up; the training loop's own handler
(`train.loop`) replaces it for the steps and first checks `startup_sigterm_received()`.
"""

from __future__ import annotations

import signal
import sys
import threading

import jax


class StartupInterrupted(BaseException):
  """SIGTERM arrived before the first training step (a BaseException: nothing swallows it)."""


# Set by the start-up handler. Python ignores exceptions raised where the signal happens to land
# in a garbage-collection or weakref callback (it prints "Exception ignored in ..."), so the
# training loop checks this before its first step too.
_STARTUP_SIGTERM = threading.Event()


def install_startup_sigterm_handler() -> None:
  """Makes a SIGTERM before training starts end the program cleanly (see `StartupInterrupted`).

  Under `jax.distributed` JAX's preemption service owns SIGTERM, so nothing is installed then.
  """
  if jax.distributed.is_initialized() or threading.current_thread() is not threading.main_thread():
    return

  def handle(signum, frame):
    del signum, frame
    _STARTUP_SIGTERM.set()
    raise StartupInterrupted()

  default_hook = sys.unraisablehook

  def quiet_when_swallowed(unraisable):
    # The flag carries the request on: no "Exception ignored" traceback for it.
    if not isinstance(unraisable.exc_value, StartupInterrupted):
      default_hook(unraisable)

  _STARTUP_SIGTERM.clear()
  sys.unraisablehook = quiet_when_swallowed
  signal.signal(signal.SIGTERM, handle)


def startup_sigterm_received() -> bool:
  """Whether a start-up SIGTERM arrived (its exception may have been swallowed where it landed)."""
  return _STARTUP_SIGTERM.is_set()


def clear() -> None:
  """Forgets a start-up SIGTERM (for tests)."""
  _STARTUP_SIGTERM.clear()
