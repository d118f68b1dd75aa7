"""The one exception type for mistakes a user can cause, and a reader that turns file problems into it.

The CLI prints a `UserError` as a single line and exits non-zero; every other exception is
a bug in tunelab and propagates with its traceback.
"""

import json
from pathlib import Path


class UserError(Exception):
    """A bad path, column, value, config key or model: the message says what and how to fix it."""


def read_json_file(path: Path, missing: str):
    """The JSON in `path`; `missing` is the message when the file is absent, a corrupt file names itself."""
    if not path.is_file():
        raise UserError(missing)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise UserError(f"{path} is corrupt: {err}") from None
