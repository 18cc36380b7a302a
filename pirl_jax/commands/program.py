"""How every command runs: logging, the TensorFlow import, flag parsing, user errors and --help.

`run_program(main_fn, argv)` is the one entry for `main.py` and each module command
(`python -m pirl_jax.commands.probe`, ...): a mistake in the command, the config or the data is one line
naming the field or file and exit status 2; library INFO logs appear only with --verbosity=1; a
SIGTERM before the training loop takes it over exits 0 with a message.
"""

from __future__ import annotations

import logging as std_logging
import os
import pathlib
import sys
import tempfile
import time
from typing import Callable

from absl import app
from absl import flags
from absl import logging

# TensorFlow's and XLA's C++ INFO and WARNING lines (oneDNN notices, CPU feature lists) are not for
# the user; set before either library is imported. The user's own setting wins.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

FLAGS = flags.FLAGS
USER_ERROR_STATUS = 2
_PACKAGE_DIR = str(pathlib.Path(__file__).resolve().parent.parent)  # pirl_jax/, not commands/
_OWN_FILES = (_PACKAGE_DIR,)


def _is_item_metadata_notice(record: std_logging.LogRecord) -> bool:
  """Orbax's warning that an item folder has no _CHECKPOINT_METADATA of its own: this project
  restores items (`<step>/default`) whose step metadata sits one folder up, as Orbax writes it;
  nothing is missing, and the checksums are verified separately."""
  message = record.getMessage()
  return message.startswith("Metadata file does not exist") and message.endswith(
      "_CHECKPOINT_METADATA"
  )


class _ProjectOnly(std_logging.Filter):
  """Keeps warnings and errors from anywhere, but INFO only from this project's modules."""

  def __init__(self, entry_files=()):
    super().__init__()
    self._own = _OWN_FILES + tuple(str(pathlib.Path(f).resolve()) for f in entry_files)

  def filter(self, record: std_logging.LogRecord) -> bool:
    if _is_item_metadata_notice(record):
      return False
    if record.levelno >= std_logging.WARNING:
      return True
    return record.pathname.startswith(self._own)


class _Formatter(std_logging.Formatter):
  """'HH:MM:SS message'; warnings and errors say so. Multi-process runs add the process index."""

  def format(self, record: std_logging.LogRecord) -> str:
    stamp = time.strftime("%H:%M:%S", time.localtime(record.created))
    level = "" if record.levelno < std_logging.WARNING else f"{record.levelname}: "
    process = ""
    jax = sys.modules.get("jax")
    # Only after jax.distributed is up: asking for the process index earlier would start JAX's
    # backend before jax.distributed.initialize, which must come first.
    if jax is not None and jax.distributed.is_initialized() and jax.process_count() > 1:
      process = f"[{jax.process_index()}] "
    return f"{stamp} {process}{level}{record.getMessage()}"


def configure_logging(verbosity: int, entry_files=()) -> None:
  """Quiet, readable logs: this project's INFO lines; everyone's warnings; more with -v 1."""
  handler = logging.get_absl_handler()
  if verbosity >= 1:
    return  # absl's own format, every library's INFO and DEBUG lines
  handler.setFormatter(_Formatter())
  handler.addFilter(_ProjectOnly(entry_files))
  logging.set_verbosity(logging.INFO)


# What TensorFlow's C++ side prints on stderr when it loads, whatever TF_CPP_MIN_LOG_LEVEL says.
_TF_LOAD_NOTICES = (
    "oneDNN custom operations are on",
    "All log messages before absl::InitializeLog",
    "cpu_feature_guard",
    "To enable the following instructions",
    "rebuild TensorFlow with the appropriate compiler flags",
)


def argv_verbosity(argv) -> int:
  """--verbosity (or -v) as given on the command line, before the flags are parsed; 0 if absent."""
  for i, arg in enumerate(argv):
    for name in ("--verbosity", "-verbosity", "--v", "-v"):
      if arg == name and i + 1 < len(argv):
        value = argv[i + 1]
      elif arg.startswith(name + "="):
        value = arg.split("=", 1)[1]
      else:
        continue
      try:
        return int(value)
      except ValueError:
        return 0  # absl names the bad value when it parses the flags
  return 0


