"""The one exception type users see: a problem with their input, stated in one line with its fix."""


class NanoexportError(Exception):
    """Bad input or an impossible request. The CLI prints the message as one line and exits with code 2."""
