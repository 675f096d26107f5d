"""The training job: one driver, one loop.

    python -m trace_rl.train [hydra overrides]        (console script: trace-rl)

``run()`` validates the config, loads the files and starts the services (``trace_rl.startup``, shared
with evaluation), evaluates, then runs ``for step in range(...)``. A step's data never passes through
this process: the producer (``trace_rl.pipeline``, a thread of this driver) chains each step through

    rollout -> reward -> annotate -> teacher -> advantage          (object refs between stage actors)

and this loop, for each step, takes the routed shards from the replay buffer and runs

    learn -> sync (-> teacher re-sync when due) -> ask the producer for a later step

each timed as ``timing_s/<stage>``. ``trainer.max_staleness = k`` lets the producer work up to ``k``
steps ahead of the learners (asynchronous training; 0 = on-policy lockstep). The method
(``algorithm.name``) is looked up in the registry; nothing here knows which method is running.
"""
from __future__ import annotations

import json
import logging
import random
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from trace_rl.config import Config
from trace_rl.startup import (CONF_DIR, hydra_main, load_split, tokenize_prompts,  # noqa: F401 (re-exported)
                              wants_help, with_closers)

log = logging.getLogger("trace_rl")


# ---------------------------------------------------------------------------------------------
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


def latest_checkpoint(run_dir: Path) -> Path | None:
    p = run_dir / "checkpoints" / "latest"
    if not p.exists():
        return None
    ckpt = run_dir / "checkpoints" / p.read_text().strip()
    return ckpt if ckpt.exists() else None


# ---------------------------------------------------------------------------------------------
def run(cfg: Any) -> dict[str, Any]:
    """Train according to ``cfg``; returns the summary (also written to <run_dir>/summary.json).

    Whatever happens, the services this job started are shut down (in reverse order) before it
    returns or raises, so the next job of a Hydra multirun starts clean.
    """
    from trace_rl.startup import validate

    cfg = validate(cfg)  # fails here, before any actor starts
    return with_closers(lambda closers: _run(cfg, closers))


