"""One learner rank: the policy (and a frozen reference), its optimizer, and the training step.

``LearnerGroup`` runs W of these as Ray actors; the class itself is plain Python, so a single rank
also runs in-process (tests, debugging). Two backends:

- ``deepspeed``: ZeRO stage 1/2/3 over gloo (CPU) or NCCL (GPU), with a torch AdamW (no fused /
  cpu_adam op to compile). DeepSpeed does not manage gradient accumulation here
  (``managed_gradient_accumulation: false``): ``backward()`` accumulates, ``step()`` is the boundary.
- ``torch``: plain torch, one rank, or DistributedDataParallel for several.

The loss is already normalised by GLOBAL counts (trace_rl/learner/loss.py), so the gradient we
want is the SUM over micro-batches and ranks of the micro-batch gradients. DeepSpeed and DDP both
AVERAGE gradients over the data-parallel ranks, so every micro-batch loss is multiplied by the world
size before backward, and DeepSpeed's division by the accumulation steps is switched off
(``scale_wrt_gas=False``). The equivalence test (tests/learner/test_group.py) checks the result
against a single-process full-batch reference, parameters and gradient norm.
"""
from __future__ import annotations

import contextlib
import glob
import json
import logging
import math
import os
import shutil
import time
import warnings
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch

from trace_rl.placement import ColocationLog
from trace_rl.batch import Batch
from trace_rl.learner.loss import Counts, check_channels, global_counts, micro_batch_loss, needs_topk
from trace_rl.learner.policy import PolicyModel, model_inputs

log = logging.getLogger(__name__)

__all__ = ["LearnerWorker", "learning_rate", "deepspeed_config", "skip_cpu_shm_comm_build", "DTYPES"]

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

# Metrics that are the same on every rank (taken from rank 0 by LearnerGroup); metrics with a
# "_weight/<name>" partner are token-weighted means; every other metric is summed over ranks.
SAME_ON_ALL_RANKS = ("grad_norm", "lr", "nonfinite", "updates")
WEIGHT_PREFIX = "_weight/"

# Tokenizer and generation files copied next to an exported checkpoint.
_TOKENIZER_FILES = ("tokenizer*", "special_tokens_map.json", "added_tokens.json", "vocab.*", "merges.txt",
                    "*.model", "chat_template.*", "generation_config.json")


def learning_rate(algo: Any, update: int, total_updates: int | None = None) -> float:
    """Learning rate of optimizer update number ``update`` (0-based, counted over the whole run).

    Linear warm-up over ``algo.warmup_steps`` updates (the first update uses ``lr / warmup``), then
    ``constant`` or ``cosine`` decay to 0 at ``total_updates`` (SGDR, Loshchilov & Hutter, arXiv
    1608.03983, Eq. 5, without restarts). A pure function of the update index, so a resumed run
    needs no scheduler state.
    """
    base = float(algo.lr)
    warm = int(algo.warmup_steps)
    if warm > 0 and update < warm:
        return base * (update + 1) / warm
    if algo.lr_schedule == "constant":
        return base
    if algo.lr_schedule == "cosine":
        if not total_updates:
            raise ValueError("algorithm.lr_schedule='cosine' needs the run length: pass total_steps to "
                             "LearnerGroup / LearnerWorker (trainer.total_steps)")
        progress = min(max((update - warm) / max(total_updates - warm, 1), 0.0), 1.0)
        return base * 0.5 * (1.0 + math.cos(math.pi * progress))
    raise ValueError(f"unknown algorithm.lr_schedule {algo.lr_schedule!r}; use constant or cosine")


def deepspeed_config(learner: Any, algo: Any, model: Any, *, on_gpu: bool = False) -> dict[str, Any]:
    """The DeepSpeed config dict of the policy engine (``learner.deepspeed_overrides`` merged on top)."""
    stage = int(learner.zero_stage)
    cfg: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": int(learner.micro_batch_size),
        "gradient_accumulation_steps": 1,
        # We own the accumulation boundary: backward() accumulates, step() reduces and updates,
        # whatever number of micro-batches a rollout batch has.
        "managed_gradient_accumulation": False,
        "gradient_clipping": float(algo.grad_clip),
        "zero_optimization": {"stage": stage, "overlap_comm": bool(on_gpu and stage >= 2)},
        # a torch optimizer: nothing to compile (STACK_NOTES); ZeRO wraps it
        "zero_allow_untested_optimizer": True,
        # bf16 otherwise skips the non-finite gradient check; the learner relies on it
        "bf16": {"enabled": model.dtype == "bfloat16", "check_grad_overflow": True},
        "fp16": {"enabled": model.dtype == "float16"},
        "steps_per_print": 2 ** 31 - 1,
        "wall_clock_breakdown": False,
    }
    return _merge(cfg, dict(getattr(learner, "deepspeed_overrides", None) or {}))


