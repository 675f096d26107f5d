"""``LearnerGroup``: W learner ranks as Ray actors in one placement group.

The driver talks to the group only; the group shards each rollout batch, hands every rank its
rows through the object store together with the GLOBAL token counts of every mini-batch (so the
loss does not depend on W or on the micro-batch size), waits for all ranks, and reduces their
metrics. Every call is sent to all ranks at once because the ranks run collectives (gradient
reduction, ZeRO-3 gathers) that need all of them; if one rank fails, the group is torn down and
the error re-raised, instead of leaving the others blocked in a collective.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import sys
import threading
import time
from typing import Any

import torch

from trace_rl.batch import Batch
from trace_rl.learner.loss import check_channels, global_counts
from trace_rl.learner.worker import SAME_ON_ALL_RANKS, WEIGHT_PREFIX, LearnerWorker
from trace_rl.placement import learner_cfg_for_placement

log = logging.getLogger(__name__)

__all__ = ["LearnerGroup", "LearnerPlacementError", "LearnerRankError", "reduce_metrics", "shard_rows"]

_STRATEGIES = ("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD")


class LearnerPlacementError(RuntimeError):
    """The cluster could not provide the learner's placement group in time."""


class LearnerRankError(RuntimeError):
    """A learner rank failed; the group has been shut down."""


def shard_rows(batch_size: int, num_mini_batches: int, world_size: int, rank: int) -> torch.Tensor:
    """Row indices of ``rank``'s shard: its contiguous part of every mini-batch, in mini-batch order.

    Mini-batch m is rows ``[m * n, (m + 1) * n)`` with ``n = batch_size / num_mini_batches``; the
    rank gets part ``rank`` of W equal contiguous parts of each, so cutting its shard into
    ``num_mini_batches`` equal pieces gives back its part of every mini-batch.
    """
    n = batch_size // num_mini_batches
    s = n // world_size
    return torch.cat([torch.arange(m * n + rank * s, m * n + (rank + 1) * s) for m in range(num_mini_batches)])


def check_token_ids(batch: Batch, vocab_size: int | None) -> None:
    """ValueError if a prompt or response id of ``batch`` is outside ``[0, vocab_size)`` (None: no check)."""
    if not vocab_size:
        return
    for name in ("prompt_ids", "response_ids"):
        t = getattr(batch, name)
        if t.numel() and (int(t.min()) < 0 or int(t.max()) >= vocab_size):
            raise ValueError(f"Batch.{name} holds ids in [{int(t.min())}, {int(t.max())}], outside the "
                             f"model's vocabulary [0, {vocab_size}); pad with a valid id (pad_token_id)")


def reduce_metrics(per_rank: list[dict[str, float]]) -> dict[str, float]:
    """One metrics dict from the ranks' (see :meth:`LearnerWorker.train_step`): sums of the rank shares,
    token-weighted means, and rank 0's value of the metrics that are equal on all ranks."""
    out: dict[str, float] = {}
    first = per_rank[0]
    for key in first:
        if key.startswith(WEIGHT_PREFIX):
            continue
        if key in SAME_ON_ALL_RANKS:
            out[key] = float(first[key])
        elif WEIGHT_PREFIX + key in first:
            n = sum(r.get(WEIGHT_PREFIX + key, 0.0) for r in per_rank)
            out[key] = sum(r.get(key, 0.0) * r.get(WEIGHT_PREFIX + key, 0.0) for r in per_rank) / n if n else 0.0
        else:
            out[key] = float(sum(r.get(key, 0.0) for r in per_rank))
    return out


