"""CUDA IPC pieces of the ``cuda_ipc`` weight sync (colocated engines, GPU only).

A learner rank flattens the full weights into buckets on its own GPU and exports each buffer as a
CUDA IPC handle (``torch.multiprocessing.reductions.reduce_tensor``); an engine on the *same*
physical GPU maps the buffer without a copy and loads from it. GPUs are matched by UUID, because
each actor numbers its visible devices from 0 (``CUDA_VISIBLE_DEVICES``): the handle's device
index is rewritten to the receiver's index of that UUID before rebuilding the tensor.
"""
from __future__ import annotations

from typing import Any

import torch

__all__ = ["require_cuda", "gpu_uuid", "local_index_of", "export_tensor", "import_tensor"]

# position of the storage device index in reduce_tensor's rebuild_cuda_tensor arguments
_DEVICE_ARG = 6


def require_cuda(what: str = "rollout.weight_sync=cuda_ipc") -> None:
    if not torch.cuda.is_available():
        raise RuntimeError(f"{what} shares CUDA memory between colocated learner and engine processes and needs "
                           "CUDA GPUs; this process sees none. Fix: use rollout.weight_sync=collective (gloo on "
                           "CPU) or object_store")


def gpu_uuid(device: torch.device | int | None = None) -> str:
    require_cuda()
    index = None
    if device is not None:
        device = torch.device("cuda", device) if isinstance(device, int) else torch.device(device)
        index = device.index
    if index is None:
        index = torch.cuda.current_device()
    return str(torch.cuda.get_device_properties(index).uuid)


def local_index_of(uuid: str) -> int | None:
    """This process's CUDA index of the GPU with ``uuid`` (None when it is not visible here)."""
    require_cuda()
    for i in range(torch.cuda.device_count()):
        if str(torch.cuda.get_device_properties(i).uuid) == uuid:
            return i
    return None


def export_tensor(t: torch.Tensor) -> tuple[Any, tuple]:
    """``(rebuild_fn, args)``: a picklable handle on CUDA tensor ``t`` (keep ``t`` alive until every
    importer is done with it)."""
    from torch.multiprocessing.reductions import reduce_tensor

    if not t.is_cuda:
        raise ValueError("CUDA IPC shares CUDA tensors only")
    return reduce_tensor(t)


def import_tensor(handle: tuple[Any, tuple], uuid: str) -> torch.Tensor:
    """The tensor behind ``handle`` (exported on the GPU ``uuid``), mapped into this process."""
    rebuild, args = handle
    index = local_index_of(uuid)
    if index is None:
        raise RuntimeError(f"GPU {uuid} is not visible in this process: cuda_ipc needs the engine on the same GPU "
                           "as a learner rank (cluster.placement=colocated)")
    args = list(args)
    args[_DEVICE_ARG] = index
    return rebuild(*args)


def import_buckets(shared: dict[str, list], buckets: list) -> list[tuple[str, torch.Tensor]]:
    """``(name, tensor)`` of every bucket exported on a GPU this process can see.

    ``shared`` maps a GPU UUID to the handles a learner rank exported there (one per bucket, in plan
    order); the first UUID visible here is used. The tensors are views of the exporter's memory:
    load them, then let the exporter release them.
    """
    from trace_rl.sync.buckets import unflatten_bucket

    require_cuda()
    for uuid, handles in shared.items():
        if local_index_of(uuid) is None:
            continue
        if len(handles) != len(buckets):
            raise RuntimeError(f"got {len(handles)} IPC handles for {len(buckets)} buckets")
        out: list[tuple[str, torch.Tensor]] = []
        for handle, bucket in zip(handles, buckets):
            out.extend(unflatten_bucket(bucket, import_tensor(handle, uuid)))
        return out
    visible = [str(torch.cuda.get_device_properties(i).uuid) for i in range(torch.cuda.device_count())]
    raise RuntimeError(f"no learner rank shares a GPU with this engine (engine GPUs {visible}, learner GPUs "
                       f"{sorted(shared)}): cuda_ipc needs cluster.placement=colocated; otherwise use "
                       "rollout.weight_sync=collective")
