"""Placement: where every actor of a run goes, as Ray placement groups and bundle assignments.

A :class:`PlacementPlan` is pure data computed from the configuration (no Ray needed, so it is
unit-tested and validated before anything starts); a :class:`Placement` reserves the plan's
placement groups on a live cluster and hands each actor the ``.options(...)`` that pin it to its
bundle. Roles: ``rollout`` engines, ``learner`` ranks, ``teacher`` actors, ``annotator`` actors.

Two modes (``cluster.placement``):

* ``disaggregated``: every role has its own placement group, hence its own accelerators. A rollout
  engine's bundle holds ``tensor_parallel_size x gpus_per_engine`` accelerators (the engine actor
  takes all of them; vLLM runs its tensor-parallel workers on the devices the actor sees).
* ``colocated``: rollout engines and learner ranks share one placement group of one bundle per
  learner rank, each holding one accelerator; rank r takes ``gpus_per_rank`` of bundle r, engine e
  takes ``gpus_per_engine`` of bundle ``e * tp`` and its tensor-parallel shards live on bundles
  ``e * tp .. (e + 1) * tp - 1`` (so ``num_engines * tp`` must equal ``num_ranks``). Both fractions
  of one accelerator must sum to at most 1. Only one side is resident at a time: the
  :class:`ColocationProtocol` puts vLLM to sleep while the learners train and offloads the DeepSpeed
  state while the engines generate. Teacher and annotator actors keep their own groups.

The accelerator is the Ray resource ``cluster.accelerator`` (``GPU``, or a custom resource that
stands for one in a simulated cluster: actors then see no device through it and run on CPU).
"""
from __future__ import annotations

import dataclasses
import logging
import os
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

log = logging.getLogger(__name__)

__all__ = ["MODES", "STRATEGIES", "ROLES", "RoleSpec", "Slot", "GroupSpec", "PlacementPlan", "PlacementError",
           "plan_placement", "plan_from_config", "check_config", "declared_nodes", "Placement",
           "ColocationProtocol", "learner_cfg_for_placement"]

MODES = ("disaggregated", "colocated")
STRATEGIES = ("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD")
ROLES = ("rollout", "learner", "teacher", "annotator")
SHARED = "shared"  # the group name of the colocated rollout + learner bundles


class PlacementError(RuntimeError):
    """The cluster cannot hold the plan (or did not provide it in time); the message names the fix."""


@dataclass(frozen=True)
class RoleSpec:
    """What one role asks for: ``count`` actors of ``cpus`` CPUs and ``accelerators`` accelerators each."""
    count: int
    cpus: float = 1.0
    accelerators: float = 0.0
    strategy: str = "PACK"
    tensor_parallel_size: int = 1
    """rollout only: accelerator shards per engine."""


@dataclass(frozen=True)
class Slot:
    """Where one actor goes: bundle ``bundle`` of group ``group``, asking for ``cpus`` / ``accelerators``."""
    role: str
    index: int
    group: str
    bundle: int
    cpus: float
    accelerators: float
    shard_bundles: tuple[int, ...] = ()
    """A colocated tensor-parallel engine: the bundles (of ``group``) holding its shards."""


@dataclass(frozen=True)
class GroupSpec:
    """One placement group: its bundles (resource dicts) and strategy."""
    name: str
    bundles: tuple[dict, ...]
    strategy: str


