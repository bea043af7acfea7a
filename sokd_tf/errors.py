"""User-facing error types.

Every mistake a user can make (a bad flag, a missing file, a malformed record) raises a
subclass of `UserError` whose message names the culprit and what was expected. The
pipelines turn a `UserError` into one line on stderr and exit status 2. A run that
diverges (`DivergedError`) counts too: its cause is a setting (learning rate, precision).
"""


class UserError(Exception):
    """Base class of errors caused by user input, not by a bug."""


class ConfigError(UserError, ValueError):
    """An invalid configuration value (flag, preset or config.json field)."""


class DataError(UserError, ValueError):
    """Missing, malformed or inconsistent input data."""


class ExportError(UserError, ValueError):
    """A model or workdir that cannot be exported as asked."""


class DivergedError(UserError, ArithmeticError):
    """Training produced a non-finite loss term or gradient norm and was stopped.

    Attributes:
      record: what `stages.divergence` writes to `<stage>/diverged.json` (stage, epoch,
        step, offending term, value, advice); None where nothing is recorded.
    """

    def __init__(self, message: str, record: dict | None = None):
        super().__init__(message)
        self.record = record
