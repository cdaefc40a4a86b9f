"""Joining a worker group's torch.distributed world: NCCL (GPU) or gloo (CPU) plus a gloo control group."""

from __future__ import annotations

import datetime
import logging
import socket

import torch.distributed as dist

from k2serve.worker.parallel import ParallelInfo

log = logging.getLogger(__name__)


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that is free on this host right now."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


# Followers wait on the control group for rank 0's next plan for as long as the group is idle (a dead
# rank 0 still fails that wait at once: the connection closes; a hung one is the controller's to find).
FOLLOWER_CONTROL_TIMEOUT = datetime.timedelta(days=7)


def init_distributed(
    rank: int, world_size: int, master_addr: str, master_port: int, backend: str, timeout_s: float
) -> ParallelInfo:
    """Rendezvous at rank 0's address; every tensor collective gives up after `timeout_s` seconds.

    Step plans travel on a separate gloo control group. Its timeout is each rank's own: rank 0's sends
    give up after `timeout_s` too (a gloo broadcast waits for every peer to receive, so a stopped peer
    would otherwise hold rank 0 for the whole limit), while the others wait for the next plan without a
    short limit, since an idle group is healthy.
    """
    timeout = datetime.timedelta(seconds=timeout_s)
    dist.init_process_group(
        backend, init_method=f"tcp://{master_addr}:{master_port}", rank=rank, world_size=world_size, timeout=timeout
    )
    control = dist.new_group(backend="gloo", timeout=timeout if rank == 0 else FOLLOWER_CONTROL_TIMEOUT)
    log.info("rank %d/%d joined %s:%d over %s", rank, world_size, master_addr, master_port, backend)
    return ParallelInfo(rank=rank, world_size=world_size, group=dist.group.WORLD, control_group=control)


def destroy_distributed() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
