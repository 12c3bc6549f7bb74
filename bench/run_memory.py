"""Which process of a `dq run` holds the most memory, and when: every process's peak RSS.

    python bench/run_memory.py [DQ RUN ARGUMENTS ...]      (run it in an empty folder)

Starts ``dq run`` with the given arguments, samples the RSS of it and of every descendant (dask
workers, the MLflow tracking process) twice a second, and prints each process's peak with the
second of the run it was reached at; the stage lines ``dq run`` printed (its stderr) say which
stage ran then. ``/usr/bin/time -v`` gives only the largest peak, without the process.
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil


def main() -> None:
    dq = Path(sys.executable).parent / "dq"
    log = tempfile.TemporaryFile("w+")  # a file, not a pipe: a full pipe would stall the run
    started = time.monotonic()
    run = subprocess.Popen([str(dq), "run", *sys.argv[1:]], stderr=log, text=True)
    peaks: dict[tuple[int, str], tuple[int, float]] = {}
    while run.poll() is None:
        try:
            root = psutil.Process(run.pid)
            processes = [root, *root.children(recursive=True)]
        except psutil.Error:
            break
        for process in processes:
            try:
                rss, command = process.memory_info().rss, " ".join(process.cmdline())[:100]
            except psutil.Error:
                continue
            key = (process.pid, command)
            if rss > peaks.get(key, (0, 0.0))[0]:
                peaks[key] = (rss, time.monotonic() - started)
        time.sleep(0.5)
    log.seek(0)
    stages = log.read()
    print(f"dq run {' '.join(sys.argv[1:])}: exit {run.wait()}, {time.monotonic() - started:.0f} s wall")
    for (pid, command), (rss, at) in sorted(peaks.items(), key=lambda item: -item[1][0])[:8]:
        print(f"{rss / 2**30:6.2f} GiB at {at:5.0f} s  pid {pid:<7d} {command}")
    print("\n".join(line for line in stages.splitlines() if " computed " in line or " cached " in line))


if __name__ == "__main__":
    main()
