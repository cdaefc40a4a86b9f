"""Pid files of serving worker groups: rank 0 writes one while it serves, `k2serve drain` reads them.

A Kubernetes worker pod's preStop hook runs `k2serve drain`, which sends SIGTERM to every rank-0 process
that wrote a file into the pod's pid directory (`controller.worker_pid_dir`) and waits for them to exit.
A file holds the pid and the process's start time (field 22 of /proc/PID/stat), so that a pid reused by
another process after a crash is never signalled.
"""

from __future__ import annotations

import os
from pathlib import Path

SUFFIX = ".pid"


def pid_file(directory: str | Path, group: str, port: int) -> Path:
    """The file rank 0 of `group`, serving gRPC on `port`, writes its pid to."""
    return Path(directory) / f"worker-{group}-{port}{SUFFIX}"


def start_time(pid: int) -> str | None:
    """The process's start time in clock ticks since boot, or None when no such process runs (an exited
    process its parent has not reaped yet, a zombie, does not run)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return None if fields[0] == "Z" else fields[19]


def write_pid_file(path: Path) -> None:
    """Record this process in `path`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"{os.getpid()} {start_time(os.getpid())}\n")


def live_processes(directory: str | Path) -> dict[int, str]:
    """pid -> start time of every process with a pid file in `directory` that still runs; files of
    processes that are gone (or whose pid now belongs to another process) are removed."""
    found = {}
    for path in sorted(Path(directory).glob(f"worker-*{SUFFIX}")):
        try:
            pid_text, started = path.read_text().split()
            pid = int(pid_text)
        except (OSError, ValueError):
            continue
        if start_time(pid) == started:
            found[pid] = started
        else:
            path.unlink(missing_ok=True)
    return found


def running(processes: dict[int, str]) -> dict[int, str]:
    """Those of `processes` (pid -> start time) that still run."""
    return {pid: started for pid, started in processes.items() if start_time(pid) == started}
