"""What a user runs: `cli` (main.py), `probe`, `compare`, `compare_methods`, `curves`, `export`
and `invariance`, each `python -m pirl_jax.commands.<name>`; `program` is how each one runs
(flags, logging, one-line errors).

Importing a command takes seconds (jax, TensorFlow) before `program.run_program` installs its
SIGTERM handler; a SIGTERM in that time would end the process silently with status 143, so a
small handler is installed here first, before those imports: a message and exit status 0.
"""

import os
import signal
import threading


def _stop_while_importing(signum, frame):
  del signum, frame
  # Not fd 2 itself: program.import_tensorflow points fd 2 at a scratch file while TensorFlow
  # loads, and a signal landing then would write the message there.
  os.write(
      _STDERR,
      b"Stopped by SIGTERM while starting up; nothing was written: run the same command "
      b"again to start.\n",
  )
  os._exit(0)  # pylint: disable=protected-access


if threading.current_thread() is threading.main_thread() and signal.getsignal(signal.SIGTERM) in (
    signal.SIG_DFL,
    signal.SIG_IGN,
):
  _STDERR = os.dup(2)
  signal.signal(signal.SIGTERM, _stop_while_importing)