@dataclass
class PlacementPlan:
    mode: str
    accelerator: str
    groups: dict[str, GroupSpec] = field(default_factory=dict)
    slots: dict[str, list[Slot]] = field(default_factory=dict)

    def totals(self) -> dict[str, float]:
        """Resources reserved by all groups together."""
        out: dict[str, float] = {}
        for g in self.groups.values():
            for b in g.bundles:
                for k, v in b.items():
                    out[k] = out.get(k, 0.0) + v
        return out

    def role_slots(self, role: str) -> list[Slot]:
        return list(self.slots.get(role, []))

    def fit_problems(self, nodes: list[dict[str, float]], resources: Iterable[str] | None = None) -> list[str]:
        """Reasons the plan certainly cannot fit ``nodes`` (each a dict of total resources); [] if it may.

        Only necessary conditions are checked (no false alarms): every bundle fits some node, a
        STRICT_PACK group fits one node, a STRICT_SPREAD group has enough distinct nodes, and the
        totals fit. ``resources`` limits the check to these names (default: CPU and the accelerator).
        """
        names = tuple(resources) if resources is not None else ("CPU", self.accelerator)
        nodes = [{k: float(n.get(k, 0.0)) for k in names} for n in nodes]
        if not nodes:
            return []

        def fits(need: dict, have: dict) -> bool:
            return all(need.get(k, 0.0) <= have[k] + 1e-9 for k in names)

        problems = []
        for g in self.groups.values():
            for i, b in enumerate(g.bundles):
                if not any(fits(b, n) for n in nodes):
                    problems.append(f"bundle {i} of the {g.name} group needs {_fmt(b)}, more than any node has "
                                    f"(nodes: {', '.join(_fmt(n) for n in nodes)})")
                    break
            if g.strategy == "STRICT_PACK":
                need = _sum(g.bundles)
                if not any(fits(need, n) for n in nodes):
                    problems.append(f"the {g.name} group is STRICT_PACK and needs {_fmt(need)} on one node; no "
                                    f"node has that much")
            if g.strategy == "STRICT_SPREAD":
                smallest = min(g.bundles, key=lambda b: sum(b.values()))
                room = sum(fits(smallest, n) for n in nodes)
                if room < len(g.bundles):
                    problems.append(f"the {g.name} group is STRICT_SPREAD over {len(g.bundles)} bundles but only "
                                    f"{room} node(s) can hold one")
        have, need = _sum(nodes), self.totals()
        for k in names:
            if need.get(k, 0.0) > have[k] + 1e-9:
                problems.append(f"the plan reserves {need[k]:g} {k} in all, the cluster has {have[k]:g}")
        return problems

    def describe(self) -> str:
        """One line per group: its bundles and which actors sit on each."""
        lines = [f"placement {self.mode} (accelerator resource {self.accelerator!r}):"]
        for g in self.groups.values():
            lines.append(f"  group {g.name} [{g.strategy}]")
            for i, b in enumerate(g.bundles):
                who = [f"{s.role}[{s.index}]" for r in ROLES for s in self.slots.get(r, [])
                       if s.group == g.name and (s.bundle == i or i in s.shard_bundles)]
                lines.append(f"    bundle {i}: {_fmt(b)} <- {', '.join(who) or '-'}")
        return "\n".join(lines)


# --------------------------------------------------------------------------------------------- planning
def _bundle(cpus: float, acc: float, accelerator: str) -> dict[str, float]:
    b = {"CPU": float(cpus)} if cpus > 0 else {}
    if acc > 0:
        b[accelerator] = float(acc)
    return b


