"""The one exception type for a user's mistake: a bad flag, file or directory, reported as one line naming it."""


class InputError(Exception):
    """Bad input from the user (a flag, file or directory); the message names it and says what is wrong."""
