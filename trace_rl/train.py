"""The training job: one driver, one loop.

    python -m trace_rl.train [hydra overrides]        (console script: trace-rl)

Read ``run()`` top to bottom: it builds the services (verifier pool, rollout pool, learner group,
replay buffer), evaluates, then runs ``for step in range(...)`` over the stages

    rollout -> reward -> advantage -> learn -> sync

each timed as ``timing_s/<stage>``. The method (``algorithm.name``) is looked up in the registry and
turns rewards into per-token advantages and channels; nothing here knows which method is running.
"""
from __future__ import annotations

import json
import logging
import os
import random
import sys
import time
from contextlib import contextmanager
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import torch

from trace_rl.batch import Batch
from trace_rl.config import Config, hydra_schema, to_config, validate

log = logging.getLogger("trace_rl")


# ---------------------------------------------------------------------------------------------
# data
class PromptSampler:
    """Seeded epoch-wise order over the training prompts; its state is part of a checkpoint."""

    def __init__(self, n: int, seed: int, shuffle: bool = True):
        self.n, self.seed, self.shuffle = n, seed, shuffle
        self.epoch, self.position = 0, 0
        self._order = self._make_order()

    def _make_order(self) -> list[int]:
        order = list(range(self.n))
        if self.shuffle:
            random.Random(self.seed * 1_000_003 + self.epoch).shuffle(order)
        return order

    def next(self, k: int) -> list[int]:
        out = []
        while len(out) < k:
            if self.position >= self.n:
                self.epoch, self.position = self.epoch + 1, 0
                self._order = self._make_order()
            out.append(self._order[self.position])
            self.position += 1
        return out

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch, self.position = int(state["epoch"]), int(state["position"])
        self._order = self._make_order()


def load_split(spec: str, split: str, n: int, seed: int):
    """'arith' / 'arith:<split>' or a file path -> problems."""
    from trace_rl.tasks import load_task_problems

    if not spec:
        return []
    name, _, sub = spec.partition(":")
    if name == "arith":
        return load_task_problems("arith", sub or split, n=n or None, seed=seed)
    return load_task_problems(spec, split, n=n or None, seed=seed)


def tokenize_prompts(problems, tokenizer, max_prompt_length: int, task: str,
                     chat_template_kwargs: dict[str, Any] | None = None):
    """Render each problem with the chat template; drop (and count) prompts that are too long.

    ``chat_template_kwargs`` (``model.chat_template_kwargs``, e.g. ``{"enable_thinking": True}`` for
    Qwen3's thinking mode) are passed to ``tokenizer.apply_chat_template``; without them the prompt is
    exactly ``render_prompt``'s.
    """
    from trace_rl.tasks import instruction_for
    from trace_rl.tasks.base import build_messages, render_prompt

    kept, ids, dropped = [], [], 0
    instruction = instruction_for(task)
    kwargs = dict(chat_template_kwargs or {})
    if kwargs and getattr(tokenizer, "chat_template", None) is None:
        raise ValueError(f"model.chat_template_kwargs={kwargs} needs a tokenizer with a chat_template; "
                         f"{type(tokenizer).__name__} has none (load a chat/instruct checkpoint)")
    for p in problems:
        if kwargs:
            text = tokenizer.apply_chat_template(build_messages(p, instruction=instruction),
                                                 add_generation_prompt=True, tokenize=False, **kwargs)
        else:
            text = render_prompt(p, tokenizer, instruction=instruction)
        tok = tokenizer(text, add_special_tokens=False)["input_ids"]
        if len(tok) > max_prompt_length:
            dropped += 1
            continue
        kept.append(p)
        ids.append(tok)
    return kept, ids, dropped


def start_annotator(cfg: Config, run_dir: Path, pool: Any, tokenizer: Any, max_model_len: int,
                    placement: Any = None):
    """The configured annotator (``annotator.kind``): oracle / random / none in the driver; ``self``
    generating through the rollout pool (greedy, the current policy); ``model`` / ``api`` in the driver
    or, with ``annotator.num_actors > 0``, in an AnnotatorService. An ``api`` annotator caches replies
    under ``<run_dir>/annotator_cache`` unless ``annotator.cache_dir`` says otherwise."""
    from trace_rl.annotate.llm import pool_text_generate
    from trace_rl.annotate.service import make_annotator

    an = cfg.annotator
    if an.kind == "api" and an.cache_dir is None:
        an = replace(an, cache_dir=str(run_dir / "annotator_cache"))
    generate = None
    if an.kind == "self":
        generate = pool_text_generate(pool, tokenizer, max_new_tokens=an.max_new_tokens, max_model_len=max_model_len)
    return make_annotator(an, seed=cfg.trainer.seed, generate=generate, tokenizer=tokenizer, placement=placement)


