"""User-facing error types.

Every mistake a user can make (a bad flag, a missing file, a malformed record) raises a
subclass of `UserError` whose message names the culprit and what was expected. The
pipelines turn a `UserError` into one line on stderr and exit status 2.
"""


class UserError(Exception):
    """Base class of errors caused by user input, not by a bug."""


class ConfigError(UserError, ValueError):
    """An invalid configuration value (flag, preset or config.json field)."""


class DataError(UserError, ValueError):
    """Missing, malformed or inconsistent input data."""


class ExportError(UserError, ValueError):
    """A model or workdir that cannot be exported as asked."""
