"""The placement planner without Ray: bundles per mode, tensor-parallel bundles, fitting, config checks."""
from __future__ import annotations

import itertools
import random

import pytest

from trace_rl.config import Config, ConfigError, to_config
from trace_rl.startup import decide_services, validate
from trace_rl.placement import (SHARED, PlacementPlan, RoleSpec, check_config, learner_cfg_for_placement,
                                plan_from_config, plan_placement)


def _errors(overrides: dict) -> list[str]:
    errors: list[str] = []
    cfg = to_config(overrides)
    s = decide_services(cfg)
    check_config(cfg, lambda path, problem, fix: errors.append(f"{path}: {problem}. Fix: {fix}"),
                 teacher=s.teacher, annotator=s.annotator_actors)
    return errors


def _plan(cfg):
    """The plan of ``cfg`` with the services the start-up decides from the method's needs."""
    s = decide_services(cfg)
    return plan_from_config(cfg, teacher=s.teacher, annotator=s.annotator_actors)


# ------------------------------------------------------------------------------------- plans
def test_disaggregated_gives_each_role_its_own_group_and_tp_bundles():
    plan = plan_placement(mode="disaggregated", accelerator="GPU",
                          rollout=RoleSpec(3, cpus=2, accelerators=1, strategy="SPREAD", tensor_parallel_size=4),
                          learner=RoleSpec(8, cpus=1, accelerators=1, strategy="PACK"),
                          teacher=RoleSpec(2, cpus=1, accelerators=0.5), annotator=RoleSpec(1, cpus=1))
    assert set(plan.groups) == {"rollout", "learner", "teacher", "annotator"}
    assert plan.groups["rollout"].bundles == ({"CPU": 2.0, "GPU": 4.0},) * 3  # tp accelerators per engine
    assert plan.groups["rollout"].strategy == "SPREAD"
    assert plan.groups["learner"].bundles == ({"CPU": 1.0, "GPU": 1.0},) * 8
    assert plan.groups["teacher"].bundles == ({"CPU": 1.0, "GPU": 0.5},) * 2
    assert plan.groups["annotator"].bundles == ({"CPU": 1.0},)  # no zero-valued accelerator entry
    for role, n in (("rollout", 3), ("learner", 8), ("teacher", 2), ("annotator", 1)):
        slots = plan.role_slots(role)
        assert [(s.group, s.bundle, s.index) for s in slots] == [(role, i, i) for i in range(n)]
    assert plan.role_slots("rollout")[0].accelerators == 4.0 and plan.role_slots("rollout")[0].shard_bundles == ()
    assert plan.totals() == {"CPU": 6 + 8 + 2 + 1, "GPU": 12 + 8 + 1}


def test_colocated_shares_one_accelerator_per_learner_rank_with_engine_shards():
    plan = plan_placement(mode="colocated", accelerator="fake_gpu",
                          rollout=RoleSpec(2, cpus=2, accelerators=0.4, tensor_parallel_size=2),
                          learner=RoleSpec(4, cpus=1, accelerators=0.6, strategy="STRICT_PACK"),
                          teacher=RoleSpec(1, cpus=1, accelerators=1))
    assert set(plan.groups) == {SHARED, "teacher"}  # the teacher keeps its own accelerators
    shared = plan.groups[SHARED]
    assert shared.strategy == "STRICT_PACK"
    # engine e's actor sits on bundle 2e, which also reserves its CPUs; every bundle holds one accelerator
    assert shared.bundles == ({"CPU": 3.0, "fake_gpu": 1.0}, {"CPU": 1.0, "fake_gpu": 1.0},
                              {"CPU": 3.0, "fake_gpu": 1.0}, {"CPU": 1.0, "fake_gpu": 1.0})
    assert [(s.group, s.bundle, s.accelerators) for s in plan.role_slots("learner")] == \
        [(SHARED, r, 0.6) for r in range(4)]
    engines = plan.role_slots("rollout")
    assert [(s.bundle, s.shard_bundles, s.accelerators) for s in engines] == [(0, (0, 1), 0.4), (2, (2, 3), 0.4)]
    # what each bundle hosts never exceeds it
    for b, res in enumerate(shared.bundles):
        on = [s for r in ("rollout", "learner") for s in plan.role_slots(r) if s.bundle == b]
        assert sum(s.cpus for s in on) <= res["CPU"] and sum(s.accelerators for s in on) <= res["fake_gpu"] + 1e-9
    assert "rollout[0], learner[1]" in plan.describe()  # bundle 1 hosts engine 0's second shard