def model_context(model_path: str) -> int | None:
    """The checkpoint's context length (``max_position_embeddings``), when its config says."""
    try:
        with open(os.path.join(model_path, "config.json")) as f:
            return int(json.load(f).get("max_position_embeddings") or 0) or None
    except (OSError, ValueError):
        return None


def resolve_model_path(path: str) -> str:
    if path == "tiny":
        from trace_rl.models.cache import tiny_model_path

        return str(tiny_model_path(stage="sft"))
    return path


# ---------------------------------------------------------------------------------------------
@contextmanager
def timed(timings: dict[str, float], stage: str):
    t0 = time.perf_counter()
    yield
    timings[f"timing_s/{stage}"] = time.perf_counter() - t0


def pad_rows_to_multiple(batch: Batch, multiple: int) -> Batch:
    """Append copies of the first rows with zero channel weight so that len(batch) % multiple == 0.
    They take part in the forward pass but in no loss term and no normaliser."""
    extra = (-len(batch)) % multiple
    if extra == 0:
        return batch
    idx = torch.arange(extra) % len(batch)
    pad = batch.select(idx)
    pad.channel_weights = torch.zeros_like(pad.channel_weights)
    pad.advantages = torch.zeros_like(pad.advantages)
    pad.meta = {k: [None] * extra for k in batch.meta}
    return Batch.concat([batch, pad], pad_token_id=0)


def decode_responses(tokenizer, batch: Batch) -> list[str]:
    rows = [batch.response_ids[i][batch.response_mask[i]].tolist() for i in range(len(batch))]
    return tokenizer.batch_decode(rows, skip_special_tokens=True)


def run_evals(pool, verifier, eval_sets, tokenizer, cfg: Config) -> dict[str, Any]:
    from trace_rl.eval import evaluate

    out: dict[str, Any] = {}
    for es in eval_sets:
        out[es.name] = evaluate(pool, verifier, es, tokenizer, k=cfg.eval.k, temperature=cfg.eval.temperature,
                                top_p=cfg.eval.top_p, top_k=cfg.eval.top_k,
                                max_new_tokens=cfg.eval.max_new_tokens, seed=cfg.trainer.seed)
    out["id_accuracy"] = out["test"]["accuracy"] if "test" in out else None
    out["ood_accuracy"] = out["ood"]["accuracy"] if "ood" in out else None
    return out


def eval_metrics(ev: dict[str, Any], k: int) -> dict[str, float]:
    m = {}
    for name, r in ev.items():
        if isinstance(r, dict):
            m[f"eval/{name}/avg@{k}"] = r["accuracy"]
            m[f"eval/{name}/pass@{k}"] = r[f"pass@{k}"]
            m[f"eval/{name}/response_length"] = r["response_length"]
    return m


def make_run_dir(cfg: Config) -> Path:
    if cfg.trainer.run_dir:
        return Path(cfg.trainer.run_dir)
    try:  # under Hydra: the job's own output directory (one per multirun job)
        from hydra.core.hydra_config import HydraConfig

        return Path(HydraConfig.get().runtime.output_dir)
    except Exception:
        name = cfg.logger.run_name or f"{cfg.algorithm.name}-{time.strftime('%Y%m%d-%H%M%S')}"
        return Path(cfg.trainer.output_dir) / name


def latest_checkpoint(run_dir: Path) -> Path | None:
    p = run_dir / "checkpoints" / "latest"
    if not p.exists():
        return None
    ckpt = run_dir / "checkpoints" / p.read_text().strip()
    return ckpt if ckpt.exists() else None


