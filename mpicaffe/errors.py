"""Errors that mpicaffe reports to the user."""


class UserError(Exception):
    """An error caused by the user's input; the CLI prints it without a traceback."""