class LearnerGroup:
    """W learner ranks (``learner_cfg.num_ranks``) training one policy with data parallelism.

    ``LearnerGroup(learner_cfg, algo_cfg, model_cfg, model_path, seed=0)`` reserves a placement
    group of W bundles (``{"CPU": cpus_per_rank}`` plus ``{"GPU": gpus_per_rank}`` if any), starts
    the ranks and waits until every rank has loaded the model. ``placement_strategy`` /
    ``placement_timeout_s`` come from ClusterConfig; ``total_steps`` (trainer.total_steps) is
    needed by the cosine learning-rate schedule.
    """

    def __init__(self, learner_cfg: Any, algo_cfg: Any, model_cfg: Any, model_path: str, seed: int = 0, *,
                 placement_strategy: str = "PACK", placement_timeout_s: float = 120.0,
                 total_steps: int | None = None, setup_timeout_s: float = 1800.0, placement: Any = None):
        """``placement``: a :class:`trace_rl.placement.Placement` whose ``learner`` slots pin rank r to its
        bundle (its groups are owned by the caller, not released by :meth:`shutdown`); None: the group
        reserves its own placement group of W bundles, as described above."""
        import ray
        from ray.util.placement_group import placement_group
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        from trace_rl.cluster import actor_env

        if not ray.is_initialized():
            raise RuntimeError("Ray is not initialised: call trace_rl.cluster.init_ray() before creating a "
                               "LearnerGroup (it starts a loopback-only local cluster or joins a running one)")
        self.lc, self.algo, self.mc = learner_cfg, algo_cfg, model_cfg
        self.model_path = str(model_path)
        W = int(learner_cfg.num_ranks)
        _check_args(learner_cfg, algo_cfg, self.model_path, placement_strategy)
        if algo_cfg.lr_schedule == "cosine" and not total_steps:
            raise ValueError("algorithm.lr_schedule='cosine' needs total_steps (trainer.total_steps) "
                             "passed to LearnerGroup")
        with open(os.path.join(self.model_path, "config.json")) as f:
            self.vocab_size = int(json.load(f).get("vocab_size") or 0) or None
        self.world_size = W
        # Calls that run collectives must reach every rank in the same order; the driver submits from its
        # main thread and from the producer thread (entropy), so every all-rank submission holds this lock.
        self._submit_lock = threading.RLock()
        self.actors: list = []
        self.pg = None
        self.timings: dict[str, float] = {}
        t0 = time.perf_counter()

        remote_cls = ray.remote(LearnerWorker)
        env: dict[str, Any] = {"env_vars": actor_env()}
        if int(learner_cfg.nice) > 0 and shutil.which("nice"):
            # lower priority from the rank's first instruction: its start-up (imports, model, DeepSpeed) then
            # yields the cores to the engines', which is the longer one (setup() nices again where this is off)
            env["py_executable"] = f"nice -n {int(learner_cfg.nice)} {sys.executable}"
        self.placement = placement
        if placement is not None:
            # the caller's plan (trace_rl.placement): rank r on its slot's bundle, maybe shared with an engine
            rank_options = _placed_rank_options(placement, W)
            learner_cfg = learner_cfg_for_placement(learner_cfg, placement)
            self.lc = learner_cfg
            self.actors = [remote_cls.options(**rank_options[rank], runtime_env=env, name=None).remote(
                learner_cfg, algo_cfg, model_cfg, self.model_path, rank=rank, world_size=W, seed=seed,
                total_steps=total_steps) for rank in range(W)]
        else:
            bundle: dict[str, float] = {"CPU": float(learner_cfg.cpus_per_rank)}
            if learner_cfg.gpus_per_rank > 0:
                bundle["GPU"] = float(learner_cfg.gpus_per_rank)
            self.pg = placement_group([dict(bundle) for _ in range(W)], strategy=placement_strategy,
                                      name=f"trace_rl_learner_{os.getpid()}_{id(self):x}")
            try:
                ray.get(self.pg.ready(), timeout=placement_timeout_s)
            except ray.exceptions.GetTimeoutError:
                self._remove_pg()
                total = {k: v * W for k, v in bundle.items()}
                raise LearnerPlacementError(
                    f"the learner placement group was not ready after {placement_timeout_s:g} s: it needs {W} "
                    f"bundles of {bundle} (in total {total}, strategy {placement_strategy}); the cluster has "
                    f"{_fmt_resources(ray.cluster_resources())} of which {_fmt_resources(ray.available_resources())} "
                    f"are free. Fix: lower learner.num_ranks / learner.cpus_per_rank / learner.gpus_per_rank, "
                    f"free the resources held by other actors, or add nodes (cluster.placement_timeout_s sets the "
                    f"wait)") from None
            for rank in range(W):
                strategy = PlacementGroupSchedulingStrategy(placement_group=self.pg, placement_group_bundle_index=rank)
                actor = remote_cls.options(
                    num_cpus=bundle["CPU"], num_gpus=bundle.get("GPU", 0), scheduling_strategy=strategy,
                    runtime_env=env, name=None,
                ).remote(learner_cfg, algo_cfg, model_cfg, self.model_path, rank=rank, world_size=W, seed=seed,
                         total_steps=total_steps)
                self.actors.append(actor)
        try:
            infos = self._all([a.node_info.remote() for a in self.actors], "node_info", timeout=setup_timeout_s)
            master_addr = infos[0]["node_ip"]
            master_port = self._all([self.actors[0].free_port.remote()], "free_port")[0]
            per_node: dict[str, int] = {}
            local_ranks = []
            for info in infos:
                local_ranks.append(per_node.get(info["node_ip"], 0))
                per_node[info["node_ip"]] = local_ranks[-1] + 1
            self.rank_info = self._all(
                [a.setup.remote(master_addr, master_port, local_ranks[r], per_node[infos[r]["node_ip"]])
                 for r, a in enumerate(self.actors)], "setup", timeout=setup_timeout_s)
        except BaseException:
            self.shutdown()
            raise
        self.timings["start_s"] = time.perf_counter() - t0
        log.info("learner group of %d %s ranks ready in %.1f s", W, learner_cfg.backend, self.timings["start_s"])

    # ------------------------------------------------------------------------------ plumbing
    def _all(self, refs: list, what: str, timeout: float | None = None) -> list:
        """ray.get of one call on every rank; on the first failure kill the group and raise."""
        import ray

        pending = list(refs)
        deadline = None if timeout is None else time.monotonic() + timeout
        while pending:
            left = None if deadline is None else max(deadline - time.monotonic(), 0.0)
            done, pending = ray.wait(pending, num_returns=1, timeout=left)
            if not done:
                self.shutdown()
                raise LearnerRankError(f"learner ranks did not finish {what}() within {timeout:g} s; group shut down")
            try:
                ray.get(done[0])
            except Exception as err:
                rank = refs.index(done[0])
                self.shutdown()
                raise LearnerRankError(f"learner rank {rank} failed in {what}(): {err}") from err
        return ray.get(refs)

    def _check_alive(self) -> None:
        if not self.actors:
            raise RuntimeError("this LearnerGroup was shut down; create a new one")

    def _check_batch(self, batch: Batch, rows_multiple: int) -> None:
        batch.validate()
        check_channels(batch)
        if len(batch) == 0 or len(batch) % rows_multiple:
            raise ValueError(
                f"the batch has {len(batch)} sequences, not a positive multiple of algorithm.num_mini_batches x "
                f"learner.num_ranks = {rows_multiple}; make the rollout batch (prompts_per_step x rollout.n) a "
                f"multiple of it")
        check_token_ids(batch, self.vocab_size)

    @staticmethod
    def _resolve(batch) -> Batch:
        import ray

        if isinstance(batch, ray.ObjectRef):
            batch = ray.get(batch)
        if not isinstance(batch, Batch):
            raise TypeError(f"expected a trace_rl.batch.Batch or an ObjectRef to one, got {type(batch).__name__}")
        if batch.meta:  # never needed by the learner's math; don't ship it to every rank
            batch = Batch(**{**batch.to_dict(), "meta": {}})
        return batch

    # ------------------------------------------------------------------------------ API
    def train(self, batch, *, temperature: float, step: int, max_len: int | None = None) -> dict[str, float]:
        """``ppo_epochs x num_mini_batches`` optimizer updates on ``batch`` (a Batch or an ObjectRef).

        Each mini-batch (contiguous ``len/num_mini_batches`` rows) is split into W equal shards;
        rank r's shards go into the object store as one Batch. ``temperature`` is the rollout's
        sampling temperature, ``step`` the driver's 0-based step (learning-rate schedule).
        ``max_len``: the response budget of the seq-mean-token-sum-norm mode (default: the
        batch's padded response length). Returns the metrics reduced over ranks (see
        :func:`reduce_metrics`). The training driver does not use this: its routing stage cuts the
        shards where the batch is and calls :meth:`train_shards`.
        """
        import ray

        self._check_alive()
        batch = self._resolve(batch)
        M = int(self.algo.num_mini_batches)
        self._check_batch(batch, M * self.world_size)
        counts = [global_counts(mini, max_len=max_len) for mini in batch.split(M)]
        shards = [ray.put(batch.select(shard_rows(len(batch), M, self.world_size, rank)))
                  for rank in range(self.world_size)]
        return self.train_shards(shards, counts, temperature=temperature, step=step)

    def train_shards(self, shards: list, counts: list, *, temperature: float, step: int) -> dict[str, float]:
        """The update of :meth:`train` on shards already cut (``shards[r]``: an ObjectRef of rank r's Batch,
        fetched by the rank itself; ``counts[m]``: the global counts of mini-batch m, see
        :func:`~trace_rl.learner.loss.global_counts`)."""
        self._check_alive()
        if len(shards) != self.world_size:
            raise ValueError(f"got {len(shards)} shards for {self.world_size} learner ranks")
        t0 = time.perf_counter()
        with self._submit_lock:
            refs = [actor.train_step.remote(shard, temperature=temperature, step=step, counts=counts)
                    for actor, shard in zip(self.actors, shards)]
        metrics = reduce_metrics(self._all(refs, "train_step"))
        self.timings["train_s"] = time.perf_counter() - t0
        return metrics

    def entropy_refs(self, batch_ref, num_rows: int, temperature: float) -> list:
        """Start computing the policy's per-token entropy ``[num_rows, R]`` of the batch behind
        ``batch_ref`` (each rank fetches it and takes its rows); the ranks' ObjectRefs, in row order,
        not waited for (concatenate them and cut to ``num_rows``)."""
        self._check_alive()
        with self._submit_lock:
            return [a.compute_logprobs_part.remote(batch_ref, rank, self.world_size, temperature=temperature,
                                                   entropy=True) for rank, a in enumerate(self.actors)]

    def logprobs(self, batch, temperature: float, *, entropy: bool = False) -> torch.Tensor:
        """Log-probs ``[B, R]`` of the responses under the current weights (0 on padding); with
        ``entropy=True`` the policy's per-token entropies instead."""
        import ray

        self._check_alive()
        batch = self._resolve(batch)
        batch.validate()
        n, W = len(batch), self.world_size
        padded = batch
        if n % W:  # ranks must run the same number of forwards (ZeRO-3): repeat the last row
            extra = W - n % W
            padded = batch.select(torch.cat([torch.arange(n), torch.full((extra,), n - 1)]))
        parts = [ray.put(part) for part in padded.split(W)]
        with self._submit_lock:
            refs = [a.compute_logprobs.remote(part, temperature=temperature, entropy=entropy)
                    for a, part in zip(self.actors, parts)]
        return torch.cat(self._all(refs, "compute_logprobs"))[:n]

    def entropy(self, batch, temperature: float) -> torch.Tensor:
        """Per-token entropy ``[B, R]`` of the policy on the responses (0 on padding)."""
        return self.logprobs(batch, temperature, entropy=True)

    def state_dict_ref(self, dtype: str = "float32"):
        """ObjectRef to the full HF-named weights (rank 0's gathered dict; floating tensors in ``dtype``), for the
        weight sync. Rank 0 puts the dict into the object store itself: the weights never pass through this
        process."""
        self._check_alive()
        t0 = time.perf_counter()
        with self._submit_lock:
            refs = [a.gather_state_dict_ref.remote(dtype) for a in self.actors]
        out = self._all(refs, "gather_state_dict")
        self.timings["gather_s"] = time.perf_counter() - t0
        return out[0][0]

    def save(self, path: str, client_state: dict | None = None) -> None:
        """Checkpoint model and optimizer (plus ``client_state``) under ``path`` (shared between nodes)."""
        self._check_alive()
        path = os.path.abspath(path)
        with self._submit_lock:
            refs = [a.save_checkpoint.remote(path, client_state or {}) for a in self.actors]
        self._all(refs, "save_checkpoint")

    def load(self, path: str) -> dict:
        """Restore a checkpoint written by :meth:`save`; returns its client_state."""
        self._check_alive()
        path = os.path.abspath(path)
        with self._submit_lock:
            refs = [a.load_checkpoint.remote(path) for a in self.actors]
        return self._all(refs, "load_checkpoint")[0]

    def export_hf(self, path: str) -> str:
        """Write a loadable HF checkpoint (weights, config, tokenizer files) to ``path``."""
        self._check_alive()
        path = os.path.abspath(path)
        with self._submit_lock:
            refs = [a.export_hf.remote(path) for a in self.actors]
        self._all(refs, "export_hf")
        return path

    def ping(self) -> list[dict]:
        """Every rank's :meth:`LearnerWorker.ping`."""
        self._check_alive()
        return self._all([a.ping.remote() for a in self.actors], "ping")

    def shutdown(self) -> None:
        """Kill the ranks and release the placement group (idempotent)."""
        import ray

        for actor in self.actors:
            try:
                ray.kill(actor)
            except Exception:  # already dead
                pass
        self.actors = []
        self._remove_pg()

    def _remove_pg(self) -> None:
        if self.pg is None:
            return
        from ray.util.placement_group import remove_placement_group

        try:
            remove_placement_group(self.pg)
        except Exception:
            pass
        self.pg = None

    def __enter__(self) -> "LearnerGroup":
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown()

    # ------------------------------------------------------------------------------ weight sync (trace_rl/sync)
    # The learner side of trace_rl.sync's collective and cuda_ipc paths (object_store uses state_dict_ref).
    def weight_specs(self) -> list:
        """``TensorSpec`` (HF name, full shape, dtype) of every tensor a weight sync sends (rank 0's)."""
        self._check_alive()
        return self._all([self.actors[0].weight_specs.remote()], "weight_specs")[0]

    def open_weight_port(self, name: str) -> tuple[str, int]:
        """Rank 0 binds the store socket of weight-sync group ``name``; its ``(host, port)``."""
        self._check_alive()
        return tuple(self._all([self.actors[0].open_weight_port.remote(name)], "open_weight_port")[0])

    def init_weight_group(self, name: str, *, host: str, port: int, world_size: int, backend: str, buckets: list,
                          timeout_s: float = 600.0) -> list:
        """Start joining group ``name`` (rank 0 joins, every rank keeps the bucket plan). Returns the
        ranks' ObjectRefs without waiting: the engines must join at the same time (trace_rl.sync
        waits on both sides)."""
        import ray

        self._check_alive()
        plan = ray.put(list(buckets))
        return [a.init_weight_group.remote(name, host=host, port=port, world_size=world_size, backend=backend,
                                           buckets=plan, timeout_s=timeout_s) for a in self.actors]

    def broadcast_weights(self, name: str) -> list:
        """Start sending the current weights through group ``name``; the ranks' ObjectRefs (not waited
        for: the engines receive at the same time). Collective over the ranks (ZeRO-3 gathers)."""
        self._check_alive()
        with self._submit_lock:
            return [a.broadcast_weights.remote(name) for a in self.actors]

    def close_weight_group(self, name: str, timeout_s: float = 60.0) -> None:
        """Leave group ``name`` on every rank (best effort; a dead group is already closed)."""
        import ray

        if not self.actors:
            return
        try:
            ray.get([a.close_weight_group.remote(name) for a in self.actors], timeout=timeout_s)
        except Exception as err:  # closing must not mask the error that led here
            log.warning("closing weight-sync group %s: %s", name, err)

    def share_weights_ipc(self, buckets: list) -> list[dict]:
        """Every rank exports the full weights (flat buckets on its GPU) as CUDA IPC handles."""
        import ray

        self._check_alive()
        plan = ray.put(list(buckets))
        with self._submit_lock:
            refs = [a.share_weights_ipc.remote(plan) for a in self.actors]
        return self._all(refs, "share_weights_ipc")

    def release_weights_ipc(self) -> None:
        """Drop the buffers exported by :meth:`share_weights_ipc`."""
        self._check_alive()
        self._all([a.release_weights_ipc.remote() for a in self.actors], "release_weights_ipc")


