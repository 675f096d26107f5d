"""A simulated two-node Ray cluster on this machine, placed through the real planner.

Run as ``python -m tests.placement._cluster_probe MODEL_DIR OUT_JSON`` (tests/placement/test_cluster.py
does, in a subprocess: the test session keeps its own single-node cluster, and a process joins one
cluster only). Two nodes (the head and a worker), each with 6 CPUs and 4 ``fake_gpu`` (the custom
resource that stands for GPUs); every raylet binds to 127.0.0.1.

Scenarios, one after the other on the same cluster (each releases its groups):

* ``disaggregated``: trivial actors in every role of a disaggregated plan (2 tensor-parallel engines of
  2 accelerators on STRICT_SPREAD, 4 learner ranks of 1, a teacher, 2 STRICT_SPREAD annotators);
* ``misfit``: a plan no node can hold must fail at once, before any group is created;
* ``colocated``: the real RolloutPool (2 HF engines, the tiny model) and LearnerGroup (2 torch ranks)
  sharing one STRICT_SPREAD group, then one step of the colocation protocol around a real generate and
  a real training step.

The JSON written to OUT_JSON holds node ids, where each actor landed (from the GCS actor table), the
bundle-to-node map of every group, and the colocation logs, for the test to assert on.
"""
from __future__ import annotations

import json
import os
import sys
import time
import traceback


def _actor_node(actor) -> str:
    from ray._private import state

    info = state.actors(actor_id=actor._actor_id.hex())
    return info["Address"]["NodeID"]


def main(model_dir: str, out_path: str) -> None:
    import ray
    from ray.cluster_utils import Cluster

    from trace_rl.cluster import _pin_to_loopback, actor_env

    os.environ.setdefault("RAY_ENABLE_ZERO_COPY_TORCH_TENSORS", "1")
    _pin_to_loopback()  # every raylet and the driver on 127.0.0.1 (DESIGN.md, Conventions)
    common = dict(node_ip_address="127.0.0.1", include_dashboard=False, object_store_memory=96 * 2**20)
    t0 = time.perf_counter()
    cluster = Cluster(initialize_head=True, head_node_args=dict(num_cpus=6, resources={"fake_gpu": 4}, **common))
    workers = [cluster.head_node, cluster.add_node(num_cpus=6, resources={"fake_gpu": 4}, **common)]
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, _node_ip_address="127.0.0.1", runtime_env={"env_vars": actor_env()},
             log_to_driver=False)
    out: dict = {"nodes": [w.node_id for w in workers],
                 "node_ips": sorted({n["NodeManagerAddress"] for n in ray.nodes()}),
                 "cluster_up_s": time.perf_counter() - t0}
    try:
        for name, run in (("disaggregated", disaggregated), ("misfit", misfit),
                          ("colocated", lambda: colocated(model_dir))):
            t1 = time.perf_counter()
            out[name] = run()
            out[name]["scenario_s"] = time.perf_counter() - t1
    except BaseException:
        out["error"] = traceback.format_exc()
    finally:
        with open(out_path, "w") as f:
            json.dump(out, f, indent=1)
        ray.shutdown()
        cluster.shutdown()


class Where:
    """A trivial actor that reports its node (the placement test needs nothing heavier)."""

    def node(self) -> str:
        import ray

        return ray.get_runtime_context().get_node_id()


def disaggregated() -> dict:
    import ray

    from trace_rl.placement import Placement, RoleSpec, plan_placement

    plan = plan_placement(
        mode="disaggregated", accelerator="fake_gpu",
        rollout=RoleSpec(2, cpus=1, accelerators=1, strategy="STRICT_SPREAD", tensor_parallel_size=2),
        learner=RoleSpec(4, cpus=1, accelerators=1, strategy="PACK"),
        teacher=RoleSpec(1, cpus=1, accelerators=0),
        annotator=RoleSpec(2, cpus=0.5, accelerators=0, strategy="STRICT_SPREAD"))
    res: dict = {"roles": {}}
    t0 = time.perf_counter()
    with Placement(plan, timeout_s=60) as placement:
        res["reserve_s"] = time.perf_counter() - t0
        cls = ray.remote(Where)
        actors = {role: [cls.options(**placement.options(role, i)).remote() for i in range(placement.count(role))]
                  for role in ("rollout", "learner", "teacher", "annotator")}
        for role, group in actors.items():
            res["roles"][role] = ray.get([a.node.remote() for a in group], timeout=60)
        res["actors_s"] = time.perf_counter() - t0
        res["bundles"] = placement.bundle_nodes()
        res["slots"] = {role: [[s.group, s.bundle] for s in plan.role_slots(role)] for role in actors}
        for group in actors.values():
            for a in group:
                ray.kill(a)
    return res


