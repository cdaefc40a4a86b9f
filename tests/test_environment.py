"""A local Ray started by k2serve listens on loopback only: its node address is 127.0.0.1 and no process
of it listens on another interface (Ray reads its cluster switch at import time, so the environment must
be set before `import ray`; `init_ray` refuses to start a local cluster when it was not)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

SCRIPT = r"""
import json, os, sys
if sys.argv[1] == "ray-first":
    import ray
from k2serve.cluster.environment import init_ray
ray = init_ray(num_cpus=1)


def listening() -> list[str]:
    # every TCP socket in LISTEN state that a process started by this one (or it) holds: address:port
    inodes = {}
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in open(table).read().splitlines()[1:]:
            fields = line.split()
            if fields[3] == "0A":
                inodes[fields[9]] = fields[1]
    mine, found = {os.getpid()} | descendants(os.getpid()), []
    for pid in mine:
        try:
            links = [os.readlink(f"/proc/{pid}/fd/{fd}") for fd in os.listdir(f"/proc/{pid}/fd")]
        except OSError:
            continue
        found += [inodes[l[8:-1]] for l in links if l.startswith("socket:[") and l[8:-1] in inodes]
    return found


def descendants(root: int) -> set[int]:
    children = {}
    for entry in filter(str.isdigit, os.listdir("/proc")):
        try:
            ppid = int(open(f"/proc/{entry}/stat").read().rsplit(")", 1)[1].split()[1])
        except OSError:
            continue
        children.setdefault(ppid, []).append(int(entry))
    out, stack = set(), [root]
    while stack:
        for child in children.get(stack.pop(), []):
            out.add(child)
            stack.append(child)
    return out


print(json.dumps({"node": ray.nodes()[0]["NodeManagerAddress"], "listening": listening()}))
ray.shutdown()
"""


def run(mode: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    return subprocess.run([sys.executable, "-c", SCRIPT, mode], capture_output=True, text=True, env=env, timeout=240)


def is_loopback(hex_address: str) -> bool:
    """/proc/net/tcp{,6} address (little-endian hex) -> whether it is a loopback address."""
    host = hex_address.split(":")[0]
    if len(host) == 8:
        return host.endswith("7F")  # 127.x.x.x, stored little-endian
    return host in ("00000000000000000000000001000000", "0000000000000000FFFF00000100007F")  # ::1, ::ffff:127.0.0.1


@pytest.mark.slow
def test_a_local_ray_listens_on_loopback_only():
    result = run("k2serve")
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["node"] == "127.0.0.1"
    assert report["listening"], "no listening socket found: the check would prove nothing"
    assert all(is_loopback(a) for a in report["listening"]), report["listening"]


def test_a_local_ray_is_refused_when_ray_was_imported_first():
    result = run("ray-first")
    assert result.returncode != 0 and "imported before" in result.stderr, result.stderr[-3000:]
