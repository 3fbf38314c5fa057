"""Errors the user can fix: shown as one clear message, never as a traceback (unless --debug)."""


class UserError(Exception):
    """Something in the job, a file or the machine that the user must change; the message says what."""
