"""Collective timeouts fire on gloo, for rank 0's plan broadcasts too: a group of two real processes whose
follower is stopped (SIGSTOP) makes rank 0's next plan broadcast and heartbeat barrier raise after the
collective timeout instead of waiting (a gloo broadcast waits until every peer has received)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

from router_harness import free_port

SCRIPT = r"""
import os, signal, sys, time
import torch
from k2serve.worker.distributed import init_distributed
from k2serve.worker.plan_channel import Heartbeat, PlanChannel, barrier

rank, port = int(sys.argv[1]), int(sys.argv[2])
info = init_distributed(rank, 2, "127.0.0.1", port, "gloo", timeout_s=5.0)  # also the rendezvous wait
channel = PlanChannel(info)
if rank == 1:
    assert isinstance(channel.recv(), Heartbeat)  # the group works...
    barrier(info, torch.device("cpu"))
    os.kill(os.getpid(), signal.SIGSTOP)  # ...then this rank hangs
    time.sleep(600)
channel.send(Heartbeat())
barrier(info, torch.device("cpu"))
time.sleep(0.5)
calls = (("broadcast", lambda: channel.send(Heartbeat())), ("barrier", lambda: barrier(info, torch.device("cpu"))))
for name, call in calls:
    try:
        call()
        print(name, "returned")
    except RuntimeError as exc:
        print(name, "raised", str(exc)[:80].replace("\n", " "))
sys.stdout.flush()
os._exit(0)
"""


def test_rank_0s_broadcast_and_barrier_give_up_on_a_stopped_follower():
    port = str(free_port())
    follower = subprocess.Popen([sys.executable, "-c", SCRIPT, "1", port], stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
    try:
        rank0 = subprocess.run([sys.executable, "-c", SCRIPT, "0", port], capture_output=True, text=True, timeout=120)
    finally:
        os.kill(follower.pid, signal.SIGKILL)
        follower.wait(10)
    lines = [line for line in rank0.stdout.splitlines() if line.startswith(("broadcast", "barrier"))]
    assert [line.split()[:2] for line in lines] == [["broadcast", "raised"], ["barrier", "raised"]], \
        rank0.stdout + rank0.stderr[-2000:]