# ---------------------------------------------------------------------------------------------
def run(cfg: Config) -> dict[str, Any]:
    """Train according to ``cfg``; returns the summary (also written to <run_dir>/summary.json).

    Whatever happens, the services this job started are shut down (in reverse order) before it
    returns or raises, so the next job of a Hydra multirun starts clean.
    """
    cfg = validate(to_config(cfg))  # fails here, before any actor starts
    return with_closers(lambda closers: _run(cfg, closers))


def with_closers(body):
    """``body(closers)``; whatever it appended to ``closers`` (``(name, close)`` pairs) is closed in
    reverse order however it ends, and a failing close is logged, never raised over the body's error."""
    closers: list[tuple[str, Any]] = []
    try:
        return body(closers)
    finally:
        for name, close in reversed(closers):
            try:
                close()
            except Exception as e:  # a failing shutdown must not hide the job's own error
                log.warning("shutting down %s failed: %s", name, e)


def _run(cfg: Config, closers: list) -> dict[str, Any]:
    t_job = time.perf_counter()
    from transformers import AutoTokenizer

    import ray

    from trace_rl.algo import MethodInputs, compute_method, get_method
    from trace_rl.algo.advantages import zero_variance_mask
    from trace_rl.buffer import ReplayBuffer
    from trace_rl.cluster import init_ray
    from trace_rl.eval import EvalSet
    from trace_rl.learner.group import LearnerGroup
    from trace_rl.rewards.math_reward import extract_boxed
    from trace_rl.rewards.pool import VerifierPool
    from trace_rl.rollout.base import SamplingSpec
    from trace_rl.rollout.pool import RolloutPool
    from trace_rl.tracking import Tracker

    torch.manual_seed(cfg.trainer.seed)
    random.seed(cfg.trainer.seed)
    method = get_method(cfg.algorithm.name)
    run_dir = make_run_dir(cfg)
    run_dir.mkdir(parents=True, exist_ok=True)
    ckpt = latest_checkpoint(run_dir) if cfg.trainer.resume else None
    if cfg.trainer.resume and ckpt is None:
        log.warning("trainer.resume=true but %s has no checkpoint: starting from scratch", run_dir)

    # ---- data and model files (no actor yet)
    model_path = resolve_model_path(cfg.model.path)
    tokenizer = AutoTokenizer.from_pretrained(cfg.model.tokenizer_path or model_path,
                                              trust_remote_code=cfg.model.trust_remote_code)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    train_problems, train_ids, dropped = tokenize_prompts(
        load_split(cfg.data.task, "train", cfg.data.train_size, cfg.data.seed), tokenizer, cfg.data.max_prompt_length,
        cfg.data.task, chat_template_kwargs=cfg.model.chat_template_kwargs)
    if not train_problems:
        raise ValueError(f"data.task={cfg.data.task!r} gave no usable training prompts "
                         f"({dropped} longer than data.max_prompt_length={cfg.data.max_prompt_length})")
    eval_sets = []
    for name, spec in (("test", cfg.data.eval_test), ("ood", cfg.data.eval_ood)):
        probs, ids, _ = tokenize_prompts(load_split(spec, name, cfg.data.eval_size, cfg.data.seed), tokenizer,
                                         cfg.data.max_prompt_length, spec,
                                         chat_template_kwargs=cfg.model.chat_template_kwargs)
        if probs:
            eval_sets.append(EvalSet(name, probs, ids))
    max_model_len = cfg.data.max_prompt_length + max(cfg.rollout.max_new_tokens, cfg.eval.max_new_tokens)
    if cfg.annotator.kind == "self" and "annotations" in method.needs:
        # the policy annotates through the pool: its prompts (problem, solution, numbered segments) are longer
        max_model_len = max(max_model_len, min(model_context(model_path) or max_model_len,
                                               4 * max_model_len + cfg.annotator.max_new_tokens))

    # ---- services
    cluster = init_ray(cfg.cluster.address, num_cpus=cfg.cluster.num_cpus, num_gpus=cfg.cluster.num_gpus)
    if cluster.get("started_local"):
        closers.append(("ray", ray.shutdown))
    tracker = Tracker(run_dir, config=asdict(cfg), use_wandb=cfg.logger.wandb, wandb_mode=cfg.logger.wandb_mode,
                      project=cfg.logger.project, entity=cfg.logger.entity,
                      run_name=cfg.logger.run_name or run_dir.name, tags=cfg.logger.tags,
                      console=cfg.logger.console, resume=ckpt is not None)
    closers.append(("tracker", tracker.finish))
    verifier = VerifierPool(cfg.trainer.verifier_workers, cfg.trainer.verifier_timeout_s)
    closers.append(("verifier pool", verifier.close))
    from trace_rl.placement import ColocationProtocol, Placement, plan_from_config

    # every role's placement group, reserved up front (a plan that cannot fit fails here, named)
    placement = Placement(plan_from_config(cfg), timeout_s=cfg.cluster.placement_timeout_s)
    closers.append(("placement groups", placement.remove))
    pool = RolloutPool(model_path, engine=cfg.rollout.engine, num_engines=cfg.rollout.num_engines,
                       dtype=cfg.model.dtype, seed=cfg.rollout.seed, max_model_len=max_model_len,
                       gpu_memory_utilization=cfg.rollout.gpu_memory_utilization,
                       enforce_eager=cfg.rollout.enforce_eager, tensor_parallel_size=cfg.rollout.tensor_parallel_size,
                       cpus_per_engine=cfg.rollout.cpus_per_engine, gpus_per_engine=cfg.rollout.gpus_per_engine,
                       trust_remote_code=cfg.model.trust_remote_code, pad_token_id=pad_id, placement=placement)
    closers.append(("rollout pool", pool.shutdown))
    learners = LearnerGroup(cfg.learner, cfg.algorithm, cfg.model, model_path, seed=cfg.trainer.seed,
                            placement_strategy=cfg.cluster.placement_strategy,
                            placement_timeout_s=cfg.cluster.placement_timeout_s,
                            total_steps=cfg.trainer.total_steps, placement=placement)
    closers.append(("learner group", learners.shutdown))
    # colocated: engines and learners take turns on the shared accelerators (no-op when disaggregated)
    colo = ColocationProtocol(pool, learners, enabled=placement.colocated)
    from trace_rl.sync import make_weight_sync

    weight_sync = make_weight_sync(cfg.rollout.weight_sync, learners, pool, bucket_mb=cfg.rollout.sync_bucket_mb,
                                   backend=cfg.rollout.sync_backend)
    closers.append(("weight sync", weight_sync.close))
    buffer = ReplayBuffer(capacity=2)
    sampler = PromptSampler(len(train_problems), cfg.data.seed, cfg.data.shuffle)
    train_spec = SamplingSpec(n=cfg.rollout.n, temperature=cfg.rollout.temperature, top_p=cfg.rollout.top_p,
                              top_k=cfg.rollout.top_k, max_new_tokens=cfg.rollout.max_new_tokens)
    params = asdict(cfg.algorithm)

    # ---- what the method needs beyond rewards: an annotator, a privileged-context teacher
    from trace_rl.algo.channels import channel_kind
    from trace_rl.algo.exposure import ExposureTracker, teacher_coef
    from trace_rl.algo.methods.base import TEACHER_NEEDS
    from trace_rl.routing import InputGatherer
    from trace_rl.tasks import instruction_for
    from trace_rl.teacher import PrivilegedPromptBuilder

    teacher = None
    if method.needs & TEACHER_NEEDS:
        from trace_rl.teacher.service import TeacherService

        tc = cfg.teacher
        teacher = TeacherService(tc.model_path or model_path, kind=tc.kind, engine=tc.engine,
                                 num_actors=tc.num_actors, top_k=tc.top_k, resync_every=tc.resync_every,
                                 dtype=cfg.model.dtype, max_model_len=max_model_len + 2 * cfg.data.max_prompt_length,
                                 cpus_per_actor=tc.cpus_per_actor, gpus_per_actor=tc.gpus_per_actor,
                                 gpu_memory_utilization=tc.gpu_memory_utilization,
                                 trust_remote_code=cfg.model.trust_remote_code, seed=cfg.trainer.seed,
                                 ema_decay=tc.ema_decay, placement=placement)
        closers.append(("teacher", teacher.shutdown))
        if tc.ema_decay:  # seed the EMA with the initial policy (a resumed run re-seeds with its weights)
            teacher.sync(learners.state_dict_ref(), version=0)
    annotator = None
    if "annotations" in method.needs:
        annotator = start_annotator(cfg, run_dir, pool, tokenizer, max_model_len, placement=placement)
        if hasattr(annotator, "shutdown"):
            closers.append(("annotator", annotator.shutdown))
    gatherer = InputGatherer(
        tokenizer=tokenizer, problems={p.uid: p for p in train_problems}, annotator=annotator,
        span_cap=cfg.annotator.span_cap, teacher=teacher, learners=learners, temperature=cfg.rollout.temperature,
        prompt_builder=PrivilegedPromptBuilder(fields=tuple(cfg.teacher.privileged),
                                               instruction=instruction_for(cfg.data.task),
                                               chat_template_kwargs=tuple(cfg.model.chat_template_kwargs.items())))
    exposure = ExposureTracker()
    probe = None
    evaluating = cfg.eval.before or cfg.eval.after or cfg.eval.every > 0
    if annotator is not None and eval_sets and cfg.annotator.probe and evaluating:
        from trace_rl.routing import key_token_probe

        probe = key_token_probe(eval_sets[0].problems, eval_sets[0].prompt_ids, tokenizer, annotator,
                                cfg.annotator.span_cap)

    def key_lift() -> dict[str, float]:
        """Log-prob lift of the probe's key tokens since the previous evaluation (exposure/...)."""
        if probe is None:
            return {}
        colo.to_learners()
        exposure.record_key_logprobs(learners.logprobs(probe[0], temperature=1.0), probe[1])
        return {k: v for k, v in exposure.metrics().items() if "key_logprob" in k}
    shard_multiple = cfg.learner.num_ranks * cfg.algorithm.num_mini_batches

    start_step, eval_before, totals = 0, None, {"nonfinite_steps": 0, "skipped_steps": 0}
    if ckpt is not None:
        state = json.loads((ckpt / "driver_state.json").read_text())
        learners.load(str(ckpt / "learner"))
        sampler.load_state_dict(state["sampler"])
        random.setstate(_tuple_state(state["python_rng"]))
        torch.set_rng_state(torch.load(ckpt / "torch_rng.pt"))
        start_step, eval_before, totals = state["step"], state.get("eval_before"), state.get("totals", totals)
        if state.get("exposure"):
            exposure.load_state_dict(state["exposure"])
        weight_sync.sync(version=start_step)
        if teacher is not None and teacher.kind == "self" and teacher.resync_every > 0:
            # the teacher's pre-interruption weights are not checkpointed: restart it from the policy's
            teacher.sync(learners.state_dict_ref(), version=start_step)
        print(f"resumed from {ckpt} at step {start_step}", flush=True)
    colo.start()  # colocated: the learners are offloaded, the engines generate first

    summary: dict[str, Any] = {"run_dir": str(run_dir.resolve()), "algorithm": cfg.algorithm.name,
                               "model_path": model_path, "cluster": cluster,
                               "data": {"train_prompts": len(train_problems), "train_prompts_dropped": dropped}}
    if eval_before is None and cfg.eval.before:
        t0 = time.perf_counter()
        colo.to_engines()
        eval_before = run_evals(pool, verifier, eval_sets, tokenizer, cfg)
        tracker.log({**eval_metrics(eval_before, cfg.eval.k), **key_lift(), "timing_s/eval": time.perf_counter() - t0},
                    step=0)
        print(f"eval before: in-distribution {eval_before['id_accuracy']} | OOD {eval_before['ood_accuracy']}", flush=True)

    def save(step: int) -> None:
        d = run_dir / "checkpoints" / f"step_{step}"
        d.mkdir(parents=True, exist_ok=True)
        colo.to_learners()
        learners.save(str(d / "learner"), client_state={"step": step})
        torch.save(torch.get_rng_state(), d / "torch_rng.pt")
        (d / "driver_state.json").write_text(json.dumps({
            "step": step, "sampler": sampler.state_dict(), "python_rng": random.getstate(),
            "eval_before": eval_before, "totals": totals, "exposure": exposure.state_dict()}))
        (run_dir / "checkpoints" / "latest").write_text(d.name)

    nonfinite_streak = 0
    step = start_step
    for step in range(start_step, cfg.trainer.total_steps):
        t_step = time.perf_counter()
        timings: dict[str, float] = {}
        metrics: dict[str, float] = {}

        with timed(timings, "rollout"):
            colo.to_engines()
            idx = sampler.next(cfg.data.prompts_per_step)
            batch = pool.generate([train_ids[i] for i in idx], train_spec, version=step,
                                  meta={"uid": [train_problems[i].uid for i in idx],
                                        "answer": [train_problems[i].answer for i in idx]})

        with timed(timings, "reward"):
            texts = decode_responses(tokenizer, batch)
            scores, vstats = verifier.score(list(zip(texts, batch.meta["answer"])))
            batch.rewards = torch.tensor(scores, dtype=torch.float32)

        step_params = {**params, "step": step}
        needs = method.needs_at(step, step_params)
        # colocated: the engines keep the accelerators through annotation (annotator=self generates), then
        # hand them to the learners (teacher re-sync, entropy, training)
        extra, route_metrics = gatherer.gather(needs, batch, step, timings, teacher_rows=method.teacher_rows,
                                               before_learners=colo.to_learners)
        colo.to_learners()
        metrics.update(route_metrics)

        with timed(timings, "advantage"):
            out = compute_method(method, MethodInputs(batch.rewards, batch.group_ids, batch.response_mask, extra=extra,
                                                      behaviour_logprobs=batch.behaviour_logprobs), step_params)
            batch.advantages, batch.channel_names, batch.channel_weights, batch.channel_norms = (
                out.advantages, out.channel_names, out.channel_weights, out.channel_norms)
            if not needs & TEACHER_NEEDS:  # nothing reads teacher fields this step: do not ship them
                batch.teacher_logprobs = batch.teacher_topk_ids = batch.teacher_topk_logprobs = None
            metrics.update(out.metrics)  # already namespaced: adv/..., route/..., coef/...
            zero_var = zero_variance_mask(batch.rewards, batch.group_ids)
            keep = torch.ones(len(batch), dtype=torch.bool)
            if cfg.algorithm.filter_zero_variance:
                # a zero-variance group has no GRPO signal, but its rows may still carry another channel
                # (TRACE's KL on key spans of an all-correct group): keep those rows
                other = [c for c, name in enumerate(batch.channel_names) if channel_kind(name) != "pg"]
                routed = (batch.channel_weights[other] != 0).any(dim=0).any(dim=1) if other else torch.zeros_like(keep)
                keep = ~zero_var | routed
            learn_batch = batch.select(keep)
            metrics.update(exposure.update(batch.channel_names, batch.channel_weights, batch.response_mask,
                                           lam=teacher_coef(out.metrics), learned_rows=keep))

        learn_metrics: dict[str, float] = {}
        with timed(timings, "learn"):
            if len(learn_batch) == 0:
                totals["skipped_steps"] += 1  # every group was all-right or all-wrong: nothing to learn
            else:
                entry = buffer.put(pad_rows_to_multiple(learn_batch, shard_multiple))
                learn_metrics = learners.train(buffer.pop(min_version=step).ref,
                                               temperature=cfg.rollout.temperature, step=step,
                                               max_len=cfg.rollout.max_new_tokens)

        with timed(timings, "sync"):
            if learn_metrics:
                colo.to_engines()  # colocated: the engines wake up to receive the new weights
                metrics.update({f"sync/{k}": v for k, v in weight_sync.sync(version=step + 1).items()})

        if learn_metrics.get("nonfinite", 0) > 0:
            totals["nonfinite_steps"] += 1
            nonfinite_streak += 1
            if nonfinite_streak > cfg.trainer.max_nan_steps:
                raise RuntimeError(f"{nonfinite_streak} consecutive steps had a non-finite loss "
                                   f"(trainer.max_nan_steps={cfg.trainer.max_nan_steps}); lower algorithm.lr")
        else:
            nonfinite_streak = 0

        timings["timing_s/step"] = time.perf_counter() - t_step
        n_tokens = batch.num_response_tokens()
        lengths = batch.response_mask.sum(1).float()
        metrics.update(timings)
        metrics.update({f"actor/{k}": v for k, v in learn_metrics.items()})
        metrics.update({
            "train/reward_mean": batch.rewards.mean().item(),
            "train/accuracy": (batch.rewards > 0.5).float().mean().item(),
            "train/entropy": learn_metrics.get("entropy", float("nan")),
            "train/response_length": lengths.mean().item(),
            "train/truncated_frac": sum(r == "length" for r in batch.meta["finish_reason"]) / len(batch),
            "train/zero_variance_frac": zero_var.float().mean().item(),
            "train/learn_sequences": float(len(learn_batch)),
            "reward/no_answer_frac": sum(extract_boxed(t) is None for t in texts) / len(texts),
            "reward/timeouts": float(vstats["timeouts"]), "reward/errors": float(vstats["errors"]),
            "reward/timeouts_total": float(verifier.stats["timeouts"]),
            "perf/throughput_tokens_per_s": n_tokens / max(timings["timing_s/step"], 1e-9),
            "perf/rollout_tokens_per_s": n_tokens / max(timings["timing_s/rollout"], 1e-9),
            "train/nonfinite_steps_total": float(totals["nonfinite_steps"]),
        })
        metrics.update(colo.metrics())
        tracker.log(metrics, step=step + 1)
        tracker.print_step(step + 1, cfg.trainer.total_steps, metrics)

        if cfg.eval.every and (step + 1) % cfg.eval.every == 0 and step + 1 < cfg.trainer.total_steps:
            colo.to_engines()
            tracker.log({**eval_metrics(run_evals(pool, verifier, eval_sets, tokenizer, cfg), cfg.eval.k), **key_lift()},
                        step=step + 1)
        if cfg.trainer.save_every and (step + 1) % cfg.trainer.save_every == 0:
            save(step + 1)

    final_step = max(step + 1, start_step) if cfg.trainer.total_steps > start_step else start_step
    eval_after = None
    if cfg.eval.after:
        colo.to_engines()
        eval_after = run_evals(pool, verifier, eval_sets, tokenizer, cfg)
        tracker.log({**eval_metrics(eval_after, cfg.eval.k), **key_lift()}, step=final_step)
        print(f"eval after: in-distribution {eval_after['id_accuracy']} | OOD {eval_after['ood_accuracy']}", flush=True)
    if cfg.trainer.save_final and final_step > 0:
        save(final_step)  # (hands the accelerators to the learners)
        learners.export_hf(str(run_dir / "final_model"))
        summary["final_model"] = str((run_dir / "final_model").resolve())

    summary.update({"eval_before": eval_before, "eval_after": eval_after, "steps": final_step,
                    "totals": totals, "verifier": dict(verifier.stats), "exposure": exposure.metrics(),
                    "teacher": teacher.stats() if teacher is not None else None,
                    "annotate": dict(gatherer.annotate_counts), "placement": placement.plan.describe(),
                    "wall_time_s": time.perf_counter() - t_job})
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
    print(f"summary: {run_dir / 'summary.json'}", flush=True)
    return summary


