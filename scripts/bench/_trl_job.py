"""One TRL GRPOTrainer job for scripts/bench/trl_vs_trace_rl.py (run by the TRL venv's python).

    <trl-venv>/bin/python scripts/bench/_trl_job.py <job.json> <result.json>

job.json (written by the driver): model_path, prompts ([{prompt, answer, ids}], already in trace_rl's
sampling order, steps * prompts_per_step of them), prompts_per_step, samples, max_tokens, steps,
micro_batch, work_dir. The result JSON holds TRL's effective settings, the timed training loop
(first optimizer step's start to last step's end, from a TrainerCallback), samples and completion
tokens, per-step times and TRL's own logged metrics.

The reward is trace_rl.rewards.math_reward.math_verify_score (last \\boxed{} of the response vs the gold
answer with math-verify), imported from this checkout (that package needs only the standard library and
math-verify, both in the TRL venv).
"""
from __future__ import annotations

import json
import os
import sys
import time

T_PROCESS = time.perf_counter()

# ---------------------------------------------------------------------------------------------
# reward: trace_rl's own (boxed-answer extraction + math-verify). trace_rl is not installed in the TRL venv,
# but trace_rl.rewards imports only the standard library and math-verify, so the checkout's copy is used.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
from trace_rl.rewards.math_reward import math_verify_score  # noqa: E402


