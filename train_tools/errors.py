"""The one exception type for mistakes a user can make and fix."""


class UserError(Exception):
    """A problem the user caused and can fix; its message is one clear sentence that says what to do.

    The CLI prints it without a traceback and exits non-zero; the UI shows it as a message.
    """