def test_colocated_on_cpu_shares_cpu_bundles():
    plan = plan_placement(mode="colocated", rollout=RoleSpec(2, cpus=1), learner=RoleSpec(2, cpus=1))
    assert plan.groups[SHARED].bundles == ({"CPU": 2.0},) * 2
    assert [s.bundle for s in plan.role_slots("rollout")] == [0, 1]


@pytest.mark.parametrize("kwargs, message", [
    (dict(mode="colocated", rollout=RoleSpec(2, tensor_parallel_size=2), learner=RoleSpec(3)), "must equal"),
    (dict(mode="colocated", rollout=RoleSpec(1, accelerators=0.6), learner=RoleSpec(1, accelerators=0.6)), "> 1"),
    (dict(mode="nearby", rollout=RoleSpec(1), learner=RoleSpec(1)), "cluster.placement='nearby'"),
    (dict(rollout=RoleSpec(1, strategy="TIGHT"), learner=RoleSpec(1)), "strategy 'TIGHT'"),
    (dict(rollout=RoleSpec(1, cpus=0), learner=RoleSpec(1)), "no CPU and no accelerator"),
])
def test_impossible_plans_raise(kwargs, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(">", ">")):
        plan_placement(**kwargs)


# ------------------------------------------------------------------------------------- fitting
def _feasible(plan: PlacementPlan, nodes: list[dict], names=("CPU", "GPU")) -> bool:
    """NAIVE reference: try every assignment of every bundle to a node."""
    bundles = [(g.name, g.strategy, b) for g in plan.groups.values() for b in g.bundles]
    for assign in itertools.product(range(len(nodes)), repeat=len(bundles)):
        used = [{k: 0.0 for k in names} for _ in nodes]
        for (_, _, b), n in zip(bundles, assign):
            for k in names:
                used[n][k] += b.get(k, 0.0)
        if any(used[n][k] > nodes[n].get(k, 0.0) + 1e-9 for n in range(len(nodes)) for k in names):
            continue
        ok = True
        for g in plan.groups.values():
            on = [n for (name, _, _), n in zip(bundles, assign) if name == g.name]
            if g.strategy == "STRICT_PACK" and len(set(on)) > 1:
                ok = False
            if g.strategy == "STRICT_SPREAD" and len(set(on)) < len(on):
                ok = False
        if ok:
            return True
    return False


def test_fit_check_never_rejects_a_plan_that_fits():
    rng = random.Random(0)
    strategies = ("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD")
    rejected = 0
    for _ in range(150):
        plan = plan_placement(
            rollout=RoleSpec(rng.randint(1, 2), cpus=rng.choice([1, 2]), accelerators=rng.choice([0, 1]),
                             strategy=rng.choice(strategies), tensor_parallel_size=rng.choice([1, 2])),
            learner=RoleSpec(rng.randint(1, 3), cpus=1, accelerators=rng.choice([0, 0.5, 1]),
                             strategy=rng.choice(strategies)))
        nodes = [{"CPU": rng.randint(1, 4), "GPU": rng.randint(0, 3)} for _ in range(rng.randint(1, 3))]
        problems = plan.fit_problems(nodes)
        if _feasible(plan, nodes):
            assert problems == [], (plan.describe(), nodes, problems)
        else:
            rejected += bool(problems)
    assert rejected > 10  # and it does catch plenty of real misfits


def test_fit_check_names_the_misfit():
    plan = plan_placement(rollout=RoleSpec(1, cpus=1, accelerators=1, tensor_parallel_size=8),
                          learner=RoleSpec(4, cpus=1, accelerators=1, strategy="STRICT_PACK"))
    nodes = [{"CPU": 16, "GPU": 4}, {"CPU": 16, "GPU": 4}]
    problems = plan.fit_problems(nodes)
    assert any("bundle 0 of the rollout group needs {CPU: 1, GPU: 8}" in p for p in problems)
    assert any("reserves 12 GPU in all, the cluster has 8" in p for p in problems)
    spread = plan_placement(rollout=RoleSpec(1), learner=RoleSpec(3, strategy="STRICT_SPREAD"))
    assert any("STRICT_SPREAD over 3 bundles but only 2" in p for p in spread.fit_problems(nodes))
    pack = plan_placement(rollout=RoleSpec(1), learner=RoleSpec(3, accelerators=2, strategy="STRICT_PACK"))
    assert any("STRICT_PACK and needs {CPU: 3, GPU: 6} on one node" in p for p in pack.fit_problems(nodes))
    assert plan.fit_problems([]) == []  # nothing declared: nothing to say


