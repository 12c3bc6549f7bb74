"""Errors raised on bad input. They subclass ``ValueError`` so callers can catch either."""


class DQInputError(ValueError):
    """Bad input: the message names the file, sample or parameter at fault."""
