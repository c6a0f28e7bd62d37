"""The one exception type users see: a problem with their input, stated in one line with its fix."""


class NanoexportError(Exception):
    """Bad input or an impossible request. The CLI prints the message as one line and exits with code 2."""


def first_line(error: BaseException) -> str:
    """What a one-line error quotes of a library's exception: its message's first line, or its type's name
    when it has no message."""
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__