def check_config(cfg: Any, err) -> None:
    """The ``learner`` section, and whether the rollout batch shards evenly over ranks and mini-batches
    (``trace_rl.config.validate``'s ``err(field, problem, fix)`` per problem)."""
    lc, a, d, r = cfg.learner, cfg.algorithm, cfg.data, cfg.rollout
    for name, allowed in (("backend", ("deepspeed", "torch")), ("zero_stage", (1, 2, 3)),
                          ("dist_backend", ("auto", "gloo", "nccl"))):
        if getattr(lc, name) not in allowed:
            err(f"learner.{name}", f"unknown value {getattr(lc, name)!r}", f"use one of {', '.join(map(str, allowed))}")
    if lc.num_ranks < 1:
        err("learner.num_ranks", f"{lc.num_ranks} < 1", "use 1 or more")
    if lc.micro_batch_size < 1:
        err("learner.micro_batch_size", f"{lc.micro_batch_size} < 1", "use 1 or more")
    if not -1 <= lc.nice <= 19:
        err("learner.nice", f"{lc.nice} is outside -1..19", "use -1 (automatic), 0 (normal) or up to 19")
    batch = d.prompts_per_step * r.n
    per_update = a.num_mini_batches * max(lc.num_ranks, 1)
    if lc.num_ranks >= 1 and a.num_mini_batches >= 1 and per_update and batch % per_update:
        err("data.prompts_per_step", f"the rollout batch ({d.prompts_per_step} prompts x {r.n} samples = "
            f"{batch}) is not divisible by algorithm.num_mini_batches x learner.num_ranks = {per_update}",
            f"make prompts_per_step * rollout.n a multiple of {per_update}")
    elif lc.num_ranks >= 1 and lc.micro_batch_size >= 1 and a.num_mini_batches >= 1 and per_update:
        per_rank = batch // per_update
        if per_rank % lc.micro_batch_size and per_rank > lc.micro_batch_size:
            err("learner.micro_batch_size", f"{lc.micro_batch_size} does not divide the {per_rank} sequences "
                "each rank gets per mini-batch", f"use a divisor of {per_rank}")