def _run(cfg: Config, closers: list) -> dict[str, Any]:
    import ray

    from trace_rl.algo import TEACHER_NEEDS, get_method
    from trace_rl.algo.exposure import ExposureTracker
    from trace_rl.buffer import BufferEntry, ReplayBuffer
    from trace_rl.pipeline import DriverTraffic, Producer, RouteSpec, StepTimeline, remote_verifier
    from trace_rl.rollout.base import SamplingSpec
    from trace_rl.startup import decide_services, make_run_dir, start_cluster_and_load_files, start_training_services
    from trace_rl.tracking import Tracker

    t_job = time.perf_counter()
    torch.manual_seed(cfg.trainer.seed)
    random.seed(cfg.trainer.seed)
    method = get_method(cfg.algorithm.name)
    run_dir = make_run_dir(cfg)
    run_dir.mkdir(parents=True, exist_ok=True)
    ckpt = latest_checkpoint(run_dir) if cfg.trainer.resume else None
    if cfg.trainer.resume and ckpt is None:
        log.warning("trainer.resume=true but %s has no checkpoint: starting from scratch", run_dir)

    # ---- files, then the cluster and the services (trace_rl.startup: shared with evaluation)
    services = decide_services(cfg)
    cluster, files, startup_s = start_cluster_and_load_files(cfg, services, closers)
    tracker = Tracker(run_dir, config=asdict(cfg), use_wandb=cfg.logger.wandb, wandb_mode=cfg.logger.wandb_mode,
                      project=cfg.logger.project, entity=cfg.logger.entity,
                      run_name=cfg.logger.run_name or run_dir.name, tags=cfg.logger.tags,
                      console=cfg.logger.console, resume=ckpt is not None)
    closers.append(("tracker", tracker.finish))
    svc = start_training_services(cfg, files, services, run_dir, closers, cluster=cluster)
    svc.startup_s = {**startup_s, **svc.startup_s}
    pool, learners, stages, colo, weight_sync = svc.pool, svc.learners, svc.stages, svc.colocation, svc.weight_sync
    verifier = remote_verifier(stages.reward)
    print("start-up: " + ", ".join(f"{k.split('/')[-1]} {v:.1f} s" for k, v in svc.startup_s.items()), flush=True)

    k = int(cfg.trainer.max_staleness)
    buffer = ReplayBuffer(capacity=k + 1, max_staleness=k)
    sampler = PromptSampler(len(files.prompts), cfg.data.seed, cfg.data.shuffle)
    params = asdict(cfg.algorithm)
    exposure = ExposureTracker()
    probe = None
    evaluating = cfg.eval.before or cfg.eval.after or cfg.eval.every > 0
    if stages.annotate is not None and files.eval_sets and cfg.annotator.probe and evaluating:
        probe = ray.get(stages.annotate.probe.remote(files.eval_sets[0].problems, files.eval_sets[0].prompt_ids))

    def key_lift() -> dict[str, float]:
        """Log-prob lift of the probe's key tokens since the previous evaluation (exposure/...)."""
        if probe is None:
            return {}
        colo.to_learners()
        exposure.record_key_logprobs(learners.logprobs(probe[0], temperature=1.0), probe[1])
        return {k: v for k, v in exposure.metrics().items() if "key_logprob" in k}

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
        colo.before_sync()
        weight_sync.sync(version=start_step)
        if stages.teacher is not None and stages.teacher_kind == "self" and stages.resync_every > 0:
            # the teacher's pre-interruption weights are not checkpointed: restart it from the policy's
            ray.get(stages.teacher.sync.remote([learners.state_dict_ref()], start_step))
        print(f"resumed from {ckpt} at step {start_step}", flush=True)
    colo.start()  # colocated: the learners offload, the engines wake: they generate first

    summary: dict[str, Any] = {"run_dir": str(run_dir.resolve()), "algorithm": cfg.algorithm.name,
                               "model_path": files.model_path, "cluster": svc.cluster,
                               "data": {"train_prompts": len(files.prompts)},
                               "startup_s": svc.startup_s}
    if eval_before is None and cfg.eval.before:
        t0 = time.perf_counter()
        colo.to_engines()
        eval_before = run_evals(pool, verifier, files.eval_sets, files.tokenizer, cfg)
        tracker.log({**eval_metrics(eval_before, cfg.eval.k), **key_lift(), "timing_s/eval": time.perf_counter() - t0},
                    step=0)
        print(f"eval before: in-distribution {eval_before['id_accuracy']} | OOD {eval_before['ood_accuracy']}", flush=True)

    producer = Producer(
        pool=pool, stages=stages, learners=learners, sampler=sampler, method=method, params=params,
        prompts=files.prompts,
        spec=SamplingSpec(n=cfg.rollout.n, temperature=cfg.rollout.temperature, top_p=cfg.rollout.top_p,
                          top_k=cfg.rollout.top_k, max_new_tokens=cfg.rollout.max_new_tokens),
        prompts_per_step=cfg.data.prompts_per_step, stream_chunks=cfg.rollout.stream_chunks,
        route_spec=RouteSpec(method=method.name, params=params, needs=frozenset(),
                             filter_zero_variance=cfg.algorithm.filter_zero_variance,
                             num_ranks=cfg.learner.num_ranks, num_mini_batches=cfg.algorithm.num_mini_batches,
                             max_len=cfg.rollout.max_new_tokens, pad_token_id=files.pad_id,
                             vocab_size=learners.vocab_size, sort_by_length=cfg.learner.sort_by_length),
        colocation=colo, temperature=cfg.rollout.temperature, pad_token_id=files.pad_id).start()
    closers.append(("producer", producer.stop))

    def save(step: int) -> None:
        d = run_dir / "checkpoints" / f"step_{step}"
        d.mkdir(parents=True, exist_ok=True)
        colo.to_learners()
        learners.save(str(d / "learner"), client_state={"step": step})
        torch.save(torch.get_rng_state(), d / "torch_rng.pt")
        (d / "driver_state.json").write_text(json.dumps({
            "step": step, "sampler": producer.sampler_state(step), "python_rng": random.getstate(),
            "eval_before": eval_before, "totals": totals, "exposure": exposure.state_dict()}))
        (run_dir / "checkpoints" / "latest").write_text(d.name)

    # ---- the loop: the producer runs up to k steps ahead of the learners
    total = cfg.trainer.total_steps
    labels = iter(range(start_step, 1 << 62))  # the learner step each requested rollout is meant for
    in_flight = 0

    def top_up(remaining: int) -> None:
        """Keep min(k + 1, remaining) rollouts requested ahead of the learners."""
        nonlocal in_flight
        while in_flight < min(k + 1, remaining):
            producer.request(next(labels))
            in_flight += 1

    top_up(total - start_step)
    version = start_step        # the policy version the learners hold (one more per update)
    pending_sync = None         # the last weight sync, waited for lazily (it is queued behind a rollout)
    pending_teacher_sync: list = []
    timeline = StepTimeline()
    traffic = DriverTraffic()
    nonfinite_streak = 0
    step = start_step
    t_loop = time.perf_counter()
    t_prev = time.perf_counter()
    while step < total:
        timings: dict[str, float] = {}
        metrics: dict[str, float] = {}
        traffic.reset()
        with traffic:
            t0 = time.perf_counter()
            item = producer.next()
            in_flight -= 1
            info = ray.get(item.info)  # a few hundred bytes: the routed step's summary
            timings["timing_s/wait_data"] = time.perf_counter() - t0
            if pending_sync is not None:
                metrics.update({f"sync/{k_}": v for k_, v in pending_sync().items()})
                pending_sync = None
            if pending_teacher_sync:  # surfaces a failed teacher re-sync
                metrics["sync/teacher_s"] = float(sum(ray.get(pending_teacher_sync)))
                pending_teacher_sync.clear()
            entry = buffer.put(BufferEntry(item.shards, version=min(info.versions, default=version),
                                           sequences=info.padded_rows, tokens=info.tokens, step=step, info=info))
            entry = buffer.pop(version)
            learned_version = version  # the weights this step trains (and its rows' staleness is measured against)
            if entry is None:  # staler than trainer.max_staleness: dropped (counted), produce another
                top_up(total - step)
                continue
            stage_stats = {name: ray.get(refs) for name, refs in item.stage_stats.items() if refs}
            engine_stats = ray.get(item.engine_stats)

            learn_metrics: dict[str, float] = {}
            t0 = time.perf_counter()
            if info.skipped:
                totals["skipped_steps"] += 1  # every group was all-right or all-wrong: nothing to learn
            else:
                colo.to_learners()
                learn_metrics = learners.train_shards(entry.ref, info.counts, temperature=cfg.rollout.temperature,
                                                      step=step)
            timings["timing_s/learn"] = time.perf_counter() - t0

            t0 = time.perf_counter()
            if learn_metrics:
                version += 1
                colo.before_sync()  # colocated: the engines take back their weights only; the learners stay
                pending_sync = weight_sync.submit(version)
                if colo.enabled:  # colocated: the learners offload only once the engines hold the new weights
                    metrics.update({f"sync/{k_}": v for k_, v in pending_sync().items()})
                    pending_sync = None
                    colo.after_sync()  # learners offload, the engines' KV cache wakes
            nxt = step + 1
            if nxt < total and stages.wants_teacher_sync(nxt) and method.needs_at(nxt, {**params, "step": nxt}) \
                    & TEACHER_NEEDS:
                # queued on the teacher stage before the next rollout's scoring is (not waited for here)
                t1 = time.perf_counter()
                pending_teacher_sync.append(stages.teacher.sync.remote([learners.state_dict_ref()], nxt))
                timings["timing_s/teacher_sync"] = time.perf_counter() - t1
            timings["timing_s/sync"] = time.perf_counter() - t0
            top_up(total - step - 1)  # the engines now hold (or have queued) the weights of version `version`
            if k == 0 and pending_sync is not None:  # lockstep: nothing runs ahead, so finish it in this step
                t1 = time.perf_counter()
                metrics.update({f"sync/{k_}": v for k_, v in pending_sync().items()})
                pending_sync = None
                timings["timing_s/sync"] += time.perf_counter() - t1

        if learn_metrics.get("nonfinite", 0) > 0:
            totals["nonfinite_steps"] += 1
            nonfinite_streak += 1
            if nonfinite_streak > cfg.trainer.max_nan_steps:
                raise RuntimeError(f"{nonfinite_streak} consecutive steps had a non-finite loss "
                                   f"(trainer.max_nan_steps={cfg.trainer.max_nan_steps}); lower algorithm.lr")
        else:
            nonfinite_streak = 0

        now = time.perf_counter()
        timings["timing_s/step"] = now - t_prev
        t_prev = now
        timings.update(timeline.stage_timings(engine_stats, stage_stats, info))
        metrics.update(timeline.idle(engine_stats, timings))
        exposure_metrics = exposure.add(*info.exposure)
        n_rows = max(info.rows, 1)
        metrics.update(timings)
        metrics.update(info.metrics)
        metrics.update(exposure_metrics)
        metrics.update({f"actor/{k_}": v for k_, v in learn_metrics.items()})
        metrics.update(_stage_metrics(stage_stats, info))
        stale = {learned_version - v: c for v, c in info.versions.items()}  # staleness -> learned rows
        rows_learned = sum(stale.values())
        metrics.update({
            "train/entropy": learn_metrics.get("entropy", float("nan")),
            "reward/no_answer_frac": sum(s["no_answer"] for s in stage_stats.get("reward", [])) / n_rows,
            "reward/timeouts": sum(s["timeouts"] for s in stage_stats.get("reward", [])),
            "reward/errors": sum(s["errors"] for s in stage_stats.get("reward", [])),
            "perf/throughput_tokens_per_s": info.tokens / max(timings["timing_s/step"], 1e-9),
            "perf/rollout_tokens_per_s": info.tokens / max(timings.get("timing_s/rollout", 0.0), 1e-9),
            "perf/samples_per_s": info.rows / max(timings["timing_s/step"], 1e-9),
            "train/nonfinite_steps_total": float(totals["nonfinite_steps"]),
            "data/prompts_dropped": float(files.prompts.dropped),
            "async/staleness_mean": sum(d * c for d, c in stale.items()) / rows_learned if rows_learned else 0.0,
            "async/staleness_max": float(max(stale, default=0)),
            "async/offpolicy_row_frac": sum(c for d, c in stale.items() if d > 0) / rows_learned if rows_learned else 0.0,
            "driver/fetched_bytes": float(traffic.fetched_bytes), "driver/put_bytes": float(traffic.put_bytes),
        })
        metrics["reward/timeouts_total"] = float(ray.get(stages.reward.verifier_stats.remote())["timeouts"])
        metrics.update(buffer.stats())
        metrics.update(colo.metrics())
        tracker.log(metrics, step=step + 1)
        tracker.print_step(step + 1, total, metrics)

        if cfg.eval.every and (step + 1) % cfg.eval.every == 0 and step + 1 < total:
            if pending_sync is not None:
                pending_sync()
                pending_sync = None
            colo.to_engines()
            tracker.log({**eval_metrics(run_evals(pool, verifier, files.eval_sets, files.tokenizer, cfg), cfg.eval.k),
                         **key_lift()}, step=step + 1)
        if cfg.trainer.save_every and (step + 1) % cfg.trainer.save_every == 0:
            save(step + 1)
        step += 1
    train_loop_s = time.perf_counter() - t_loop
    producer.stop()
    if pending_sync is not None:
        pending_sync()
    ray.get(pending_teacher_sync)

    final_step = step
    eval_after = None
    if cfg.eval.after:
        colo.to_engines()
        eval_after = run_evals(pool, verifier, files.eval_sets, files.tokenizer, cfg)
        tracker.log({**eval_metrics(eval_after, cfg.eval.k), **key_lift()}, step=final_step)
        print(f"eval after: in-distribution {eval_after['id_accuracy']} | OOD {eval_after['ood_accuracy']}", flush=True)
    if cfg.trainer.save_final and final_step > 0:
        save(final_step)  # (hands the accelerators to the learners)
        learners.export_hf(str(run_dir / "final_model"))
        summary["final_model"] = str((run_dir / "final_model").resolve())

    teacher_stats = ray.get(stages.teacher.stats.remote()) if stages.teacher is not None else None
    annotate_counts = ray.get(stages.annotate.annotate_counts.remote()) if stages.annotate is not None else {}
    summary["data"]["train_prompts_dropped"] = files.prompts.dropped
    summary.update({"eval_before": eval_before, "eval_after": eval_after, "steps": final_step,
                    "totals": totals, "verifier": ray.get(stages.reward.verifier_stats.remote()),
                    "exposure": exposure.metrics(), "teacher": teacher_stats, "annotate": annotate_counts,
                    "placement": svc.placement.plan.describe(), "max_staleness": k,
                    "train_loop_s": train_loop_s, "pipeline": timeline.summary(train_loop_s),
                    "buffer": buffer.stats(), "wall_time_s": time.perf_counter() - t_job,
                    "colocation_events": list(colo.events)})
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
    print(f"summary: {run_dir / 'summary.json'}", flush=True)
    return summary


