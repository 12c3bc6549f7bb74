"""Paths and fsspec URLs: the one place that turns a URL into a filesystem, with errors that name it.

fsspec reports an unknown protocol as ``ValueError: Protocol not known: foo`` and a protocol whose
package is missing as an ``ImportError``; both become a :class:`DQInputError` naming the URL and
what to install (dq's own extra where there is one). An ``s3://`` URL with no credentials to sign
its requests fails here too, naming the URL, rather than at its first read or write as botocore's
``NoCredentialsError`` (which names nothing).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import fsspec
from fsspec.registry import known_implementations

from dq_ops.errors import DQInputError

# ``scheme://user:password@`` in a URL: the password part is what must never be logged.
_CREDENTIALS = re.compile(r"(?P<head>[A-Za-z][A-Za-z0-9+.-]*://[^/\s:@]+):[^@\s/]+@")
# Protocols served by one of dq's optional extras (pyproject.toml).
EXTRA_FOR_PROTOCOL = {"s3": "s3", "s3a": "s3"}


def protocol_of(url: str) -> str:
    """``"s3"`` for ``s3://bucket/x``, ``"file"`` for a plain path."""
    return url.split("://", 1)[0] if "://" in url else "file"


def is_glob(path: str) -> bool:
    """Whether ``path`` is a glob pattern (``*``, ``?`` or ``[``) that fsspec expands."""
    return any(c in path for c in "*?[")


def filesystem(url: str, storage_options: Mapping[str, Any] | None = None) -> tuple[fsspec.AbstractFileSystem, str]:
    """The filesystem and path of ``url`` (a plain path is local), or a :class:`DQInputError`."""
    try:
        fs, path = fsspec.core.url_to_fs(url, **dict(storage_options or {}))
    except ValueError as exc:
        if "Protocol not known" not in str(exc):
            raise
        protocol = protocol_of(url)
        raise DQInputError(
            f"{url}: unknown URL protocol '{protocol}://' (use a path or one of fsspec's protocols, e.g. file://, memory://, s3://)"
        ) from None
    except ImportError:
        protocol = protocol_of(url)
        extra = EXTRA_FOR_PROTOCOL.get(protocol)
        package = known_implementations.get(protocol, {}).get("class", "").split(".")[0] or "its fsspec package"
        install = f"pip install 'dq[{extra}]'" if extra else f"pip install {package}"
        raise DQInputError(f"{url}: the '{protocol}://' protocol needs {package}, which is not installed ({install})") from None
    if protocol_of(url) in ("s3", "s3a"):
        _check_s3_credentials(url, fs)
    return fs, path


def _check_s3_credentials(url: str, fs: fsspec.AbstractFileSystem) -> None:
    """Signed requests need credentials: given to s3fs (``key``, a session), or found by botocore's
    chain (environment, shared files, instance metadata) as s3fs will look them up."""
    if fs.anon or fs.key or fs.session is not None:
        return
    import botocore.session

    if botocore.session.Session(profile=fs.kwargs.get("profile")).get_credentials() is None:
        raise DQInputError(
            f"{url}: no S3 credentials found (set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or AWS_PROFILE)"
        )


def redact_credentials(text: str) -> str:
    """``text`` with every URL password replaced by ``***`` (``postgresql://dq:secret@db/x`` →
    ``postgresql://dq:***@db/x``): for logs, MLflow parameters and reports."""
    return _CREDENTIALS.sub(r"\g<head>:***@", text)
