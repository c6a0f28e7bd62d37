"""The one exception type users see: a problem with their input, stated in one line with its fix."""

import re

# A line that only says where in a C++ library an exception was thrown (OpenVINO stacks several before its
# message: "Exception from src/inference/src/cpp/core.cpp:132:").
SOURCE_LOCATION = re.compile(r".*\b(from|at) [\w./-]+\.(c|cc|cpp|cxx|h|hpp):\d+:?\s*$")


class NanoexportError(Exception):
    """Bad input or an impossible request. The CLI prints the message as one line and exits with code 2."""


def first_line(error: BaseException) -> str:
    """What a one-line error quotes of a library's exception: its message's first line that says more than
    where in the library's source it was raised, or its type's name when it has no message."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    if not lines:
        return type(error).__name__
    return next((line for line in lines if not SOURCE_LOCATION.match(line)), lines[0])


def one_line(message: str) -> str:
    """``message`` with its control characters escaped (``\\n``): names read from a damaged file can hold
    line breaks, and an error is one line."""
    return "".join(char if char.isprintable() else repr(char)[1:-1] for char in message)
