"""The one exception the core raises for problems a user can fix."""


class KneegenError(Exception):
    """A user-facing problem: the message names the file, key or flag and what to do.

    The CLI prints it as one line and exits with status 1, without a traceback; anything
    else that escapes is a bug and keeps its traceback.
    """

    exit_code = 1
