"""The one exception type for mistakes a user can fix.

Step scripts catch `UserError` and print its message alone (no traceback):
the message must name the problem and the fix.
"""


class UserError(Exception):
    """A problem with the user's input or settings, with its fix in the message."""