def plan_placement(*, mode: str = "disaggregated", accelerator: str = "GPU", rollout: RoleSpec | None = None,
                   learner: RoleSpec | None = None, teacher: RoleSpec | None = None,
                   annotator: RoleSpec | None = None) -> PlacementPlan:
    """The plan for the given roles (a role that is None or has count 0 gets no group).

    Raises ValueError for a combination that has no plan (see :func:`check_config` for the
    config-level messages): an unknown mode, or colocated roles that do not pair up.
    """
    if mode not in MODES:
        raise ValueError(f"cluster.placement={mode!r} is unknown; use one of {', '.join(MODES)}")
    for name, spec in (("rollout", rollout), ("learner", learner), ("teacher", teacher), ("annotator", annotator)):
        if spec is not None and spec.strategy not in STRATEGIES:
            raise ValueError(f"{name} placement strategy {spec.strategy!r}; use one of {', '.join(STRATEGIES)}")
    plan = PlacementPlan(mode=mode, accelerator=accelerator)

    def separate(role: str, spec: RoleSpec | None, acc_per_actor: float) -> None:
        if spec is None or spec.count < 1:
            return
        b = _bundle(spec.cpus, acc_per_actor, accelerator)
        if not b:
            raise ValueError(f"{role} actors ask for no CPU and no accelerator; reserve at least one CPU")
        plan.groups[role] = GroupSpec(role, tuple(dict(b) for _ in range(spec.count)), spec.strategy)
        plan.slots[role] = [Slot(role, i, role, i, float(spec.cpus), float(acc_per_actor)) for i in range(spec.count)]

    if mode == "disaggregated" or rollout is None or learner is None or rollout.count < 1 or learner.count < 1:
        if rollout is not None:
            separate("rollout", rollout, rollout.accelerators * max(rollout.tensor_parallel_size, 1))
        separate("learner", learner, learner.accelerators if learner else 0.0)
    else:
        tp = max(int(rollout.tensor_parallel_size), 1)
        if rollout.count * tp != learner.count:
            raise ValueError(f"colocated placement pairs every learner rank with one engine shard: "
                             f"rollout.num_engines x tensor_parallel_size = {rollout.count} x {tp} must equal "
                             f"learner.num_ranks = {learner.count}")
        if rollout.accelerators + learner.accelerators > 1 + 1e-9:
            raise ValueError(f"colocated roles share one accelerator per bundle: rollout.gpus_per_engine "
                             f"({rollout.accelerators:g}) + learner.gpus_per_rank ({learner.accelerators:g}) > 1")
        shared_acc = 1.0 if (rollout.accelerators > 0 or learner.accelerators > 0) else 0.0
        bundles, learner_slots, rollout_slots = [], [], []
        for r in range(learner.count):
            hosts_engine = r % tp == 0
            cpus = learner.cpus + (rollout.cpus if hosts_engine else 0.0)
            bundles.append(_bundle(cpus, shared_acc, accelerator))
            learner_slots.append(Slot("learner", r, SHARED, r, float(learner.cpus), float(learner.accelerators)))
        for e in range(rollout.count):
            shards = tuple(range(e * tp, (e + 1) * tp))
            rollout_slots.append(Slot("rollout", e, SHARED, e * tp, float(rollout.cpus), float(rollout.accelerators),
                                      shard_bundles=shards if tp > 1 else ()))
        plan.groups[SHARED] = GroupSpec(SHARED, tuple(bundles), learner.strategy)
        plan.slots["learner"], plan.slots["rollout"] = learner_slots, rollout_slots
    separate("teacher", teacher, teacher.accelerators if teacher else 0.0)
    separate("annotator", annotator, annotator.accelerators if annotator else 0.0)
    return plan


def plan_from_config(cfg: Any, *, teacher: bool, annotator: bool) -> PlacementPlan:
    """The plan of a :class:`~trace_rl.config.Config`. ``teacher`` / ``annotator``: whether those
    services run as actors with their own resources; the start-up decides that once, from the method's
    declared needs (``trace_rl.startup.decide_services``), and passes it here."""
    c, r, lc, tc, an = cfg.cluster, cfg.rollout, cfg.learner, cfg.teacher, cfg.annotator
    return plan_placement(
        mode=c.placement, accelerator=c.accelerator,
        rollout=RoleSpec(int(r.num_engines), r.cpus_per_engine, r.gpus_per_engine, c.rollout_strategy,
                         int(r.tensor_parallel_size)),
        learner=RoleSpec(int(lc.num_ranks), lc.cpus_per_rank, lc.gpus_per_rank, c.placement_strategy),
        teacher=(RoleSpec(int(tc.num_actors), tc.cpus_per_actor, tc.gpus_per_actor, c.teacher_strategy)
                 if teacher else None),
        annotator=(RoleSpec(int(an.num_actors), an.cpus_per_actor, an.gpus_per_actor, c.annotator_strategy)
                   if annotator else None),
    )


def declared_nodes(cfg: Any) -> tuple[list[dict[str, float]], tuple[str, ...]]:
    """The cluster's nodes as far as the configuration declares them, and which resource names are
    known: ``cluster.nodes`` if given; else, for a local cluster, one node of ``num_cpus`` CPUs (and
    ``num_gpus`` GPUs when given); else (joining a cluster) nothing."""
    c = cfg.cluster
    acc = c.accelerator
    if c.nodes:
        return [{k: float(v) for k, v in dict(n).items()} for n in c.nodes], ("CPU", acc)
    if c.address or os.environ.get("RAY_ADDRESS"):
        return [], ()
    node = {"CPU": float(c.num_cpus if c.num_cpus is not None else max(8, os.cpu_count() or 1))}
    names: tuple[str, ...] = ("CPU",)
    if acc == "GPU" and c.num_gpus is not None:
        node["GPU"], names = float(c.num_gpus), ("CPU", "GPU")
    return [node], names