def misfit() -> dict:
    from trace_rl.placement import Placement, PlacementError, RoleSpec, plan_placement

    import ray

    plan = plan_placement(mode="disaggregated", accelerator="fake_gpu",
                          rollout=RoleSpec(1, cpus=1, accelerators=4, tensor_parallel_size=2),
                          learner=RoleSpec(1, cpus=1))
    t0 = time.perf_counter()
    before = len(ray.util.placement_group_table())
    try:
        Placement(plan, timeout_s=60)
    except PlacementError as e:
        return {"error": str(e), "seconds": time.perf_counter() - t0,
                "groups_created": len(ray.util.placement_group_table()) - before}
    return {"error": None}


def colocated(model_dir: str) -> dict:
    import torch

    from trace_rl.config import AlgorithmConfig, LearnerConfig, ModelConfig
    from trace_rl.learner.group import LearnerGroup
    from trace_rl.placement import ColocationProtocol, Placement, RoleSpec, plan_placement
    from trace_rl.rollout.pool import RolloutPool

    plan = plan_placement(mode="colocated", accelerator="fake_gpu",
                          rollout=RoleSpec(2, cpus=1, accelerators=0.5),
                          learner=RoleSpec(2, cpus=1, accelerators=0.5, strategy="STRICT_SPREAD"))
    res: dict = {}
    lc = LearnerConfig(backend="torch", num_ranks=2, micro_batch_size=2, cpus_per_rank=1, gpus_per_rank=0.5,
                       threads_per_rank=1)
    with Placement(plan, timeout_s=60) as placement:
        t0 = time.perf_counter()
        pool = RolloutPool(model_dir, engine="hf", num_engines=2, gpus_per_engine=0.5, placement=placement,
                           startup_timeout_s=300)
        learners = LearnerGroup(lc, AlgorithmConfig(lr=1e-3), ModelConfig(path=model_dir), model_dir,
                                placement=placement, setup_timeout_s=300)
        res["start_s"] = time.perf_counter() - t0
        try:
            res["bundles"] = placement.bundle_nodes()
            res["engines"] = [_actor_node(a) for a in pool.actors]
            res["ranks"] = [_actor_node(a) for a in learners.actors]
            res["rank_devices"] = [p["device"] for p in learners.ping()]
            colo = ColocationProtocol(pool, learners)
            stamps: dict[str, float] = {}
            colo.start()                      # both resident after start-up: learners offload first
            colo.before_generate()            # engines are awake already: nothing to do
            prompts = [[5, 6, 7, 8], [9, 10, 11]]
            stamps["generate_start"] = time.time()
            batch = pool.generate(prompts, {"n": 2, "temperature": 1.0, "max_new_tokens": 6})
            stamps["generate_end"] = time.time()
            colo.after_generate()
            colo.before_train()
            B, R = batch.response_mask.shape
            batch.rewards = torch.tensor([1.0, 0.0, 1.0, 0.0])
            batch.advantages = torch.tensor([1.0, -1.0, 1.0, -1.0])[:, None] * batch.response_mask
            batch.channel_names = ("pg",)
            batch.channel_weights = batch.response_mask.float()[None]
            stamps["train_start"] = time.time()
            metrics = learners.train(batch, temperature=1.0, step=0)
            stamps["train_end"] = time.time()
            colo.after_train()
            colo.before_generate()            # next step: engines wake before generating
            res["loss_finite"] = bool(torch.isfinite(torch.tensor(metrics.get("loss", float("nan")))))
            res["events"] = colo.events
            res["stamps"] = stamps
            import ray

            res["engine_logs"] = ray.get([a.colocation_log.remote() for a in pool.actors])
            res["rank_logs"] = ray.get([a.colocation_log.remote() for a in learners.actors])
        finally:
            learners.shutdown()
            pool.shutdown()
    return res


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
