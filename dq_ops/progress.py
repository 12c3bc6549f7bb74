"""The progress callback that every long-running piece of dq accepts.

``progress(done, total)`` counts the piece's own units (rows ingested, embedded or written,
training steps) and may be called from any thread. The library only calls it; the Prefect tasks
turn the calls into progress artifacts and terminal bars (:mod:`tasks.progress`).
"""

from __future__ import annotations

from collections.abc import Callable

Progress = Callable[[int, int], None]
