"""The one exception type for a user's mistake: a bad flag, file or directory, reported as one line naming it."""


class InputError(Exception):
    """Bad input from the user (a flag, file or directory); the message names it and says what is wrong."""


def os_error_in(error: BaseException | None) -> OSError | None:
    """The OSError behind `error`: itself or one in its chain of causes (libraries re-raise I/O errors as their own
    exception types), if any."""
    while error is not None and not isinstance(error, OSError):
        error = error.__cause__ or error.__context__
    return error
