"""The errors the data layer raises for problems with the user's data or config.

All of them are `user_errors.UserError`s (reported without a traceback) and keep a built-in base
(`ValueError` or `FileNotFoundError`), so `except ValueError` around the data layer still works.
`images.BadImageError` (one unusable image file) and `isic.IsicFormatError` (missing or malformed
ISIC 2017 files) follow the same pattern in their modules.
"""

from __future__ import annotations

from pirl_jax.user_errors import UserError


class ConfigFieldError(UserError, ValueError):
  """A `data.*` or `augment.*` config field is unknown, out of range or conflicts with another.

  The message names the field(s).
  """


class DataSourceError(UserError, ValueError):
  """The data the config points at cannot be used: no images, all images bad, tfds not prepared."""


class MissingDataError(UserError, FileNotFoundError):
  """A folder or file the config names does not exist; the message names it and the field."""
