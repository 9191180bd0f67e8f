"""The DDP lifecycle in one unit: read torchrun's environment, set up the process group, tear down."""

from __future__ import annotations

import contextlib
import os
import socket
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistEnv:
    rank: int
    local_rank: int
    world_size: int
    device: torch.device
    backend: str | None  # None when running as a single plain process

    @property
    def is_main(self) -> bool:
        # Global rank, not local rank: one process in the whole job logs and writes files.
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.backend is not None


def cuda_device_count(preference: str = "auto") -> int:
    """GPUs a training may use under this device preference: 0 for cpu or without CUDA."""
    if preference == "cpu" or not torch.cuda.is_available():
        return 0
    return torch.cuda.device_count()


def resolve_device(preference: str = "auto", local_rank: int = 0, devices: tuple[int, ...] | None = None) -> torch.device:
    """This process's device. `devices`: the GPU ids this training was given (a sweep trial's share);
    local rank i takes devices[i]. None: every visible GPU, local rank i takes GPU i."""
    if preference == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device 'cuda' requested but CUDA is not available on this machine")
    if preference in ("cuda", "auto") and torch.cuda.is_available():
        return torch.device("cuda", gpu_index(local_rank, devices, torch.cuda.device_count()))
    return torch.device("cpu")


def gpu_index(local_rank: int, devices: tuple[int, ...] | None, gpu_count: int) -> int:
    """The GPU of local rank `local_rank`: its entry in the training's share, else GPU local_rank."""
    if devices:
        return devices[local_rank % len(devices)]
    return local_rank % gpu_count


@contextlib.contextmanager
def ddp_context(device_preference: str = "auto", devices: tuple[int, ...] | None = None):
    """Yield the DistEnv of this process; a plain single process when not started by torchrun."""
    in_ddp = "RANK" in os.environ and "WORLD_SIZE" in os.environ
    rank = int(os.environ.get("RANK", 0))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    device = resolve_device(device_preference, local_rank, devices)
    backend = None
    if in_ddp:
        backend = "nccl" if device.type == "cuda" else "gloo"
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group(backend=backend, device_id=device if device.type == "cuda" else None)
    try:
        yield DistEnv(rank=rank, local_rank=local_rank, world_size=world_size, device=device, backend=backend)
        if in_ddp:
            # Every rank done with the group before any tears it down: rank 0 hosts the workers' store,
            # and a peer whose store went away mid-teardown could abort (see nn_core.worker.main).
            dist.barrier()
    finally:
        if in_ddp and dist.is_initialized():
            dist.destroy_process_group()


@contextlib.contextmanager
def single_process_group(device_preference: str = "cpu"):
    """A gloo process group of one in this very process (an in-memory store: no rendezvous, no port),
    for a one-process training run in-process: train() then takes the same path, collectives
    included, as in a launched worker. One default group per process: the caller serialises."""
    device = resolve_device(device_preference)
    dist.init_process_group(backend="gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        yield DistEnv(rank=0, local_rank=0, world_size=1, device=device, backend="gloo")
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def all_reduce_sum(t: torch.Tensor, env: DistEnv) -> torch.Tensor:
    if env.distributed:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def broadcast_object(obj, env: DistEnv):
    """Rank 0's object on every rank (e.g. the checkpoint, so only rank 0 needs to read storage)."""
    if not env.distributed:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0, device=env.device if env.device.type == "cuda" else None)
    return box[0]


# ---------------------------------------------------------------------------------------------
# Where the stores listen. A TCPStore server binds every interface whatever host it is given, and it
# has no authentication; torch's supported way to choose the address is `master_listen_fd`, a socket
# bound beforehand. So the launcher (nn_core.launch) hosts the rendezvous store itself on such a socket (and tells the
# c10d backend it is not the host: it connects as a client), and a one-node training's rank 0 hosts
# the workers' store the same way on the loopback (init_process_group's own TCPStore is
# multi-tenant, so it shares that server instead of binding another).


def bound_socket(host: str, port: int) -> socket.socket | None:
    """A socket bound to HOST:PORT, or None when this machine cannot bind that address (it is
    another machine's, or another process on this one already hosts the store)."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror:
        return None
    for family, type_, proto, _, addr in infos:
        sock = socket.socket(family, type_, proto)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(addr)
            return sock
        except OSError:
            sock.close()
    return None


def host_store(sock: socket.socket):
    from datetime import timedelta

    from torch.distributed import TCPStore

    host, port = sock.getsockname()[:2]
    store = TCPStore(host, port, is_master=True, multi_tenant=True, wait_for_workers=False,
                     master_listen_fd=sock.fileno(), timeout=timedelta(seconds=60))
    sock.detach()  # the store's server owns the descriptor now
    return store
