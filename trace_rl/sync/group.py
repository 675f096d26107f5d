"""A private torch.distributed group for the weight sync: learner rank 0 (rank 0) and every engine worker.

It must not touch the default process group: the learners' belongs to DeepSpeed / DDP and vLLM
builds its own inside every engine. So the group is built *stateless*, from a ``TCPStore`` and a
``ProcessGroupGloo`` / ``ProcessGroupNCCL`` object constructed directly; nothing is registered
with ``torch.distributed``'s global state, and several such groups can live in one process.

Rendezvous: learner rank 0 binds a listening socket on its node IP with port 0 (no race for a
"free" port) and hands the socket's descriptor to the ``TCPStore`` it hosts; the engines connect
to that address. Gloo's own sockets bind the caller's node IP as well (127.0.0.1 on a local
cluster), so on one machine nothing leaves loopback.
"""
from __future__ import annotations

import socket
import time
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any, Iterator, Sequence

import torch

from trace_rl.sync.buckets import Bucket, dtype_from_name, flatten_bucket, unflatten_bucket

__all__ = ["WeightGroup", "listen_socket", "create_weight_group", "send_buckets", "receive_buckets",
           "drain_buckets"]

BACKENDS = ("gloo", "nccl")


def listen_socket(host: str) -> socket.socket:
    """A TCP socket bound to ``host`` on a port the kernel picks, already listening (the store's)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, 0))
    sock.listen(128)
    return sock


@dataclass
class WeightGroup:
    """One member's handle on the group: ``rank`` 0 sends, the others receive."""

    pg: Any
    rank: int
    world_size: int
    backend: str
    device: torch.device
    buckets: list[Bucket] = field(default_factory=list)
    store: Any = None
    sock: socket.socket | None = None  # kept open while the store listens on it

    def broadcast(self, tensor: torch.Tensor) -> None:
        self.pg.broadcast(tensor, 0).wait()

    def close(self) -> None:
        for closer in (getattr(self.pg, "shutdown", None), getattr(self.pg, "abort", None)):
            if closer is not None:
                try:
                    closer()
                    break
                except Exception:  # already torn down, or unsupported by this backend
                    pass
        self.pg = None
        self.store = None
        if self.sock is not None:
            self.sock.close()
            self.sock = None


def create_weight_group(host: str, port: int, rank: int, world_size: int, backend: str, *,
                        local_ip: str, device: torch.device | str = "cpu", timeout_s: float = 600.0,
                        sock: socket.socket | None = None, buckets: Sequence[Bucket] = ()) -> WeightGroup:
    """Join the group (blocks until all ``world_size`` members joined).

    ``host:port``: rank 0's store; rank 0 passes the listening ``sock`` it bound there
    (:func:`listen_socket`). ``local_ip``: the address this member's gloo sockets bind.
    ``device``: where this member's flat buffers live (CUDA for NCCL, the CPU for gloo).
    """
    if backend not in BACKENDS:
        raise ValueError(f"weight-sync backend {backend!r}; use one of {BACKENDS}")
    timeout = timedelta(seconds=float(timeout_s))
    dist = torch.distributed
    if rank == 0:
        if sock is None:
            raise ValueError("rank 0 hosts the store: pass the listening socket from listen_socket()")
        store = dist.TCPStore(host, int(port), int(world_size), True, timeout=timeout,
                              master_listen_fd=sock.fileno(), wait_for_workers=False)
    else:
        store = dist.TCPStore(host, int(port), int(world_size), False, timeout=timeout)
    prefixed = dist.PrefixStore("trace_rl_weight_sync", store)
    device = torch.device(device)
    if backend == "gloo":
        opts = dist.ProcessGroupGloo._Options()
        opts._timeout = timeout
        opts._devices = [dist.ProcessGroupGloo.create_device(hostname=local_ip)]
        pg = dist.ProcessGroupGloo(prefixed, int(rank), int(world_size), opts)
    else:
        if not hasattr(dist, "ProcessGroupNCCL") or not torch.cuda.is_available():
            raise RuntimeError("rollout.sync_backend=nccl needs CUDA GPUs on the learner and every engine "
                               "(this process has none); use gloo or weight_sync=object_store")
        if device.type != "cuda":
            raise ValueError(f"NCCL moves CUDA tensors; device {device} is not a GPU")
        torch.cuda.set_device(device)
        opts = dist.ProcessGroupNCCL.Options()
        opts._timeout = timeout
        pg = dist.ProcessGroupNCCL(prefixed, int(rank), int(world_size), opts)
    group = WeightGroup(pg=pg, rank=int(rank), world_size=int(world_size), backend=backend, device=device,
                        buckets=list(buckets), store=store, sock=sock)
    # A first tiny broadcast: every member has really joined before anyone returns (NCCL is lazy).
    probe = torch.zeros(1, device=device)
    if rank == 0:
        probe.fill_(1.0)
    group.broadcast(probe)
    if float(probe.item()) != 1.0:
        raise RuntimeError("weight-sync group: the join broadcast did not arrive")
    return group


def send_buckets(group: WeightGroup | None, buckets: Sequence[Bucket], tensors_of: Any) -> dict[str, float]:
    """Broadcast every bucket from rank 0. ``tensors_of(bucket)`` is a context manager yielding the
    bucket's full tensors (in plan order) while it is open: ZeRO-3 gathers them there, which is
    collective over the learner ranks, so every learner rank runs this loop; only the one holding
    the ``group`` (learner rank 0) flattens and sends."""
    t0 = time.perf_counter()
    sent = 0
    for bucket in buckets:
        flat = None
        with tensors_of(bucket) as tensors:
            if group is not None:
                flat = flatten_bucket(bucket, [t.detach() for t in tensors], device=group.device)
        if flat is not None:
            group.broadcast(flat)
            sent += flat.numel() * flat.element_size()
            del flat
    return {"seconds": time.perf_counter() - t0, "bytes": float(sent), "buckets": float(len(buckets))}


def receive_buckets(group: WeightGroup, stats: dict[str, float] | None = None
                    ) -> Iterator[tuple[str, torch.Tensor]]:
    """A receiver's ``(name, tensor)`` stream, bucket by bucket as they arrive. Each bucket gets a new
    buffer (a loader may keep views of the previous ones). Consume it to the end, or call
    :func:`drain_buckets` on it, or the sender blocks."""
    for bucket in group.buckets:
        flat = torch.empty(bucket.numel, dtype=dtype_from_name(bucket.dtype), device=group.device)
        group.broadcast(flat)
        if stats is not None:
            stats["bytes"] = stats.get("bytes", 0.0) + flat.numel() * flat.element_size()
        yield from unflatten_bucket(bucket, flat)


def drain_buckets(stream: Iterator) -> None:
    """Receive whatever is left of a :func:`receive_buckets` stream (after a loader failed half-way),
    so the sender and the other receivers are not left waiting in a broadcast."""
    for _ in stream:
        pass


def local_node_ip() -> str:
    """This process's node IP as Ray knows it (127.0.0.1 on a local cluster, or outside Ray)."""
    try:
        import ray

        if ray.is_initialized():
            return ray.util.get_node_ip_address()
    except ImportError:
        pass
    return "127.0.0.1"