# ---------------------------------------------------------------------------------------------
def main() -> None:
    job_path, out_path = sys.argv[1], sys.argv[2]
    job = json.loads(open(job_path).read())
    P, N, T, steps = int(job["prompts_per_step"]), int(job["samples"]), int(job["max_tokens"]), int(job["steps"])
    mb = int(job["micro_batch"])
    batch = P * N
    if batch % mb:
        raise SystemExit(f"micro batch {mb} does not divide the step batch {batch}")

    import torch
    import transformers
    import trl
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    t_imports = time.perf_counter() - T_PROCESS
    counters = {"reward_calls": 0, "completions": 0, "completion_tokens": 0, "reward_sum": 0.0,
                "tokens_per_call": []}

    def boxed_math_reward(prompts, completions, completion_ids, answer, **kwargs):
        counters["reward_calls"] += 1
        counters["completions"] += len(completions)
        ntok = sum(len(ids) for ids in completion_ids)
        counters["completion_tokens"] += ntok
        counters["tokens_per_call"].append(ntok)
        scores = [math_verify_score(c, a) for c, a in zip(completions, answer)]
        counters["reward_sum"] += sum(scores)
        return scores

    class StepTimer(TrainerCallback):
        def __init__(self):
            self.begin, self.end, self.logs = [], [], []

        def on_step_begin(self, args, state, control, **kw):
            self.begin.append(time.perf_counter())

        def on_step_end(self, args, state, control, **kw):
            self.end.append(time.perf_counter())

        def on_log(self, args, state, control, logs=None, **kw):
            if logs:
                self.logs.append({"step": state.global_step, **{k: v for k, v in logs.items()
                                                                  if isinstance(v, (int, float))}})

    rows = job["prompts"]
    if len(rows) < steps * P:
        raise SystemExit(f"need {steps * P} prompts, got {len(rows)}")
    rows = rows[:steps * P]
    dataset = Dataset.from_dict({"prompt": [r["prompt"] for r in rows], "answer": [r["answer"] for r in rows]})

    on_gpu = torch.cuda.is_available()
    config = GRPOConfig(
        output_dir=os.path.join(job["work_dir"], "trl_out"),
        # ---- matched to trace_rl
        loss_type="dapo",            # token-level: sum over tokens / active tokens of the whole accumulated batch
        beta=0.0,                    # no KL term, no reference model
        epsilon=0.2, epsilon_high=0.2,
        temperature=1.0,
        learning_rate=1e-6,
        gradient_checkpointing=False,
        bf16=False, fp16=False,      # fp32
        use_cpu=not on_gpu,
        model_init_kwargs={"dtype": "float32"},
        num_generations=N,
        per_device_train_batch_size=mb,
        gradient_accumulation_steps=batch // mb,   # one optimizer step = P*N completions
        # steps_per_generation defaults to gradient_accumulation_steps -> generation_batch_size = P*N:
        num_iterations=1,            # one generation per optimizer step, used once (on-policy)
        max_completion_length=T,
        max_steps=steps,
        shuffle_dataset=False,       # the dataset is already in trace_rl's prompt order
        # ---- no evaluation, saving or external logging
        eval_strategy="no",
        save_strategy="no",
        report_to="none",
        logging_steps=1,             # in-process metrics only (captured by the callback below)
        disable_tqdm=True,
    )

    trainer = GRPOTrainer(model=job["model_path"], reward_funcs=boxed_math_reward, args=config,
                          train_dataset=dataset)
    timer = StepTimer()
    trainer.add_callback(timer)

    # the prompt token ids TRL builds from the plain-text prompts, compared with trace_rl's
    first = [r["prompt"] for r in rows[:P]]
    trl_ids = trainer._tokenize_prompts(first)[0]
    trl_ids = [list(map(int, ids)) for ids in trl_ids]
    ids_match = all(a == list(r["ids"]) for a, r in zip(trl_ids, rows[:P]))

    a = trainer.args
    effective = {
        "trl_version": trl.__version__, "transformers_version": transformers.__version__,
        "torch_version": torch.__version__, "torch_threads": torch.get_num_threads(),
        "loss_type": a.loss_type, "beta": a.beta, "epsilon": a.epsilon, "epsilon_high": a.epsilon_high,
        "temperature": a.temperature, "top_p": a.top_p, "top_k": a.top_k, "learning_rate": a.learning_rate,
        "lr_scheduler_type": str(a.lr_scheduler_type), "max_grad_norm": a.max_grad_norm,
        "gradient_checkpointing": a.gradient_checkpointing, "bf16": a.bf16, "fp16": a.fp16,
        "use_cpu": a.use_cpu, "device": str(a.device),
        "model_dtype": str(next(trainer.model.parameters()).dtype),
        "num_generations": a.num_generations, "per_device_train_batch_size": a.per_device_train_batch_size,
        "gradient_accumulation_steps": a.gradient_accumulation_steps,
        "steps_per_generation": a.steps_per_generation, "generation_batch_size": a.generation_batch_size,
        "num_iterations": a.num_iterations, "max_completion_length": a.max_completion_length,
        "max_steps": a.max_steps, "shuffle_dataset": a.shuffle_dataset, "scale_rewards": a.scale_rewards,
        "mask_truncated_completions": a.mask_truncated_completions, "use_vllm": a.use_vllm,
        "eval_strategy": str(a.eval_strategy), "save_strategy": str(a.save_strategy), "report_to": a.report_to,
        "ref_model_loaded": trainer.ref_model is not None,
        "eos_token_ids": list(trainer.eos_token_ids),
        "prompt_ids_match_trace_rl": ids_match,
    }
    print("TRL effective config: " + json.dumps(effective), flush=True)

    t_setup = time.perf_counter() - T_PROCESS
    t0 = time.perf_counter()
    trainer.train()
    t_train_call = time.perf_counter() - t0

    if not timer.begin or not timer.end:
        raise SystemExit("the TrainerCallback saw no step")
    loop_s = timer.end[-1] - timer.begin[0]
    result = {
        "framework": "trl", "ok": True, "effective_config": effective,
        "steps_done": len(timer.end), "prompts_per_step": P, "samples_per_prompt": N, "max_tokens": T,
        "samples": counters["completions"], "completion_tokens": counters["completion_tokens"],
        "reward_calls": counters["reward_calls"], "tokens_per_step": counters["tokens_per_call"],
        "reward_mean": counters["reward_sum"] / max(counters["completions"], 1),
        "train_loop_s": loop_s,
        "step_s": [e - b for b, e in zip(timer.begin, timer.end)],
        "train_call_s": t_train_call, "imports_s": t_imports, "setup_s": t_setup,
        "process_s_inside": time.perf_counter() - T_PROCESS,
        "trl_logs": timer.logs,
    }
    with open(out_path, "w") as f:
        json.dump(result, f, indent=2)
    print(f"TRL job done: {len(timer.end)} steps, {counters['completions']} samples, "
          f"{counters['completion_tokens']} completion tokens, loop {loop_s:.2f} s", flush=True)


if __name__ == "__main__":
    main()