def _stage_metrics(stage_stats: dict[str, list], info: Any) -> dict[str, float]:
    """Per-step annotate / teacher metrics from the stages' per-chunk counters."""
    out: dict[str, float] = {}
    ann = stage_stats.get("annotate") or []
    if ann:
        n_tok, n_rows = max(info.tokens, 1), max(info.rows, 1)
        sums: dict[str, float] = {}
        for s in ann:
            for k_, v in s.items():
                if k_.startswith("annotate/"):
                    sums[k_] = sums.get(k_, 0.0) + float(v)
        out["annotate/key_token_frac"] = sums.pop("annotate/key_tokens", 0.0) / n_tok
        out["annotate/error_token_frac"] = sums.pop("annotate/error_tokens", 0.0) / n_tok
        out["annotate/annotated_frac"] = sums.pop("annotate/annotated_rows", 0.0) / n_rows
        out.update(sums)
        # LLM annotators' cumulative counters (cum:annotate/...): the latest snapshot
        out.update({k_[4:]: float(v) for k_, v in ann[-1].items() if k_.startswith("cum:")})
    tea = stage_stats.get("teacher") or []
    if tea:
        rows = sum(s["teacher/scored_rows"] for s in tea)
        out["teacher/prompt_len"] = sum(s["teacher/prompt_tokens"] for s in tea) / max(rows, 1.0)
        out.update({k_[4:]: float(v) for k_, v in tea[-1].items() if k_.startswith("cum:")})
    return out


def _tuple_state(s):
    """json turns random.getstate()'s tuples into lists; turn them back."""
    return tuple(_tuple_state(x) if isinstance(x, list) else x for x in s)


# ---------------------------------------------------------------------------------------------
def main() -> None:
    if wants_help():
        from trace_rl.config import help_text

        print(help_text())
        print("Hydra: --cfg job prints the composed config, -m runs a sweep (e.g. -m algorithm.lr=1e-5,3e-5).")
        return
    hydra_main(run)


if __name__ == "__main__":
    main()