def check_config(cfg: Any, err: Callable[[str, str, str], None], *, teacher: bool, annotator: bool) -> None:
    """Placement checks of ``validate()``: mode and strategies, tensor parallelism, colocation
    pairing, and whether the plan (with the ``teacher`` / ``annotator`` services the start-up decided)
    can fit the cluster's declared resources."""
    c, r, lc = cfg.cluster, cfg.rollout, cfg.learner
    ok = True
    if c.placement_strategy not in STRATEGIES:
        err("cluster.placement_strategy", f"unknown value {c.placement_strategy!r}",
            f"use one of {', '.join(STRATEGIES)}")
        ok = False
    if c.placement not in MODES:
        err("cluster.placement", f"unknown value {c.placement!r}", f"use one of {', '.join(MODES)}")
        ok = False
    for name in ("rollout_strategy", "teacher_strategy", "annotator_strategy"):
        if getattr(c, name) not in STRATEGIES:
            err(f"cluster.{name}", f"unknown value {getattr(c, name)!r}", f"use one of {', '.join(STRATEGIES)}")
            ok = False
    if not c.accelerator or c.accelerator == "CPU":
        err("cluster.accelerator", f"{c.accelerator!r} cannot stand for an accelerator",
            "use GPU, or a custom resource name of a simulated cluster (e.g. fake_gpu)")
        ok = False
    for i, node in enumerate(c.nodes or []):
        bad = {k: v for k, v in dict(node).items() if not isinstance(v, (int, float)) or v < 0}
        if bad:
            err(f"cluster.nodes[{i}]", f"resources {bad} are not non-negative numbers",
                "declare each node as {CPU: 32, GPU: 8}")
            ok = False
    tp = int(r.tensor_parallel_size)
    if tp < 1:
        err("rollout.tensor_parallel_size", f"{tp} < 1", "use 1 (no tensor parallelism) or more")
        ok = False
    colocated = c.placement == "colocated"
    if tp > 1 and not colocated and 0 < r.gpus_per_engine < 1:
        err("rollout.gpus_per_engine", f"{r.gpus_per_engine:g}: a tensor-parallel shard needs whole accelerators",
            f"use rollout.gpus_per_engine=1 (each engine then reserves {tp} accelerators)")
        ok = False
    if colocated:
        if cfg.trainer.max_staleness > 0:
            err("trainer.max_staleness", f"{cfg.trainer.max_staleness}: colocated engines and learners take turns "
                "on the same accelerators, so rollout cannot run ahead of learning",
                "use trainer.max_staleness=0 with cluster.placement=colocated, or cluster.placement=disaggregated")
        if r.num_engines * max(tp, 1) != lc.num_ranks:
            err("cluster.placement", f"colocated pairs each learner rank with one engine shard, but "
                f"rollout.num_engines x rollout.tensor_parallel_size = {r.num_engines} x {tp} accelerators "
                f"!= learner.num_ranks = {lc.num_ranks}",
                "set learner.num_ranks = rollout.num_engines x tensor_parallel_size, "
                "or cluster.placement=disaggregated")
            ok = False
        if (r.gpus_per_engine > 0) != (lc.gpus_per_rank > 0):
            err("cluster.placement", f"colocated roles share the accelerators, but rollout.gpus_per_engine="
                f"{r.gpus_per_engine:g} and learner.gpus_per_rank={lc.gpus_per_rank:g}",
                "give both a share of one accelerator (e.g. 0.5 and 0.5), or both 0 on CPU machines")
            ok = False
        elif r.gpus_per_engine + lc.gpus_per_rank > 1 + 1e-9:
            err("cluster.placement", f"rollout.gpus_per_engine + learner.gpus_per_rank = "
                f"{r.gpus_per_engine + lc.gpus_per_rank:g} > 1 accelerator",
                "use shares of one accelerator that sum to at most 1 (e.g. 0.5 and 0.5)")
            ok = False
    if not ok or r.num_engines < 1 or lc.num_ranks < 1:
        return
    try:
        plan = plan_from_config(cfg, teacher=teacher, annotator=annotator)
    except ValueError as e:
        err("cluster.placement", str(e), "fix the fields named in the message")
        return
    nodes, names = declared_nodes(cfg)
    for problem in plan.fit_problems(nodes, names) if names else []:
        err("cluster", f"the placement plan cannot fit the declared cluster: {problem}",
            "lower the actors' cpus_*/gpus_* or counts, change the strategies, or declare more nodes "
            "(cluster.num_cpus / num_gpus / nodes)")


