"""`python main.py ARGS` run inside the test process, for the tests of what the CLI prints."""

import sys

from absl import flags
from absl import logging
import pytest


def main_in_process(args, capsys, monkeypatch):
  """cli.main as `python main.py ARGS` runs it, in this process: (exit status, stdout, stderr)."""
  from pirl_jax.commands import cli  # pylint: disable=g-import-not-at-top
  flags.FLAGS.unparse_flags()
  # config_flags defines one flag per overridden field while parsing; an earlier run's would
  # clash with this one's.
  for name in [n for n in flags.FLAGS if n.startswith("config.")]:
    delattr(flags.FLAGS, name)
  argv = ["main.py", *args]
  monkeypatch.setattr(sys, "argv", argv)  # config_flags reads the overrides from sys.argv
  # absl's handler keeps the stream it was created with; point it at this test's captured one.
  monkeypatch.setattr(logging.get_absl_handler().python_handler, "stream", sys.stderr)
  with pytest.raises(SystemExit) as exit_info:
    cli.main(argv)
  captured = capsys.readouterr()
  return exit_info.value.code, captured.out, captured.err
