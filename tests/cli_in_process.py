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


def command_in_process(main_fn, argv, capsys, monkeypatch):
  """A module command's `main(argv)` (e.g. `pirl_jax.commands.probe.main`) as
  `python -m ... ARGS` runs it, in this process: (exit status, stdout, stderr). The flags the
  command defines are removed afterwards, so that the next command can define its own."""
  before = set(flags.FLAGS)
  flags.FLAGS.unparse_flags()
  # Other commands' flags (main.py's required --config, ...) stay defined in this process; their
  # validators would refuse this command's argv, which does not set them.
  others = {name: flag.validators for name, flag in flags.FLAGS._flags().items()}  # pylint: disable=protected-access
  for flag in flags.FLAGS._flags().values():  # pylint: disable=protected-access
    flag.validators = []
  monkeypatch.setattr(sys, "argv", list(argv))
  monkeypatch.setattr(logging.get_absl_handler().python_handler, "stream", sys.stderr)
  try:
    try:
      code = main_fn(list(argv))
    except SystemExit as e:
      code = e.code
  finally:
    for name in set(flags.FLAGS) - before:
      delattr(flags.FLAGS, name)
    for name, validators in others.items():
      flags.FLAGS[name].validators = validators
    flags.FLAGS.unparse_flags()
  captured = capsys.readouterr()
  return code or 0, captured.out, captured.err
