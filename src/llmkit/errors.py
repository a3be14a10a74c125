"""One error type for every problem a user can fix: what is wrong, and how to fix it.

The CLI prints an `LlmkitError` as one line and exits non-zero; anything else is a bug and shows a
traceback under `--debug`.
"""


class LlmkitError(Exception):
    """A user-facing error: `message` says what is wrong, `fix` says what to do about it."""

    def __init__(self, message: str, fix: str | None = None):
        self.message = message
        self.fix = fix
        super().__init__(f"{message} (fix: {fix})" if fix else message)