# --------------------------------------------------------------------------------------------- on Ray
def _options(slot: Slot, pg: Any, accelerator: str, bundle: int | None = None) -> dict[str, Any]:
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    opts: dict[str, Any] = {
        "num_cpus": slot.cpus,
        "scheduling_strategy": PlacementGroupSchedulingStrategy(
            placement_group=pg, placement_group_bundle_index=slot.bundle if bundle is None else bundle),
    }
    if accelerator == "GPU":
        opts["num_gpus"] = slot.accelerators
    else:
        opts["num_gpus"] = 0
        if slot.accelerators > 0:
            opts["resources"] = {accelerator: slot.accelerators}
    return opts


class Placement:
    """A plan reserved on the live cluster: one Ray placement group per plan group.

    ``Placement(plan, timeout_s)`` checks the plan against the cluster's nodes (a certain misfit
    raises at once), creates the groups and waits until all are ready (or raises naming the
    resources). :meth:`options` gives the ``ActorClass.options(...)`` of one actor. Call
    :meth:`remove` (or use it as a context manager) to release the groups.
    """

    def __init__(self, plan: PlacementPlan, timeout_s: float = 120.0, *, name: str | None = None):
        import ray
        from ray.util.placement_group import placement_group

        if not ray.is_initialized():
            raise RuntimeError("Ray is not initialised: call trace_rl.cluster.init_ray() before reserving a Placement")
        self.plan = plan
        self.pgs: dict[str, Any] = {}
        nodes = [n["Resources"] for n in ray.nodes() if n.get("Alive")]
        problems = plan.fit_problems(nodes)
        if problems:
            raise PlacementError("the placement plan cannot fit this cluster: " + "; ".join(problems) +
                                 f". Plan:\n{plan.describe()}\nFix: lower the actors' cpus/gpus or counts, "
                                 "or add nodes")
        prefix = name or f"trace_rl_{os.getpid()}_{id(self):x}"
        t0 = time.perf_counter()
        try:
            for gname, g in plan.groups.items():
                self.pgs[gname] = placement_group([dict(b) for b in g.bundles], strategy=g.strategy,
                                                  name=f"{prefix}_{gname}")
            for gname, pg in self.pgs.items():
                left = max(timeout_s - (time.perf_counter() - t0), 0.1)
                try:
                    ray.get(pg.ready(), timeout=left)
                except ray.exceptions.GetTimeoutError:
                    raise PlacementError(
                        f"placement group {gname!r} ({len(plan.groups[gname].bundles)} bundles of "
                        f"{_fmt(plan.groups[gname].bundles[0])}, {plan.groups[gname].strategy}) was not ready after "
                        f"{timeout_s:g} s; the cluster has {_fmt(ray.cluster_resources())}, free "
                        f"{_fmt(ray.available_resources())}. Fix: free resources, lower the counts, or add nodes "
                        f"(cluster.placement_timeout_s sets the wait)") from None
        except BaseException:
            self.remove()
            raise
        self.ready_s = time.perf_counter() - t0
        log.info("%s\nreserved in %.1f s", plan.describe(), self.ready_s)

    @property
    def mode(self) -> str:
        return self.plan.mode

    @property
    def colocated(self) -> bool:
        return self.plan.mode == "colocated"

    def count(self, role: str) -> int:
        return len(self.plan.slots.get(role, []))

    def slot(self, role: str, index: int) -> Slot:
        slots = self.plan.slots.get(role, [])
        if not 0 <= index < len(slots):
            raise PlacementError(f"the plan has {len(slots)} {role} slot(s); actor {index} has none. Fix: build the "
                                 f"plan with the same counts as the service (plan_from_config(cfg))")
        return slots[index]

    def options(self, role: str, index: int) -> dict[str, Any]:
        """``ActorClass.options(**...)`` for actor ``index`` of ``role``: num_cpus, the accelerator and
        a PlacementGroupSchedulingStrategy on its bundle."""
        s = self.slot(role, index)
        return _options(s, self.pgs[s.group], self.plan.accelerator)

    def any_bundle_options(self, role: str) -> dict[str, Any]:
        """Like :meth:`options` but on any free bundle of the role's group (for actors started again
        after a failure, which do not know their index)."""
        s = self.slot(role, 0)
        return _options(s, self.pgs[s.group], self.plan.accelerator, bundle=-1)

    def bundle_nodes(self) -> dict[str, list[str]]:
        """Node id of every bundle, per group (from Ray's placement group table)."""
        from ray.util.placement_group import placement_group_table

        out = {}
        for gname, pg in self.pgs.items():
            table = placement_group_table(pg)
            mapping = table.get("bundles_to_node_id", {})
            out[gname] = [mapping.get(i) for i in range(len(self.plan.groups[gname].bundles))]
        return out

    def remove(self) -> None:
        """Release every placement group (idempotent)."""
        from ray.util.placement_group import remove_placement_group

        for pg in self.pgs.values():
            try:
                remove_placement_group(pg)
            except Exception:  # already gone
                pass
        self.pgs = {}

    def __enter__(self) -> "Placement":
        return self

    def __exit__(self, *exc) -> None:
        self.remove()


