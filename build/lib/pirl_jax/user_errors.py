"""The base class of errors caused by the user's input or config."""


class UserError(Exception):
  """An error caused by the user's input or config.

  main prints the message and exits with status 2, no traceback.
  """


def listing(items, limit: int = 10) -> str:
  """The first `limit` items, one per indented line, then how many more: for error messages."""
  items = list(items)
  more = f"\n  ... and {len(items) - limit} more" if len(items) > limit else ""
  return "\n  " + "\n  ".join(items[:limit]) + more
