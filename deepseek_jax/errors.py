"""The one exception type for errors a user can cause (bad config, bad checkpoint, bad input).

The CLI prints ``str(err)`` on one line and exits non-zero; anything else escaping is a bug.
"""


class DeepSeekError(Exception):
    """A user-facing error with a one-line message naming the problem."""