def learner_cfg_for_placement(learner_cfg: Any, placement: Placement | None) -> Any:
    """The learner config the ranks should see. With a simulated accelerator (a custom resource, not
    ``GPU``) the ranks hold no device, so they run as CPU ranks (``gpus_per_rank = 0``)."""
    if placement is None or placement.plan.accelerator == "GPU" or not learner_cfg.gpus_per_rank:
        return learner_cfg
    if dataclasses.is_dataclass(learner_cfg):
        return dataclasses.replace(learner_cfg, gpus_per_rank=0.0)
    import copy

    out = copy.copy(learner_cfg)
    out.gpus_per_rank = 0.0
    return out


# --------------------------------------------------------------------------------------------- colocation
class ColocationLog:
    """Mixed into the engines and learner workers: records each sleep / wake / offload / reload call
    (the hooks are no-ops on CPU, but the protocol they follow is still observable)."""

    def _colocation_event(self, event: str, acted: bool) -> dict[str, Any]:
        entries = self.__dict__.setdefault("_colocation_entries", [])
        entries.append((event, time.time()))
        return {"event": event, "acted": acted, "count": sum(e == event for e, _ in entries)}

    def colocation_log(self) -> list[tuple[str, float]]:
        """``(event, wall time)`` of every colocation call on this actor, in order."""
        return list(self.__dict__.get("_colocation_entries", []))


def wake_event(tags: list[str] | None) -> str:
    """An engine's wake-up event name: ``wake`` (everything) or ``wake_<tag>`` (``wake_weights``,
    ``wake_kv_cache``); vLLM's tags only."""
    for tag in tags or ():
        if tag not in ("weights", "kv_cache"):
            raise ValueError(f"wake_up tag {tag!r}: use 'weights' or 'kv_cache'")
    return "wake" if not tags else "wake_" + "_".join(tags)