def import_tensorflow(verbosity: int = 0):
  """Imports TensorFlow, dropping its load-time notices from stderr unless --verbosity >= 1.

  TensorFlow is only used for tf.data: it is also hidden from accelerators before it
  initialises, so that it cannot reserve memory that JAX needs.
  """
  if "tensorflow" in sys.modules or verbosity >= 1:
    import tensorflow as tf  # pylint: disable=g-import-not-at-top
  else:
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as captured:
      os.dup2(captured.fileno(), 2)
      try:
        import tensorflow as tf  # pylint: disable=g-import-not-at-top
      finally:
        os.dup2(saved, 2)
        os.close(saved)
        captured.seek(0)
        text = captured.read().decode(errors="replace")
    kept = [
        line
        for line in text.splitlines()
        if line.strip() and not any(n in line for n in _TF_LOAD_NOTICES)
    ]
    if kept:
      print("\n".join(kept), file=sys.stderr)
  tf.config.set_visible_devices([], "GPU")
  return tf


def _user_error(message: str) -> None:
  print(f"error: {message}", file=sys.stderr)
  sys.exit(USER_ERROR_STATUS)


_BOOLEAN_WORDS = ("true", "false", "1", "0", "yes", "no", "t", "f")


def _value_problem(current, text: str) -> str | None:
  """Why `text` cannot be a value of a field that now holds `current`, or None if it can."""
  if isinstance(current, bool):
    return None if text.lower() in _BOOLEAN_WORDS else "is not a boolean (true or false)"
  if isinstance(current, int):
    try:
      int(text)
    except ValueError:
      return "is not an integer"
  elif isinstance(current, float):
    try:
      float(text)
    except ValueError:
      return "is not a number"
  return None


def _config_spec(argv) -> str | None:
  return next((a.split("=", 1)[1] for a in argv[1:] if a.startswith("--config=")), None)


# The project's configs: the repository's configs/ folder, or the copy installed inside the
# package (pirl_jax/configs, see setup.py).
_SHIPPED_CONFIG_DIRS = (
    pathlib.Path(__file__).resolve().parents[1] / "configs",
    pathlib.Path(__file__).resolve().parents[2] / "configs",
)


def shipped_config(path: str) -> str | None:
  """The project's own config file that `path` names, when `path` is not a file here.

  `configs/pirl.py` from outside the repository, or a config by name (`pirl`, `finetune_isic`),
  resolves to the one that ships with the package; None for anything else.
  """
  if os.path.isfile(path):
    return None
  candidate = pathlib.PurePath(path)
  name = (
      candidate.name
      if candidate.suffix == ".py" and candidate.parent.name == "configs"
      else f"{path}.py"
      if path.isidentifier()
      else None
  )
  if name is None:
    return None
  return next((str(d / name) for d in _SHIPPED_CONFIG_DIRS if (d / name).is_file()), None)


def resolve_config_flag(argv) -> list[str]:
  """`argv` with --config=SPEC pointing at the shipped config file when SPEC names one."""
  out = []
  for arg in argv:
    if arg.startswith("--config=") and (
        shipped := shipped_config(arg[len("--config=") :].partition(":")[0])
    ):
      preset = arg.partition(":")[2] if ":" in arg[len("--config=") :] else ""
      arg = f"--config={shipped}" + (f":{preset}" if preset else "")
    out.append(arg)
  return out


