"""Errors raised on bad input. They subclass ``ValueError`` so callers can catch either."""

import errno

# OSError numbers that no retry mends: the target refuses writes (read-only, permission), or its
# disk is full.
REFUSED_ERRNOS = (errno.EROFS, errno.EACCES, errno.EPERM)
FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)


class DQInputError(ValueError):
    """Bad input: the message names the file, sample or parameter at fault."""
