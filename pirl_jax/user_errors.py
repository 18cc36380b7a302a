"""The base class of errors caused by the user's input or config."""


class UserError(Exception):
  """An error caused by the user's input or config.

  main prints the message and exits with status 2, no traceback.
  """