class ColocationProtocol:
    """The driver's side of colocation: who holds the shared accelerators when, in the order the peers use.

    Start-up: the engines are built first and put to sleep (:meth:`sleep_engines`, vLLM level 1: weights to
    CPU, KV cache released) before the learners are built on the same accelerators; the protocol then
    starts with the engines asleep and the learners resident (``engines_asleep=True``). Per step:

    - :meth:`to_engines` before generating: learners offload, engines wake (whatever part still sleeps);
    - :meth:`to_learners` after generating: engines sleep, learners reload;
    - :meth:`before_sync` after learning: the engines take back their **weights only** (``wake_up(tags=
      ["weights"])``; the KV cache stays released) while the learners stay resident, so the sync reads the
      learners' resident weights and writes, bucket by bucket, into the engines' resident ones;
    - :meth:`after_sync` once the sync has finished: learners offload, the engines' KV cache wakes.

    Each hook acts only when the state changes, so the driver may call them freely (``to_engines`` after
    ``after_sync`` does nothing). With ``enabled=False`` (disaggregated) every call does nothing. The engine
    and worker hooks are no-ops on CPU but still run and count themselves, so ``events`` (the driver's
    sequence) and the actors' own counters show the protocol was followed.
    """

    def __init__(self, pool: Any, learners: Any, *, enabled: bool = True, timeout_s: float = 600.0,
                 engines_asleep: bool = False):
        self.pool, self.learners, self.enabled, self.timeout_s = pool, learners, bool(enabled), timeout_s
        self.events: list[str] = ["sleep"] if engines_asleep else []
        self.seconds: dict[str, float] = {}
        self.engines = "asleep" if engines_asleep else "awake"  # asleep | weights (KV cache released) | awake
        self.learners_resident = True

    @staticmethod
    def sleep_engines(pool: Any, timeout_s: float = 600.0) -> float:
        """Put freshly built engines to sleep before the learners are built beside them (vLLM allocates
        ``gpu_memory_utilization`` of the device when it builds). Returns the seconds it took."""
        import ray

        t0 = time.perf_counter()
        ray.get([a.sleep.remote(1) for a in pool.actors], timeout=timeout_s)
        return time.perf_counter() - t0

    @property
    def engines_awake(self) -> bool:
        return self.engines == "awake"

    def _call(self, event: str, actors: list, method: str, *args) -> None:
        import ray

        t0 = time.perf_counter()
        ray.get([getattr(a, method).remote(*args) for a in actors], timeout=self.timeout_s)
        self.events.append(event)
        self.seconds[event] = self.seconds.get(event, 0.0) + time.perf_counter() - t0

    def start(self) -> None:
        """After start-up: the accelerators go to the engines (they generate first)."""
        self.to_engines()

    def before_generate(self) -> None:
        if not self.enabled:
            return
        if self.engines == "asleep":
            self._call("wake", self.pool.actors, "wake_up")
        elif self.engines == "weights":
            self._call("wake_kv_cache", self.pool.actors, "wake_up", ["kv_cache"])
        self.engines = "awake"

    def after_generate(self) -> None:
        if self.enabled and self.engines != "asleep":
            self._call("sleep", self.pool.actors, "sleep", 1)
            self.engines = "asleep"

    def before_train(self) -> None:
        if self.enabled and not self.learners_resident:
            self._call("reload", self.learners.actors, "reload_states")
            self.learners_resident = True

    def after_train(self) -> None:
        if self.enabled and self.learners_resident:
            self._call("offload", self.learners.actors, "offload_states")
            self.learners_resident = False

    def to_learners(self) -> None:
        """The accelerators go to the learners: engines sleep, learners reload (each only if needed)."""
        self.after_generate()
        self.before_train()

    def to_engines(self) -> None:
        """The accelerators go to the engines: learners offload, engines wake (each only if needed)."""
        self.after_train()
        self.before_generate()

    def before_sync(self) -> None:
        """Before a weight sync: learners resident, engines holding their weights (not their KV cache)."""
        if not self.enabled:
            return
        self.before_train()
        if self.engines == "asleep":
            self._call("wake_weights", self.pool.actors, "wake_up", ["weights"])
            self.engines = "weights"

    def after_sync(self) -> None:
        """After the sync has finished: the learners offload, then the engines' KV cache wakes."""
        self.to_engines()

    def metrics(self) -> dict[str, float]:
        """``timing_s/colocation_<event>``: seconds spent in each hook so far."""
        return {f"timing_s/colocation_{k}": v for k, v in self.seconds.items()}


# --------------------------------------------------------------------------------------------- helpers
def _sum(dicts: Iterable[dict]) -> dict[str, float]:
    out: dict[str, float] = {}
    for d in dicts:
        for k, v in d.items():
            out[k] = out.get(k, 0.0) + float(v)
    return out


def _fmt(res: dict) -> str:
    keep = {k: v for k, v in res.items() if not k.startswith(("node:", "bundle_group", "object_store", "memory"))
            and "_group_" not in k}
    return "{" + ", ".join(f"{k}: {float(v):g}" for k, v in sorted(keep.items())) + "}"