def _merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def skip_cpu_shm_comm_build() -> bool:
    """Stop ``deepspeed.init_distributed`` from compiling its shared-memory comm op on CPU.

    On the CPU accelerator every ``TorchBackend`` construction JIT-builds ``deepspeed_shm_comm``
    (36-115 s, STACK_NOTES), which only serves ``inference_all_reduce`` (not used in training)
    and assumes all ranks share one host. ``deepspeed.comm.torch.build_shm_op`` skips the build
    when ``deepspeed.ops.__compatible_ops__`` marks the op incompatible; that dict is probed once
    (0.2 s) and cached in the module, so editing it is the supported switch (there is no env var).
    Returns True when the op was switched off (CPU accelerator), False otherwise.
    """
    from deepspeed.accelerator import get_accelerator

    if get_accelerator().device_name() != "cpu":
        return False
    import deepspeed.ops as ds_ops

    ds_ops.__compatible_ops__["deepspeed_shm_comm"] = False
    return True


@dataclass
class _Cached:
    """No-grad results of one micro-batch computed before the updates (ratio denominator, reference)."""
    old: torch.Tensor | None = None
    ref: torch.Tensor | None = None


class LearnerWorker(ColocationLog):
    """One data-parallel rank. Construct, call :meth:`setup` on every rank at once, then train.

    ``setup`` joins the process group (it blocks until all W ranks joined), loads the model from
    ``model_path`` and builds the engine. Every other method except :meth:`ping`,
    :meth:`node_info` and :meth:`free_port` is collective: all ranks must call it, with their own
    shard, in the same order.
    """

    def __init__(self, learner_cfg: Any, algo_cfg: Any, model_cfg: Any, model_path: str, *, rank: int = 0,
                 world_size: int = 1, seed: int = 0, total_steps: int | None = None):
        if learner_cfg.backend not in ("deepspeed", "torch"):
            raise ValueError(f"learner.backend={learner_cfg.backend!r}; use deepspeed or torch")
        if not (0 <= rank < world_size):
            raise ValueError(f"rank {rank} is outside [0, world_size={world_size})")
        self.lc, self.algo, self.mc = learner_cfg, algo_cfg, model_cfg
        self.model_path = str(model_path)
        self.rank, self.world_size, self.seed = int(rank), int(world_size), int(seed)
        updates_per_step = algo_cfg.ppo_epochs * algo_cfg.num_mini_batches
        self.total_updates = total_steps * updates_per_step if total_steps else None
        self.device = torch.device("cpu")
        self.engine = None  # DeepSpeed engine (deepspeed backend)
        self.model: torch.nn.Module | None = None  # PolicyModel, maybe DDP-wrapped (torch backend)
        self.optimizer: torch.optim.Optimizer | None = None
        self.ref = None  # frozen reference: PolicyModel or a DeepSpeed engine (ZeRO-3)
        self._hf_ds_config = None  # HfDeepSpeedConfig must stay alive for ZeRO-3 loading
        self._ready = False
        self.timings: dict[str, float] = {}
        self.nice_at_start = os.getpriority(os.PRIO_PROCESS, 0)  # before setup(); LearnerGroup may start it niced
        # weight sync (trace_rl/sync): bucket plans by group name, rank 0's groups / store sockets, IPC buffers
        self._weight_plans: dict[str, list] = {}
        self._weight_groups: dict[str, Any] = {}
        self._weight_socks: dict[str, Any] = {}
        self._ipc_buffers: list[torch.Tensor] = []

    # ------------------------------------------------------------------------------ set-up
    def ping(self) -> dict[str, Any]:
        """Liveness and placement: rank, pid, torch threads, whether setup finished, CPU niceness (now and when
        the actor was created)."""
        return {"rank": self.rank, "pid": os.getpid(), "threads": torch.get_num_threads(), "ready": self._ready,
                "device": str(self.device), "nice": os.getpriority(os.PRIO_PROCESS, 0),
                "nice_at_start": self.nice_at_start}

    def node_info(self) -> dict[str, Any]:
        """This actor's node IP (Ray's view; 127.0.0.1 in-process) and its visible GPUs."""
        ip = "127.0.0.1"
        try:
            import ray

            if ray.is_initialized():
                from trace_rl.cluster import node_ip

                ip = node_ip()
        except ImportError:
            pass
        return {"node_ip": ip, "cuda_devices": torch.cuda.device_count() if torch.cuda.is_available() else 0}

    def free_port(self) -> int:
        """A free TCP port on this node (rank 0's, for the rendezvous)."""
        from trace_rl.cluster import free_port

        return free_port(self.node_info()["node_ip"])

    def setup(self, master_addr: str = "127.0.0.1", master_port: int | None = None, local_rank: int = 0,
              local_world_size: int = 1) -> dict[str, Any]:
        """Join the process group, load the model, build the engine / optimizer (and the reference)."""
        t0 = time.perf_counter()
        _quiet_known_warnings()
        lc = self.lc
        n_threads = lc.threads_per_rank or max(1, _cores() // max(local_world_size, 1))
        torch.set_num_threads(n_threads)
        torch.manual_seed(self.seed)
        if getattr(lc, "nice", 0) > 0:  # CPU scheduling priority below the rollout engines' (trace_rl.startup)
            current = os.getpriority(os.PRIO_PROCESS, 0)  # already lowered where the group started it niced
            if current < int(lc.nice):
                os.nice(int(lc.nice) - current)

        on_gpu = lc.gpus_per_rank > 0
        if on_gpu:
            if not torch.cuda.is_available():
                raise RuntimeError(f"learner.gpus_per_rank={lc.gpus_per_rank} but rank {self.rank} sees no CUDA "
                                   "device; set learner.gpus_per_rank=0 on CPU machines")
            # Ray gives each actor its own GPU(s) (CUDA_VISIBLE_DEVICES): then it is device 0.
            index = local_rank if torch.cuda.device_count() > local_rank and torch.cuda.device_count() > 1 else 0
            torch.cuda.set_device(index)
            self.device = torch.device("cuda", index)
        else:
            index = local_rank
        backend = lc.dist_backend
        if backend == "auto":
            backend = "nccl" if on_gpu else "gloo"
        if backend == "nccl" and not on_gpu:
            raise ValueError("learner.dist_backend='nccl' needs GPUs (learner.gpus_per_rank > 0); use gloo or auto")
        self.dist_backend = backend
        if lc.backend == "deepspeed" or self.world_size > 1:  # a single plain-torch rank joins no group
            self._set_dist_env(str(master_addr), master_port, index, local_world_size)
        if lc.backend == "deepspeed":
            self._setup_deepspeed(on_gpu)
        else:
            self._setup_torch()
        self._ready = True
        self.timings["setup_s"] = time.perf_counter() - t0
        return {**self.ping(), **self.timings, "dist_backend": backend}

    def _set_dist_env(self, master_addr: str, master_port: int | None, local_rank: int,
                      local_world_size: int) -> None:
        """The torch.distributed env:// variables (what torchrun would set), for this actor process."""
        if master_port is None:
            from trace_rl.cluster import free_port

            master_port = free_port(master_addr)
        os.environ.update(MASTER_ADDR=master_addr, MASTER_PORT=str(master_port), RANK=str(self.rank),
                          WORLD_SIZE=str(self.world_size), LOCAL_RANK=str(local_rank),
                          LOCAL_WORLD_SIZE=str(local_world_size))
        if master_addr.startswith("127.") and os.path.isdir("/sys/class/net/lo"):
            # A loopback rendezvous means one node: keep gloo/NCCL's own sockets on loopback too
            # (by default they bind the interface the hostname resolves to; DESIGN.md, Conventions).
            os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
            os.environ.setdefault("NCCL_SOCKET_IFNAME", "lo")

    def _load_policy(self) -> PolicyModel:
        from transformers import AutoModelForCausalLM

        if self.mc.dtype not in DTYPES:
            raise ValueError(f"model.dtype={self.mc.dtype!r}; use one of {', '.join(DTYPES)}")
        hf = AutoModelForCausalLM.from_pretrained(self.model_path, dtype=DTYPES[self.mc.dtype],
                                                  trust_remote_code=self.mc.trust_remote_code)
        hf.config.use_cache = False
        return PolicyModel(hf, self.lc.logprob_chunk_size)

    def _new_optimizer(self, params, *, on_gpu: bool = False) -> torch.optim.Optimizer:
        """AdamW: DeepSpeed's fused kernel on GPU ranks (the one optimizer whose states DeepSpeed can move
        off the GPU: colocated ZeRO-3 ``offload_states`` asserts it), torch's elsewhere (the same update)."""
        a = self.algo
        if optimizer_kind(self.lc.backend, on_gpu) == "fused_adam":
            from deepspeed.ops.adam import FusedAdam

            return FusedAdam(params, lr=a.lr, betas=tuple(a.betas), weight_decay=a.weight_decay, adam_w_mode=True)
        return torch.optim.AdamW(params, lr=a.lr, betas=tuple(a.betas), weight_decay=a.weight_decay)

    def _setup_deepspeed(self, on_gpu: bool) -> None:
        t0 = time.perf_counter()
        import deepspeed

        self.timings["import_deepspeed_s"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        skip_cpu_shm_comm_build()
        deepspeed.init_distributed(dist_backend=self.dist_backend, auto_mpi_discovery=False, verbose=False,
                                   timeout=timedelta(minutes=30))
        self.timings["init_distributed_s"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        ds_cfg = deepspeed_config(self.lc, self.algo, self.mc, on_gpu=on_gpu)
        stage3 = int(self.lc.zero_stage) == 3
        if stage3:
            # from_pretrained builds the model directly partitioned (zero.Init) while this object
            # lives; an explicit zero.Init around from_pretrained fails with transformers 5.
            from transformers.integrations.deepspeed import HfDeepSpeedConfig

            self._hf_ds_config = HfDeepSpeedConfig(ds_cfg)
        policy = self._load_policy()
        if self.mc.gradient_checkpointing:
            policy.hf.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        optimizer = self._new_optimizer([p for p in policy.parameters() if p.requires_grad], on_gpu=on_gpu)
        self.timings["load_model_s"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        self.engine, self.optimizer, _, _ = deepspeed.initialize(model=policy, optimizer=optimizer, config=ds_cfg)
        self.device = self.engine.device
        self.timings["initialize_s"] = time.perf_counter() - t0
        if self.algo.kl_coef > 0:
            ref = self._load_policy()
            ref.requires_grad_(False)
            ref.eval()
            if stage3:
                # a ZeRO-3 engine without optimizer: sharded like the policy, gathered per module
                ref_cfg = {k: v for k, v in ds_cfg.items() if k not in ("gradient_clipping",)}
                self.ref, _, _, _ = deepspeed.initialize(model=ref, config=ref_cfg)
            else:
                self.ref = ref.to(self.device)

    def _setup_torch(self) -> None:
        if self.world_size > 1:
            torch.distributed.init_process_group(self.dist_backend, rank=self.rank, world_size=self.world_size,
                                                 timeout=timedelta(minutes=30))
        policy = self._load_policy().to(self.device)
        if self.mc.gradient_checkpointing:
            policy.hf.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if self.world_size > 1:
            from torch.nn.parallel import DistributedDataParallel as DDP

            self.model = DDP(policy, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        else:
            self.model = policy
        self.optimizer = self._new_optimizer([p for p in policy.parameters() if p.requires_grad])
        if self.algo.kl_coef > 0:
            ref = self._load_policy().to(self.device)
            ref.requires_grad_(False)
            self.ref = ref.eval()

    # ------------------------------------------------------------------------------ helpers
    def _require_ready(self) -> None:
        if not self._ready:
            raise RuntimeError("LearnerWorker.setup() has not run yet")

    @property
    def policy(self) -> PolicyModel:
        """The bare PolicyModel (unwrapped from the DeepSpeed engine / DDP)."""
        if self.engine is not None:
            return self.engine.module
        return self.model.module if hasattr(self.model, "module") else self.model

    def _train_module(self):
        return self.engine if self.engine is not None else self.model

    def _micro_batches(self, batch: Batch) -> list[Batch]:
        mbs = int(self.lc.micro_batch_size)
        return [batch.select(slice(s, min(s + mbs, len(batch)))) for s in range(0, len(batch), mbs)]

    def _forward(self, module, mb: Batch, temperature: float, with_entropy: bool, with_topk: bool = False):
        """``(logprobs [b, R], entropy [b, R] | None, topk [b, R, K] | None)`` of micro-batch ``mb`` on
        ``module``; ``topk`` (log-probs at ``mb.teacher_topk_ids``) only when ``with_topk``."""
        kw, r_kept = model_inputs(mb, self.device)
        if with_topk:
            kw["topk_ids"] = mb.teacher_topk_ids[:, :r_kept].to(self.device)
        out = module(**kw, temperature=float(temperature), with_entropy=with_entropy)
        logp, ent = out[0], out[1]
        topk = out[2] if with_topk else None
        pad = mb.response_len - r_kept
        if pad:
            logp = torch.nn.functional.pad(logp, (0, pad))
            ent = torch.nn.functional.pad(ent, (0, pad)) if ent is not None else None
            topk = torch.nn.functional.pad(topk, (0, 0, 0, pad)) if topk is not None else None
        return logp, ent, topk

    def _to_device(self, mb: Batch) -> Batch:
        if self.device.type == "cpu":
            return mb
        fields = {k: (v.to(self.device) if isinstance(v, torch.Tensor) else v) for k, v in mb.to_dict().items()}
        return Batch(**fields)

    def _set_lr(self, update: int) -> float:
        lr = learning_rate(self.algo, update, self.total_updates)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        return lr

    def _backward(self, loss: torch.Tensor) -> None:
        if self.engine is not None:
            self.engine.backward(loss, scale_wrt_gas=False)
        else:
            loss.backward()

    def _optimizer_step(self) -> tuple[bool, float]:
        """Clip and step; returns ``(applied, grad_norm)``. A non-finite gradient skips the update."""
        if self.engine is not None:
            # ZeRO computes the global norm and, if it is inf/NaN, drops the gradients and skips the
            # update on every rank (the norm is all-reduced, so all ranks agree).
            self.engine.step()
            norm = self.engine.get_global_grad_norm()
            norm = float(norm) if norm is not None else float("nan")
            return bool(self.engine.was_step_applied()), norm
        params = [p for p in self.policy.parameters() if p.requires_grad]
        clip = self.algo.grad_clip if self.algo.grad_clip > 0 else float("inf")
        norm = float(torch.nn.utils.clip_grad_norm_(params, clip))  # DDP grads are already all-reduced
        applied = math.isfinite(norm)
        if applied:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return applied, norm

    @torch.no_grad()
    def _prepass(self, minis: list[Batch], temperature: float, need_old: bool) -> list[list[_Cached]]:
        """No-grad forwards before the first update: old log-probs (recompute) and reference log-probs."""
        need_ref = self.algo.kl_coef > 0
        out = [[_Cached() for _ in self._micro_batches(m)] for m in minis]
        if not (need_old or need_ref):
            return out
        module = self._train_module()
        module.eval()
        for m, mini in enumerate(minis):
            for i, mb in enumerate(self._micro_batches(mini)):
                if need_old:
                    out[m][i].old = self._forward(module, mb, temperature, False)[0]
                if need_ref:
                    out[m][i].ref = self._forward(self.ref, mb, temperature, False)[0]
        return out

    # ------------------------------------------------------------------------------ training
    def train_step(self, batch: Batch, *, temperature: float, step: int,
                   counts: list[dict[str, Counts]] | None = None) -> dict[str, float]:
        """``ppo_epochs x num_mini_batches`` optimizer updates on this rank's shard ``batch``.

        ``batch`` is cut into ``num_mini_batches`` contiguous equal parts (mini-batch m of this rank
        is its shard of the group's mini-batch m). ``counts[m]`` are the GLOBAL counts of mini-batch m
        (:func:`trace_rl.learner.loss.global_counts` over all ranks' rows); a single rank may omit
        them. ``temperature`` is the rollout's sampling temperature; ``step`` the driver's 0-based
        step (it places the updates on the learning-rate schedule).

        Returns this rank's metrics: ``loss``, ``pg_loss``, ``kl`` and ``loss/<channel>`` (this
        rank's share of the mini-batch values, averaged over updates: sum them over ranks),
        ``tokens`` (response tokens of the shard), token means ``entropy``, ``clipfrac``,
        ``approx_kl``, ... (with their ``_weight/<name>`` token counts), and, equal on all ranks,
        ``grad_norm`` (mean over applied updates), ``lr`` (last), ``nonfinite`` (skipped updates),
        ``updates`` (applied updates).
        """
        self._require_ready()
        a = self.algo
        if not (isinstance(temperature, (int, float)) and temperature > 0):
            raise ValueError(f"temperature must be the rollout's sampling temperature (> 0), got {temperature!r}")
        check_channels(batch)
        M = int(a.num_mini_batches)
        if len(batch) % M:
            raise ValueError(f"this rank's shard has {len(batch)} sequences, not divisible by "
                             f"algorithm.num_mini_batches={M}")
        minis = batch.split(M)
        if counts is None:
            if self.world_size > 1:
                raise ValueError("counts (global per-mini-batch token counts) are required with several ranks; "
                                 "LearnerGroup.train computes them")
            counts = [global_counts(m) for m in minis]
        if len(counts) != M:
            raise ValueError(f"got counts for {len(counts)} mini-batches, expected {M}")
        U = int(a.ppo_epochs) * M
        with_topk = needs_topk(batch)  # a channel reads the student's log-probs at the teacher's top-k
        # With a single update per batch the current (detached) log-probs ARE the old ones.
        need_old = a.old_logprobs == "recompute" and U > 1
        t0 = time.perf_counter()
        cache = self._prepass(minis, temperature, need_old)
        sums: dict[str, float] = {}
        weighted: dict[str, list[float]] = {}  # name -> [sum of value * n, sum of n]
        norms: list[float] = []
        nonfinite = 0
        lr = 0.0
        module = self._train_module()
        ddp = self.engine is None and self.world_size > 1
        for epoch in range(int(a.ppo_epochs)):
            for m, mini in enumerate(minis):
                lr = self._set_lr(int(step) * U + epoch * M + m)
                module.train()
                micro = self._micro_batches(mini)
                for i, mb in enumerate(micro):
                    sync = contextlib.nullcontext() if not ddp or i == len(micro) - 1 else self.model.no_sync()
                    with sync:
                        mb_dev = self._to_device(mb)
                        logp, ent, topk = self._forward(module, mb_dev, temperature, True, with_topk)
                        if a.old_logprobs == "behaviour":
                            old = mb_dev.behaviour_logprobs
                        elif need_old:
                            old = cache[m][i].old
                        else:
                            old = logp.detach()
                        terms = micro_batch_loss(mb_dev, logp, old, counts[m], a,
                                                 entropy=ent if a.entropy_coef > 0 else ent.detach(),
                                                 ref_logprobs=cache[m][i].ref, topk_logprobs=topk)
                        # DeepSpeed / DDP average over ranks; the loss is already a global sum
                        self._backward(terms.loss * self.world_size)
                    sums["loss"] = sums.get("loss", 0.0) + float(terms.loss.detach())
                    for k, v in terms.parts.items():
                        sums[k] = sums.get(k, 0.0) + float(v)
                    for k, (v, n) in terms.token_metrics.items():
                        acc = weighted.setdefault(k, [0.0, 0.0])
                        acc[0] += v * n
                        acc[1] += n
                applied, norm = self._optimizer_step()
                if applied:
                    norms.append(norm)
                else:
                    nonfinite += 1
                    log.warning("rank %d: non-finite loss/gradient at step %s (update %d/%d): update skipped",
                                self.rank, step, epoch * M + m + 1, U)
        self.timings["train_step_s"] = time.perf_counter() - t0
        out = {k: v / U for k, v in sums.items()}
        for k, (vn, n) in weighted.items():
            out[k] = vn / n if n > 0 else 0.0
            out[WEIGHT_PREFIX + k] = n
        out.update(tokens=float(batch.response_mask.sum()), grad_norm=sum(norms) / len(norms) if norms else 0.0,
                   lr=lr, nonfinite=float(nonfinite), updates=float(U - nonfinite))
        return out

    def compute_logprobs_part(self, batch: Batch, part: int, parts: int, *, temperature: float,
                              entropy: bool = False) -> torch.Tensor:
        """:meth:`compute_logprobs` of part ``part`` of ``parts`` equal contiguous row ranges of ``batch``
        (the last row repeated so that every rank runs the same number of forwards, as ZeRO-3 needs)."""
        n = len(batch)
        per = -(-n // parts)
        idx = torch.arange(part * per, (part + 1) * per).clamp(max=n - 1)
        return self.compute_logprobs(batch.select(idx), temperature=temperature, entropy=entropy)

    @torch.no_grad()
    def compute_logprobs(self, batch: Batch, *, temperature: float, entropy: bool = False) -> torch.Tensor:
        """Log-probs ``[B, R]`` (float32, CPU, 0 on padding) of the responses under the current policy;
        with ``entropy=True`` the per-token entropies of the policy at the same positions instead."""
        self._require_ready()
        module = self._train_module()
        module.eval()
        outs = [self._forward(module, self._to_device(mb), temperature, entropy)[1 if entropy else 0].float().cpu()
                for mb in self._micro_batches(batch)]
        return torch.cat(outs) if outs else torch.zeros(0, batch.response_len)

    # ------------------------------------------------------------------------------ weights out
    def gather_state_dict(self, dtype: str = "float32") -> dict[str, torch.Tensor] | None:
        """The full weights with HF names, on CPU, on rank 0 (None on the others): floating parameters in
        ``dtype`` (float32 for checkpoints and exports; the engines' dtype for a weight sync, so a bfloat16
        model ships half the bytes), buffers as they are.

        Collective under ZeRO-3 (parameters are gathered one at a time). Tied parameters appear
        once, under their first name (``model.embed_tokens.weight``; no ``lm_head.weight``), as in
        a saved HF checkpoint.
        """
        self._require_ready()
        t0 = time.perf_counter()
        policy = self.policy
        stage3 = self.engine is not None and int(self.lc.zero_stage) == 3
        out: dict[str, torch.Tensor] | None = {} if self.rank == 0 else None
        for name, p in policy.hf_named_parameters():
            ctx = contextlib.nullcontext()
            if stage3:
                import deepspeed

                ctx = deepspeed.zero.GatheredParameters([p], modifier_rank=None)
            with ctx:
                if out is not None:
                    out[name] = p.data.detach().to("cpu", DTYPES[dtype] if p.is_floating_point() else p.dtype,
                                                   copy=True)
        if out is not None:
            for name, b in _persistent_buffers(policy.hf):
                out[name] = b.detach().to("cpu", copy=True)
        self.timings["gather_s"] = time.perf_counter() - t0
        return out

    def gather_state_dict_ref(self, dtype: str = "float32") -> list:
        """:meth:`gather_state_dict`, put into the object store by this rank: ``[ObjectRef]`` on rank 0,
        ``[None]`` elsewhere. The caller receives only the reference (a few bytes), never the weights."""
        import ray

        out = self.gather_state_dict(dtype)
        return [ray.put(out) if out is not None else None]

    # ------------------------------------------------------------------------------ weight sync (trace_rl/sync)
    def _sync_tensors(self) -> dict[str, torch.Tensor]:
        """What a weight sync sends, by HF name, in :meth:`gather_state_dict`'s order: the parameters
        (tied ones once; ZeRO-3 partitions until gathered) and the persistent buffers."""
        policy = self.policy
        out = dict(policy.hf_named_parameters())
        out.update(_persistent_buffers(policy.hf))
        return out

    def weight_specs(self) -> list:
        """``TensorSpec`` (name, full shape, dtype) of every tensor a weight sync sends; no gather."""
        from trace_rl.sync.buckets import TensorSpec, dtype_name

        self._require_ready()
        return [TensorSpec(name, tuple(getattr(t, "ds_shape", None) or t.shape), dtype_name(t.dtype))
                for name, t in self._sync_tensors().items()]

    @contextlib.contextmanager
    def _full_tensors(self, bucket):
        """The bucket's tensors, full, while the context is open (collective under ZeRO-3)."""
        tensors = self._sync_tensors()
        items = [tensors[s.name] for s in bucket.specs]
        if self.engine is not None and int(self.lc.zero_stage) == 3:
            import deepspeed

            params = [t for t in items if hasattr(t, "ds_id")]
            with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
                yield [t.data for t in items]
        else:
            yield [t.data for t in items]

    def open_weight_port(self, name: str) -> tuple[str, int]:
        """Rank 0: bind the store socket of weight-sync group ``name`` on this node; ``(host, port)``."""
        from trace_rl.sync.group import listen_socket

        host = self.node_info()["node_ip"]
        sock = listen_socket(host)
        self._weight_socks[name] = sock
        return host, int(sock.getsockname()[1])

    def init_weight_group(self, name: str, *, host: str, port: int, world_size: int, backend: str, buckets: list,
                          timeout_s: float = 600.0) -> dict[str, Any]:
        """Join weight-sync group ``name`` as its rank 0 (learner rank 0; blocks until the engines joined);
        the other ranks only keep the bucket plan (they take part in the ZeRO-3 gathers)."""
        self._require_ready()
        self._weight_plans[name] = list(buckets)
        if self.rank != 0:
            return {"rank": self.rank}
        from trace_rl.sync.group import create_weight_group

        if backend == "nccl" and self.device.type != "cuda":
            raise RuntimeError("rollout.sync_backend=nccl needs the learners on GPUs (learner.gpus_per_rank > 0)")
        sock = self._weight_socks.pop(name, None)
        if sock is None:
            raise RuntimeError(f"open_weight_port({name!r}) must run on rank 0 before init_weight_group")
        t0 = time.perf_counter()
        device = self.device if backend == "nccl" else torch.device("cpu")
        group = create_weight_group(host, port, 0, world_size, backend, local_ip=host, device=device,
                                    timeout_s=timeout_s, sock=sock, buckets=buckets)
        self._weight_groups[name] = group
        return {"rank": self.rank, "seconds": time.perf_counter() - t0}

    def broadcast_weights(self, name: str) -> dict[str, float]:
        """Send the current full weights through group ``name``, bucket by bucket (collective over the
        learner ranks; the engines receive at the same time)."""
        from trace_rl.sync.group import send_buckets

        self._require_ready()
        if name not in self._weight_plans:
            raise RuntimeError(f"no weight-sync group {name!r} on rank {self.rank}: init_weight_group first")
        group = self._weight_groups.get(name) if self.rank == 0 else None
        with torch.no_grad():
            stats = send_buckets(group, self._weight_plans[name], self._full_tensors)
        self.timings["broadcast_s"] = stats["seconds"]
        return stats

    def close_weight_group(self, name: str) -> None:
        """Leave group ``name`` (idempotent)."""
        self._weight_plans.pop(name, None)
        sock = self._weight_socks.pop(name, None)
        if sock is not None:
            sock.close()
        group = self._weight_groups.pop(name, None)
        if group is not None:
            group.close()

    def share_weights_ipc(self, buckets: list) -> dict[str, Any]:
        """Flatten the full weights into ``buckets`` on this rank's GPU and export them as CUDA IPC
        handles (collective under ZeRO-3: every rank ends up with a full copy for its colocated
        engines). The buffers stay alive until :meth:`release_weights_ipc`."""
        from trace_rl.sync.buckets import flatten_bucket
        from trace_rl.sync.ipc import export_tensor, gpu_uuid, require_cuda

        self._require_ready()
        require_cuda()
        if self.device.type != "cuda":
            raise RuntimeError("rollout.weight_sync=cuda_ipc needs the learners on GPUs (learner.gpus_per_rank > 0)")
        t0 = time.perf_counter()
        self._ipc_buffers = []
        with torch.no_grad():
            for bucket in buckets:
                with self._full_tensors(bucket) as tensors:
                    self._ipc_buffers.append(flatten_bucket(bucket, tensors, device=self.device))
        torch.cuda.synchronize(self.device)
        return {"rank": self.rank, "gpu_uuid": gpu_uuid(self.device),
                "handles": [export_tensor(b) for b in self._ipc_buffers],
                "bytes": float(sum(b.numel() * b.element_size() for b in self._ipc_buffers)),
                "seconds": time.perf_counter() - t0}

    def release_weights_ipc(self) -> None:
        """Drop the buffers of :meth:`share_weights_ipc` (after every engine loaded them)."""
        self._ipc_buffers = []
        if torch.cuda.is_available():
            torch.cuda.ipc_collect()

    def export_hf(self, path: str) -> str | None:
        """Rank 0 writes a loadable HF checkpoint to ``path``: gathered weights (safetensors, in
        ``model.dtype``), config.json and the tokenizer files of the model directory. Collective."""
        state = self.gather_state_dict()
        if state is None:
            return None
        from huggingface_hub import split_torch_state_dict_into_shards
        from safetensors.torch import save_file
        from transformers import AutoConfig

        os.makedirs(path, exist_ok=True)
        dtype = DTYPES[self.mc.dtype]
        state = {k: (v.to(dtype) if v.is_floating_point() else v).contiguous() for k, v in state.items()}
        split = split_torch_state_dict_into_shards(state, filename_pattern="model{suffix}.safetensors")
        for filename, names in split.filename_to_tensors.items():
            save_file({n: state[n] for n in names}, os.path.join(path, filename), metadata={"format": "pt"})
        if split.is_sharded:
            index = {"metadata": split.metadata, "weight_map": split.tensor_to_filename}
            with open(os.path.join(path, "model.safetensors.index.json"), "w") as f:
                json.dump(index, f, indent=2)
        config = AutoConfig.from_pretrained(self.model_path, trust_remote_code=self.mc.trust_remote_code)
        config.use_cache = True
        config.save_pretrained(path)
        for pattern in _TOKENIZER_FILES:
            for src in glob.glob(os.path.join(self.model_path, pattern)):
                if os.path.isfile(src):
                    shutil.copy2(src, os.path.join(path, os.path.basename(src)))
        return path

    # ------------------------------------------------------------------------------ checkpoints
    def save_checkpoint(self, path: str, client_state: dict | None = None) -> None:
        """Save model, optimizer and ``client_state`` under directory ``path`` (collective; with
        DeepSpeed every rank writes its own shards, so ``path`` must be shared between nodes)."""
        self._require_ready()
        state = {"client_state": dict(client_state or {})}
        if self.engine is not None:
            self.engine.save_checkpoint(path, client_state={"trace_rl": state})
            return
        if self.rank == 0:
            os.makedirs(path, exist_ok=True)
            torch.save({"model": self.policy.state_dict(), "optimizer": self.optimizer.state_dict(), **state},
                       os.path.join(path, "torch_learner.pt"))
        if self.world_size > 1:
            torch.distributed.barrier()

    def load_checkpoint(self, path: str) -> dict:
        """Restore what :meth:`save_checkpoint` wrote; returns its ``client_state`` (collective)."""
        self._require_ready()
        if self.engine is not None:
            load_path, cs = self.engine.load_checkpoint(path)
            if load_path is None:
                raise FileNotFoundError(f"no DeepSpeed checkpoint under {path!r} (expected a 'latest' file and a "
                                        "tag directory written by save_checkpoint)")
            return dict((cs or {}).get("trace_rl", {}).get("client_state", {}))
        file = os.path.join(path, "torch_learner.pt")
        if not os.path.exists(file):
            raise FileNotFoundError(f"no torch learner checkpoint at {file!r}")
        state = torch.load(file, map_location=self.device, weights_only=False)
        self.policy.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        return dict(state.get("client_state", {}))

    # ------------------------------------------------------------------------------ colocation
    def offload_states(self) -> dict[str, Any]:
        """Colocated (trace_rl.placement): move this rank's parameters, gradients and optimizer state to CPU
        memory while the engines generate. DeepSpeed: ``engine.offload_states()`` (ZeRO 1-3); torch: the
        module and the optimizer state. On CPU ranks a no-op that is still counted (:meth:`colocation_log`)."""
        self._require_ready()
        acted = self.device.type == "cuda"
        if acted:
            if self.engine is not None:
                self.engine.offload_states()
            else:
                self._move_torch_states(torch.device("cpu"))
            torch.cuda.empty_cache()
        return self._colocation_event("offload", acted)

    def reload_states(self) -> dict[str, Any]:
        """Colocated: bring the state offloaded by :meth:`offload_states` back before training."""
        self._require_ready()
        acted = self.device.type == "cuda"
        if acted:
            if self.engine is not None:
                self.engine.reload_states()
            else:
                self._move_torch_states(self.device)
        return self._colocation_event("reload", acted)

    def _move_torch_states(self, device: torch.device) -> None:
        self.policy.to(device)
        if isinstance(self.ref, torch.nn.Module):
            self.ref.to(device)
        for state in self.optimizer.state.values():
            for key, value in state.items():
                if torch.is_tensor(value):
                    state[key] = value.to(device, non_blocking=True)
        if device.type == "cuda":
            torch.cuda.synchronize(device)


def optimizer_kind(backend: str, on_gpu: bool) -> str:
    """``fused_adam`` for DeepSpeed ranks on GPUs, ``torch_adamw`` otherwise (CPU ranks, the torch backend)."""
    return "fused_adam" if backend == "deepspeed" and on_gpu else "torch_adamw"


def _quiet_known_warnings() -> None:
    """Silence warnings that fire on every collective / every returned tensor and say nothing actionable:
    DeepSpeed's use of torch's deprecated collective names, and Ray's zero-copy notice (the tensors
    we return are detached CPU copies, the case it is safe for)."""
    warnings.filterwarnings("ignore", message=r"`torch\.distributed\.\w+` is deprecated")
    warnings.filterwarnings("ignore", message=r"Zero-copy tensor serialization is enabled")


def _cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def _persistent_buffers(module: torch.nn.Module):
    """``(name, buffer)`` of the buffers a state dict would hold (non-persistent ones are skipped)."""
    for mod_name, mod in module.named_modules():
        for name, buf in mod.named_buffers(recurse=False):
            if buf is not None and name not in mod._non_persistent_buffers_set:
                yield (f"{mod_name}.{name}" if mod_name else name), buf
