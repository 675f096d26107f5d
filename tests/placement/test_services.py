"""TeacherService and AnnotatorService started through a Placement on the session's local cluster:
their actors must sit in the plan's bundles (Ray accounts a bundle's resources as ``CPU_group_<pg id>``;
an actor inside the bundle uses them up, one outside does not)."""
from __future__ import annotations

import time

import pytest

from trace_rl.placement import Placement, RoleSpec, plan_placement


def _group_cpu_free(pg) -> float:
    import ray

    return ray.available_resources().get(f"CPU_group_{pg.id.hex()}", 0.0)


def _wait_free(pg, want: float, timeout: float = 30.0) -> float:
    deadline = time.monotonic() + timeout  # the resource view lags actor start / kill by a heartbeat
    while True:
        free = _group_cpu_free(pg)
        if abs(free - want) < 1e-6 or time.monotonic() > deadline:
            return free
        time.sleep(0.2)


def test_teacher_and_annotator_actors_use_their_bundles(ray_cluster, tiny_random_model):
    from trace_rl.annotate.service import AnnotatorService
    from trace_rl.teacher.service import TeacherService

    plan = plan_placement(teacher=RoleSpec(1, cpus=1), annotator=RoleSpec(1, cpus=1))
    with Placement(plan, timeout_s=60) as placement:
        teacher_pg, annot_pg = placement.pgs["teacher"], placement.pgs["annotator"]
        assert _wait_free(teacher_pg, 1.0) == 1.0 and _wait_free(annot_pg, 1.0) == 1.0
        teacher = TeacherService(tiny_random_model, kind="frozen", engine="hf", num_actors=1, top_k=4,
                                 placement=placement)
        try:
            assert _wait_free(teacher_pg, 0.0) == 0.0  # the teacher engine holds its bundle's CPU
            assert _wait_free(annot_pg, 1.0) == 1.0
            annotator = AnnotatorService("model", num_actors=1, options={"model_path": tiny_random_model},
                                         placement=placement)
            try:
                assert _wait_free(annot_pg, 0.0) == 0.0
                annotator._replace(0)  # a replacement actor finds a free bundle of the same group
                assert len(annotator.actors) == 1
                import ray

                assert ray.get(annotator.actors[0].ready.remote(), timeout=120) > 0
                assert _wait_free(annot_pg, 0.0) == 0.0
            finally:
                annotator.shutdown()
        finally:
            teacher.shutdown()
        with pytest.raises(ValueError, match="0 rollout slot"):
            from trace_rl.rollout.pool import RolloutPool

            RolloutPool(tiny_random_model, engine="hf", num_engines=1, placement=placement)
