"""What a user runs: `cli` (main.py), `probe`, `compare`, `compare_methods`, `curves`, `export`
and `invariance`, each `python -m pirl_jax.commands.<name>`; `program` is how each one runs
(flags, logging, one-line errors).

Importing a command takes seconds (jax, TensorFlow) before `program.run_program` installs its
SIGTERM handler; a SIGTERM in that time would end the process silently with status 143, so a
small handler is installed here first, before those imports: a message and exit status 0.

TensorFlow is then imported here, once, with its load-time notices kept off the terminal
(`program.import_tensorflow`): every command's modules import it (tf.data, clu), and by the time
`program.run_program` runs, a command started with `python -m` would already have printed them.
"""

import os
import signal
import sys
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

# After the handler: this import is what takes the seconds.
from pirl_jax.commands import program as _program  # pylint: disable=g-import-not-at-top,wrong-import-position

_program.import_tensorflow(_program.argv_verbosity(sys.argv))
