"""The ground floor: the error a user can fix, and the exit codes every `python -m digit_lightning.<name>` uses.

0 done; 1 done, but some inputs failed (predict: files it could not read); 2 a user error, printed as one
`error: ...` line that names the problem and the fix; 143 stopped by SIGTERM after saving a checkpoint.
"""

EXIT_SOME_FAILED, EXIT_USER_ERROR, EXIT_SIGTERM = 1, 2, 143


class UserError(Exception):
    """A problem the user can fix from the message alone: one line naming it and the fix. Every entry point
    prints it as `error: <message>` and exits with status 2."""
