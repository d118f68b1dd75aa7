"""The one exception type for mistakes a user can cause.

The CLI prints a `UserError` as a single line and exits non-zero; every other exception is
a bug in tunelab and propagates with its traceback.
"""


class UserError(Exception):
    """A bad path, column, value, config key or model: the message says what and how to fix it."""
