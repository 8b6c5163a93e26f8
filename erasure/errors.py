"""The one error family for what a user got wrong.

Every subcommand turns an `ErasureError` into one line on stderr — naming the file, key or value and
what would be right — and exit status 2, with no traceback (erasure.cli.main). Anything else that
escapes is a bug in erasure and keeps its traceback. The subclasses say where the problem lies; they
are `ValueError`s, so code that validates with `except ValueError` keeps working.
"""

from __future__ import annotations


class ErasureError(ValueError):
    """Bad input or a run that cannot go on; the message is the whole story, on one line."""


class RecipeError(ErasureError):
    """A recipe key or flag is wrong: the message names the file, key or value and what is allowed."""


class SpecError(ErasureError):
    """A concept spec (prompts/*.yaml) is wrong."""


class SuiteError(ErasureError):
    """An evaluation suite (eval/*.yaml) or one of its overrides is wrong."""


class DataError(ErasureError):
    """A data set, prompt file, image or cache on disk cannot be used as asked."""


class ModelError(ErasureError):
    """A model id or folder does not hold a pipeline erasure can load."""


class OutputError(ErasureError):
    """An output folder cannot be written as asked (it would lose a user's files, or is not writable)."""


class DivergedError(ErasureError):
    """Training produced a NaN or infinite loss or update; nothing was exported."""


class LLMError(ErasureError):
    """An LLM request or expansion step failed; the message names the endpoint/model (never the key),
    the step and the last problem. `problem` is the short form of the last problem."""

    def __init__(self, message: str, problem: str | None = None):
        super().__init__(message)
        self.problem = problem or message


class LLMAnswerError(LLMError):
    """The LLM answered, but not with a chat completion erasure can read (a body that is not JSON, no
    message text): unlike a request that failed, asking again may help."""


def one_line(error: BaseException) -> str:
    """The message on one line: a multi-line message (a YAML parser's, say) is joined with ' | '."""
    return " | ".join(line.strip() for line in str(error).splitlines() if line.strip())