def _placed_rank_options(placement: Any, world_size: int) -> list[dict[str, Any]]:
    """``.options()`` of every rank from a :class:`trace_rl.placement.Placement` (its ``learner`` slots)."""
    if placement.count("learner") != world_size:
        raise ValueError(f"the placement plan has {placement.count('learner')} learner slot(s) for learner.num_ranks="
                         f"{world_size}; build the plan from the same config (trace_rl.placement.plan_from_config)")
    return [placement.options("learner", rank) for rank in range(world_size)]


def _check_args(lc: Any, algo: Any, model_path: str, strategy: str) -> None:
    """Clear errors for arguments that would otherwise fail inside a rank."""
    if lc.backend not in ("deepspeed", "torch"):
        raise ValueError(f"learner.backend={lc.backend!r}; use deepspeed or torch")
    if int(lc.num_ranks) < 1:
        raise ValueError(f"learner.num_ranks={lc.num_ranks}; use 1 or more")
    if lc.backend == "deepspeed" and int(lc.zero_stage) not in (1, 2, 3):
        raise ValueError(f"learner.zero_stage={lc.zero_stage}; use 1, 2 or 3")
    if int(lc.micro_batch_size) < 1:
        raise ValueError(f"learner.micro_batch_size={lc.micro_batch_size}; use 1 or more")
    if lc.cpus_per_rank <= 0 and lc.gpus_per_rank <= 0:
        raise ValueError("learner.cpus_per_rank and learner.gpus_per_rank are both 0; reserve at least one CPU")
    if lc.dist_backend not in ("auto", "gloo", "nccl"):
        raise ValueError(f"learner.dist_backend={lc.dist_backend!r}; use auto, gloo or nccl")
    if strategy not in _STRATEGIES:
        raise ValueError(f"placement_strategy={strategy!r}; use one of {', '.join(_STRATEGIES)}")
    if int(algo.num_mini_batches) < 1 or int(algo.ppo_epochs) < 1:
        raise ValueError("algorithm.num_mini_batches and algorithm.ppo_epochs must be >= 1")
    if algo.old_logprobs not in ("recompute", "behaviour"):
        raise ValueError(f"algorithm.old_logprobs={algo.old_logprobs!r}; use recompute or behaviour")
    if not os.path.isfile(os.path.join(model_path, "config.json")):
        raise ValueError(f"model_path={model_path!r} is not a Hugging Face checkpoint directory (no config.json)")


def _fmt_resources(res: dict) -> str:
    keep = {k: v for k, v in res.items() if k in ("CPU", "GPU", "memory") or not k.startswith(("node:", "bundle"))}
    keep.pop("object_store_memory", None)
    if "memory" in keep:
        keep["memory"] = f"{keep['memory'] / 2**30:.1f} GiB"
    return "{" + ", ".join(f"{k}: {v:g}" if isinstance(v, float) else f"{k}: {v}" for k, v in sorted(keep.items())) + "}"