# ------------------------------------------------------------------------------------- config
def test_default_config_plans_and_validates():
    cfg = validate(Config())
    plan = _plan(cfg)
    assert set(plan.groups) == {"rollout", "learner"}  # grpo: no teacher, no annotator service
    assert _errors({}) == []


def test_plan_from_config_adds_services_the_method_needs():
    cfg = to_config({"algorithm": {"name": "trace"}, "annotator": {"kind": "api", "num_actors": 2},
                     "teacher": {"num_actors": 2}, "cluster": {"teacher_strategy": "SPREAD"}})
    s = decide_services(cfg)
    assert s.teacher and s.annotator == "api" and s.annotator_actors
    assert not decide_services(to_config({"algorithm": {"name": "trace"}})).annotator_actors  # oracle: in a stage
    plan = _plan(cfg)
    assert set(plan.groups) == {"rollout", "learner", "teacher", "annotator"}
    assert len(plan.groups["teacher"].bundles) == 2 and plan.groups["teacher"].strategy == "SPREAD"
    assert len(plan.groups["annotator"].bundles) == 2
    assert set(plan_from_config(cfg, teacher=False, annotator=False).groups) == {"rollout", "learner"}


@pytest.mark.parametrize("overrides, needle", [
    ({"cluster": {"placement": "mixed"}}, "cluster.placement: unknown value 'mixed'. Fix: use one of disaggregated"),
    ({"cluster": {"rollout_strategy": "pack"}}, "cluster.rollout_strategy: unknown value 'pack'"),
    ({"cluster": {"accelerator": "CPU"}}, "cluster.accelerator: 'CPU' cannot stand for an accelerator"),
    ({"cluster": {"placement": "colocated"}, "rollout": {"num_engines": 1}, "learner": {"num_ranks": 2}},
     "rollout.num_engines x rollout.tensor_parallel_size = 1 x 1 accelerators != learner.num_ranks = 2"),
    ({"cluster": {"placement": "colocated"}, "rollout": {"num_engines": 2, "gpus_per_engine": 0.5},
      "learner": {"num_ranks": 2}}, "give both a share of one accelerator"),
    ({"cluster": {"placement": "colocated"}, "rollout": {"num_engines": 2, "gpus_per_engine": 0.5},
      "learner": {"num_ranks": 2, "gpus_per_rank": 0.7}}, "sum to at most 1"),
    ({"rollout": {"tensor_parallel_size": 2, "gpus_per_engine": 0.5}},
     "rollout.gpus_per_engine: 0.5: a tensor-parallel shard needs whole accelerators"),
    ({"rollout": {"tensor_parallel_size": 0}}, "rollout.tensor_parallel_size: 0 < 1"),
    ({"cluster": {"nodes": [{"CPU": 8, "GPU": 2}]}, "rollout": {"num_engines": 2, "gpus_per_engine": 1},
      "learner": {"gpus_per_rank": 1}}, "the plan reserves 4 GPU in all, the cluster has 2"),
    ({"cluster": {"num_cpus": 2}, "learner": {"num_ranks": 2}}, "the plan reserves 3 CPU in all, the cluster has 2"),
    ({"cluster": {"nodes": [{"CPU": -1}]}}, "cluster.nodes[0]: resources {'CPU': -1}"),
    ({"cluster": {"placement": "colocated"}, "trainer": {"max_staleness": 1}, "rollout": {"num_engines": 2},
      "learner": {"num_ranks": 2}}, "trainer.max_staleness: 1: colocated engines and learners take turns"),
])
def test_check_config_names_field_and_fix(overrides, needle):
    errors = _errors(overrides)
    assert any(needle in e for e in errors), errors
    assert all(". Fix: " in e for e in errors)


