"""Which exceptions are the user's to fix, and how each is said in one line (the CLI's `error: ...`, the app's
message).

A user's error is bad input (`ValueError`, `TypeError`), a missing optional package (`ImportError`), or a file that is
missing, unreadable or broken (`OSError`, which diffusers and transformers raise for a config that is not JSON or
weights that do not load, and safetensors' own `SafetensorError`). Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

from safetensors import SafetensorError

USER_ERRORS: tuple[type[BaseException], ...] = (ValueError, TypeError, ImportError, OSError, SafetensorError)


def user_message(error: BaseException) -> str:
    """`error` as one line that names the file when there is one and says what is wrong with it.

    An `OSError` that carries a file name reads `<file>: <what is wrong>`; one raised over others (diffusers'
    "Unable to load weights from checkpoint file ...", itself raised over safetensors' "header too large") gets the
    first cause's words appended, since that one says what is wrong with the file (the ones between guess).
    """
    if isinstance(error, OSError) and error.filename is not None and error.strerror:
        return f"{error.filename}: {error.strerror}"
    message = str(error).strip() or type(error).__name__
    cause, first = error.__cause__ or error.__context__, None
    while cause is not None:
        first, cause = cause, cause.__cause__ or cause.__context__
    if isinstance(error, OSError) and first is not None:
        detail = str(first).strip()
        if detail and detail not in message:
            message = f"{message.rstrip('. ')}: {detail}"
    return " ".join(message.split())