def _load_config_file(argv):
  """The config named by --config=FILE[:PRESET] in `argv`, or None if it does not load."""
  spec = _config_spec(argv)
  if not spec:
    return None
  path, _, preset = spec.partition(":")
  try:
    import importlib.util  # pylint: disable=g-import-not-at-top

    module_spec = importlib.util.spec_from_file_location("_pirl_jax_user_config", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module.get_config(preset) if preset else module.get_config()
  except Exception:  # pylint: disable=broad-except  (reported by the caller as it was)
    return None


def parse_flags(argv):
  """FLAGS(argv), with config-file mistakes reported as one line naming the field (status 2)."""
  argv = resolve_config_flag(argv)
  spec = _config_spec(argv)
  if spec and not os.path.isfile(spec.partition(":")[0]):
    _user_error(
        f"config file {spec.partition(':')[0]!r} does not exist (--config={spec}); "
        "e.g. --config=configs/pirl.py or --config=configs/pirl.py:tiny (the project's "
        "configs also by name from any folder: --config=pirl:tiny, "
        "--config=finetune_isic)."
    )
  try:
    return FLAGS(argv)
  except Exception as e:  # pylint: disable=broad-except  (any failure here is in the command)
    config = _load_config_file(argv)
    if config is not None:
      from pirl_jax import configuration  # pylint: disable=g-import-not-at-top

      for arg in argv[1:]:
        if not (arg.startswith("--config.") and "=" in arg):
          continue
        dotted, text = arg[len("--config.") :].split("=", 1)
        try:
          current = configuration.get_field(config, dotted)
        except (KeyError, AttributeError):
          _user_error(configuration.unknown_field_message(config, dotted))
        problem = _value_problem(current, text)
        if problem:
          _user_error(
              f"--config.{dotted}={text!r} {problem} (the field holds "
              f"{type(current).__name__}, e.g. {current!r})."
          )
    cause = e.__cause__ or e.__context__ or e
    message = str(cause).strip().strip("'\"").replace("\\n", "\n")
    if "Traceback (most recent call last)" in message:
      # A config file's get_config raised: its last line is the exception and its message.
      message = message.strip().splitlines()[-1].split(": ", 1)[-1]
    _user_error(" ".join(message.split()) or str(e))
  return None


def run_program(main_fn: Callable, argv, entry_files=()) -> int:
  """Runs an absl `main_fn(argv)` with the project's logging, error and signal conventions.

  * logs as `configure_logging` (after the flags are parsed: --verbosity is one of them);
  * `user_errors.UserError` -> 'error: <message>' on stderr, exit status 2, no traceback;
  * SIGTERM before the training loop takes it over -> a message and exit status 0.
  Internal errors keep their traceback.
  """
  from pirl_jax import user_errors  # pylint: disable=g-import-not-at-top

  def wrapped(args):
    configure_logging(FLAGS.verbosity, entry_files)
    import_tensorflow(FLAGS.verbosity)
    from pirl_jax import signals  # pylint: disable=g-import-not-at-top

    signals.install_startup_sigterm_handler()
    try:
      return main_fn(args)
    except user_errors.UserError as e:
      _user_error(str(e))
    except signals.StartupInterrupted:
      print(
          "Stopped by SIGTERM outside the training steps; nothing was lost: run the same "
          "command again to continue.",
          file=sys.stderr,
      )
      # Everything this program writes is complete by now (a run's checkpoints are waited for
      # as its loop.Run closes); what is not is TensorFlow's and XLA's own threads, and tearing
      # the interpreter down under them can crash (exit status 139). So: no teardown.
      logging.flush()
      sys.stdout.flush()
      sys.stderr.flush()
      os._exit(0)  # pylint: disable=protected-access

  if any(arg in ("-h", "--help", "-?") for arg in argv[1:]):
    print(command_help(argv[0]))
    return 0
  app.run(wrapped, argv=list(argv), flags_parser=parse_flags)
  return 0


def command_help(program: str) -> str:
  """--help: the command's own flags and --verbosity (absl's lists only the main script's, which
  for an installed entry point is none); --helpfull still lists every library's flags."""
  parts = [f"usage: {os.path.basename(program)} [flags]"]
  for module, module_flags in sorted(FLAGS.flags_by_module_dict().items()):
    # A command run as a script or with -m registers its flags under its file's path.
    if module.startswith("pirl_jax") or module.endswith(".py") or module == "__main__":
      parts.append(FLAGS.module_help(module).strip())
  if "config" in FLAGS:
    parts.append(
        "  --config.<field>=<value>: overrides one field of the config, e.g. "
        "--config.num_epochs=40."
    )
  parts.append(
      "  --verbosity: 0 (default): progress, warnings and results; 1: the libraries' "
      "INFO logs too.\nTry --helpfull to get a list of all flags."
  )
  return "\n\n".join(parts)