def _tuple_state(s):
    """json turns random.getstate()'s tuples into lists; turn them back."""
    return tuple(_tuple_state(x) if isinstance(x, list) else x for x in s)


# ---------------------------------------------------------------------------------------------
CONF_DIR = str(Path(__file__).resolve().parent.parent / "conf")


def main() -> None:
    if any(a in ("--help", "-h") for a in sys.argv[1:]) and "hydra" not in " ".join(sys.argv):
        from trace_rl.config import help_text

        print(help_text())
        print("Hydra: --cfg job prints the composed config, -m runs a sweep (e.g. -m algorithm.lr=1e-5,3e-5).")
        return
    hydra_main(lambda hcfg: run(to_config(hcfg)))


def hydra_main(task) -> None:
    """Run ``task(composed config)`` under Hydra: trace_rl's ``conf/`` and schema (with its mandatory
    fields), the command line's overrides, ``-m`` sweeps. The entry of ``trace_rl.train`` and ``trace_rl.eval``."""
    import hydra
    from hydra.core.config_store import ConfigStore

    ConfigStore.instance().store(name="trace_rl_schema", node=hydra_schema())
    logging.basicConfig(level=os.environ.get("TRACE_RL_LOG", "INFO"), format="%(asctime)s %(name)s %(message)s")

    @hydra.main(config_path=CONF_DIR, config_name="config", version_base="1.3")
    def _hydra_main(hcfg) -> None:
        task(hcfg)

    _hydra_main()


if __name__ == "__main__":
    main()