def test_validate_runs_the_placement_checks():
    bad = to_config({"cluster": {"placement": "colocated"}, "rollout": {"num_engines": 3}, "learner": {"num_ranks": 2}})
    with pytest.raises(ConfigError, match="colocated pairs each learner rank with one engine shard"):
        validate(bad)
    good = {"cluster": {"placement": "colocated", "accelerator": "fake_gpu", "nodes": [{"CPU": 8, "fake_gpu": 2}]},
            "rollout": {"num_engines": 2, "gpus_per_engine": 0.5}, "learner": {"num_ranks": 2, "gpus_per_rank": 0.5}}
    assert _errors(good) == []
    plan = _plan(validate(to_config(good)))
    assert plan.groups[SHARED].bundles == ({"CPU": 2.0, "fake_gpu": 1.0},) * 2


def test_simulated_accelerator_ranks_run_on_cpu():
    cfg = to_config({"learner": {"gpus_per_rank": 0.5}})

    class FakePlacement:
        def __init__(self, accelerator):
            self.plan = PlacementPlan(mode="colocated", accelerator=accelerator)

    assert learner_cfg_for_placement(cfg.learner, FakePlacement("fake_gpu")).gpus_per_rank == 0
    assert learner_cfg_for_placement(cfg.learner, FakePlacement("GPU")).gpus_per_rank == 0.5
    assert learner_cfg_for_placement(cfg.learner, None) is cfg.learner
    assert cfg.learner.gpus_per_rank == 0.5  # not modified in place


def test_services_refuse_a_plan_of_another_size():
    from trace_rl.learner.group import _placed_rank_options
    from trace_rl.rollout.pool import _engine_actor_options

    class TwoSlots:
        def count(self, role):
            return 2

    with pytest.raises(ValueError, match="2 rollout slot\\(s\\) for 3 engine"):
        _engine_actor_options(TwoSlots(), "rollout", 0, 3, 1, 0, {})
    with pytest.raises(ValueError, match="2 learner slot\\(s\\) for learner.num_ranks=4"):
        _placed_rank_options(TwoSlots(), 4)
    # no placement: exactly today's request
    assert _engine_actor_options(None, "rollout", 0, 1, 1, 0.0, {"A": "1"}) == \
        dict(num_cpus=1, num_gpus=None, runtime_env={"env_vars": {"A": "1"}}, name=None)


@pytest.mark.parametrize("accelerator", ["GPU", "fake_gpu"])
def test_colocated_tensor_parallel_requests_fit_every_bundle(accelerator):
    """Colocated TP=2 (each bundle: one learner rank + one engine shard): what every actor asks for on a bundle
    (the learner ranks, the engine actors, vLLM's Ray workers at VLLM_RAY_PER_WORKER_GPUS on the bundles of
    VLLM_RAY_BUNDLE_INDICES) fits it; the engine actor, which only drives its workers, takes no accelerator
    (with its share beside worker 0's, bundle 0 was over-asked and start-up waited forever)."""
    import ray.util.scheduling_strategies  # noqa: F401 - the strategies are built without a cluster

    from trace_rl.learner.group import _placed_rank_options
    from trace_rl.placement import Placement
    from trace_rl.rollout.pool import _engine_actor_options

    plan = plan_placement(mode="colocated", accelerator=accelerator,
                          rollout=RoleSpec(2, cpus=1, accelerators=0.5, tensor_parallel_size=2),
                          learner=RoleSpec(4, cpus=1, accelerators=0.5))
    placement = Placement.__new__(Placement)  # the plan without reserving it: options only name the groups
    placement.plan, placement.pgs = plan, {name: object() for name in plan.groups}
    bundles = plan.groups[SHARED].bundles
    asked = [0.0] * len(bundles)

    def acc(opts):
        return float(opts.get("num_gpus") or 0) + sum(opts.get("resources", {}).values())

    for opts in _placed_rank_options(placement, 4):
        asked[opts["scheduling_strategy"].placement_group_bundle_index] += acc(opts)
    for e in range(2):
        opts = _engine_actor_options(placement, "rollout", e, 2, 1, 0.5, {})
        assert acc(opts) == 0 and opts["num_cpus"] == 1
        env = opts["runtime_env"]["env_vars"]
        for b in map(int, env["VLLM_RAY_BUNDLE_INDICES"].split(",")):
            asked[b] += float(env["VLLM_RAY_PER_WORKER_GPUS"])
    assert all(a <= res[accelerator] + 1e-9 for a, res in zip(asked, bundles)), (asked, bundles)
    assert asked == [1.0] * 4  # every accelerator shared by exactly one rank and one shard
