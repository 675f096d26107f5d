"""trace_rl.report on fake run directories written the way trace_rl.train writes them: summary.json
(json.dumps(summary, indent=2, default=str)), metrics.jsonl through the real Tracker (NaN becomes the
string "nan"), and Hydra's .hydra/overrides.yaml in each job of a sweep."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from trace_rl.report import load_runs, markdown_table, write_report
from trace_rl.tracking import Tracker

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
PLOTS = ("reward.png", "entropy.png", "response_length.png", "token_fractions.png", "teacher_exposure.png",
         "accuracy.png")
K = 4


def split_eval(acc: float, length: float) -> dict:
    """One split of run_evals' output (trace_rl.eval.evaluate)."""
    return {"accuracy": acc, f"avg@{K}": acc, "pass@1": acc, f"pass@{K}": min(1.0, 2 * acc),
            "response_length": length, "truncated_frac": 0.0, "verifier_timeouts": 0.0, "n_problems": 8.0,
            "k": float(K), "seconds": 0.5}


def run_eval(id_acc: float, ood_acc: float) -> dict:
    return {"test": split_eval(id_acc, 50.0), "ood": split_eval(ood_acc, 60.0),
            "id_accuracy": id_acc, "ood_accuracy": ood_acc}


def eval_line(ev: dict) -> dict:
    """What train.eval_metrics logs for an evaluation."""
    names = ((f"avg@{K}", "accuracy"), (f"pass@{K}", f"pass@{K}"), ("response_length", "response_length"))
    return {f"eval/{split}/{m}": r[key] for split, r in ev.items() if isinstance(r, dict) for m, key in names}


def make_run(d: Path, algorithm: str, *, steps: int = 3, reward0: float = 0.2, entropy: list | None = None,
             channels: dict[str, float] | None = None, teacher_frac: float = 0.0, lam: float = 0.0,
             before=(0.3, 0.01), after=(0.9, 0.05), wall: float = 125.0, overrides: list[str] | None = None,
             summary_exposure: bool = True) -> dict:
    """A finished run in ``d``; returns the numbers the report should show. (A NaN in summary.json is
    written as the bare token NaN, as json.dumps does in train.py.)"""
    ev_before, ev_after = run_eval(*before) if before else None, run_eval(*after) if after else None
    entropy = entropy if entropy is not None else [0.5 - 0.1 * s for s in range(steps)]
    channels = channels if channels is not None else {"pg": 1.0}
    tracker = Tracker(d, config={}, use_wandb=False, console="none")
    if ev_before:
        tracker.log({**eval_line(ev_before), "timing_s/eval": 1.0}, step=0)
    grad = 0.0
    exposure = {}
    for s in range(steps):
        grad += 100.0 * teacher_frac
        exposure = {"exposure/teacher_token_frac": teacher_frac, "exposure/privileged_grad": 100.0 * teacher_frac,
                    "exposure/lambda": lam, "exposure/teacher_token_frac_cum": teacher_frac,
                    "exposure/privileged_grad_cum": grad, "exposure/lambda_sum": lam * (s + 1),
                    "exposure/lambda_sq_sum": lam * lam * (s + 1), "exposure/key_logprob_lift_cum": 0.0}
        route = {f"route/{c}_token_frac": f for c, f in channels.items()}
        tracker.log({**{f"coef/{c}": 1.0 for c in channels}, **route, **exposure, "timing_s/step": 1.0,
                     "train/reward_mean": reward0 + 0.1 * s, "train/accuracy": reward0 + 0.1 * s,
                     "train/entropy": entropy[s], "train/response_length": 40.0 + s}, step=s + 1)
    if ev_after:
        tracker.log(eval_line(ev_after), step=steps)
    tracker.finish()
    exposure_out = {**exposure, "exposure/key_logprob_lift": float("nan")} if summary_exposure else None
    summary = {"run_dir": str(d.resolve()), "algorithm": algorithm, "model_path": "tiny", "cluster": {},
               "data": {"train_prompts": 8, "train_prompts_dropped": 0}, "eval_before": ev_before,
               "eval_after": ev_after, "steps": steps, "totals": {"nonfinite_steps": 0, "skipped_steps": 0},
               "verifier": {}, "exposure": exposure_out, "teacher": None, "annotate": {}, "wall_time_s": wall}
    (d / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
    if overrides is not None:
        (d / ".hydra").mkdir()
        (d / ".hydra" / "overrides.yaml").write_text("".join(f"- {o}\n" for o in overrides))
    return {"steps": steps, "entropy": [e for e in entropy if e == e][-1], "length": 40.0 + steps - 1,
            "frac": teacher_frac, "grad": grad, "lam_sum": lam * steps}


def make_sweep(root: Path) -> dict[str, dict]:
    """A Hydra multirun dir: jobs 0/1/2 = grpo, self_opd, trace (the last entropy of trace is NaN)."""
    root.mkdir(parents=True)
    (root / "multirun.yaml").write_text("hydra:\n  mode: MULTIRUN\n")
    common = ["logger.wandb=False"]
    specs = {
        "grpo": dict(),
        "self_opd": dict(channels={"pg": 1.0, "fkl:all": 1.0}, teacher_frac=1.0, lam=1.0, after=(0.8, 0.02)),
        "trace": dict(channels={"pg": 1.0, "fkl:key": 0.1, "rkl:error": 0.05}, teacher_frac=0.15, lam=0.5,
                      entropy=[0.4, 0.3, float("nan")], wall=3725.0),
    }
    expected = {}
    for i, (algo, kw) in enumerate(specs.items()):
        (root / str(i)).mkdir()
        expected[algo] = make_run(root / str(i), algo, overrides=[f"algorithm={algo}", *common], **kw)
    return expected


def table_rows(md: str) -> dict[str, list[str]]:
    """label -> cells, from the first markdown table in ``md``."""
    lines = [ln for ln in md.splitlines() if ln.startswith("| ")]
    return {cells[0]: cells[1:] for cells in ([c.strip() for c in ln.strip("|").split(" | ")] for ln in lines[2:])}


def is_png(p: Path) -> bool:
    return p.is_file() and p.read_bytes()[:8] == PNG_MAGIC


# ---------------------------------------------------------------------------------------------
def test_cli_on_a_sweep_writes_table_and_plots(tmp_path):
    sweep = tmp_path / "multirun" / "2026-11-23" / "12-00-00"
    expected = make_sweep(sweep)
    proc = subprocess.run([sys.executable, "-m", "trace_rl.report", str(sweep)], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    report = sweep / "report.md"
    assert proc.stdout.strip() == str(report)
    md = report.read_text()
    rows = table_rows(md)
    assert list(rows) == ["grpo", "self_opd", "trace"]  # only what differs: the common override is left out
    e = expected["grpo"]
    assert rows["grpo"] == [str(e["steps"]), "0.300 -> 0.900", "0.010 -> 0.050", f"{e['entropy']:.4g}",
                            f"{e['length']:.1f}", "0.000", "0", "0", "2m05s"]
    e = expected["self_opd"]
    assert rows["self_opd"][1:3] == ["0.300 -> 0.800", "0.010 -> 0.020"]
    assert rows["self_opd"][5:8] == ["1.000", f"{e['grad']:.0f}", f"{e['lam_sum']:.4g}"]
    e = expected["trace"]
    assert rows["trace"][3] == "0.3"  # the last entropy is "nan" in metrics.jsonl: the last finite one
    assert rows["trace"][5:] == ["0.150", "45", "1.5", "1h02m"]
    for name in PLOTS:
        assert is_png(sweep / name), name
        assert f"]({name})" in md
    assert str(sweep / "0") in md


def test_table_matches_the_files(tmp_path):
    """Every cell against summary.json and metrics.jsonl read back here."""
    make_sweep(tmp_path / "s")
    runs = load_runs([tmp_path / "s"])
    rows = table_rows(markdown_table(runs))
    for r in runs:
        summary = json.loads((r.path / "summary.json").read_text())
        lines = [json.loads(x) for x in (r.path / "metrics.jsonl").read_text().splitlines()]
        entropies = [float(x["train/entropy"]) for x in lines if "train/entropy" in x]
        entropies = [x for x in entropies if x == x]
        lengths = [x["train/response_length"] for x in lines if "train/response_length" in x]
        ex, b, a = summary["exposure"], summary["eval_before"], summary["eval_after"]
        assert rows[r.label] == [
            str(summary["steps"]),
            f"{b['id_accuracy']:.3f} -> {a['id_accuracy']:.3f}",
            f"{b['ood_accuracy']:.3f} -> {a['ood_accuracy']:.3f}",
            f"{entropies[-1]:.4g}", f"{lengths[-1]:.1f}",
            f"{ex['exposure/teacher_token_frac_cum']:.3f}", f"{ex['exposure/privileged_grad_cum']:.0f}",
            f"{ex['exposure/lambda_sum']:.4g}", rows[r.label][-1]]


def test_labels_show_only_the_overrides_that_differ(tmp_path):
    for i, lr in enumerate(("1e-5", "3e-5")):
        (tmp_path / str(i)).mkdir()
        make_run(tmp_path / str(i), "grpo", overrides=["algorithm=grpo", f"algorithm.lr={lr}", "trainer.seed=1"])
    (tmp_path / "2").mkdir()
    make_run(tmp_path / "2", "grpo", overrides=["algorithm=grpo", "algorithm.lr=1e-5", "trainer.seed=2"])
    labels = [r.label for r in load_runs([tmp_path])]
    assert labels == ["grpo algorithm.lr=1e-5 trainer.seed=1", "grpo algorithm.lr=3e-5 trainer.seed=1",
                      "grpo algorithm.lr=1e-5 trainer.seed=2"]


def test_labels_without_hydra_use_the_dir_name_and_stay_distinct(tmp_path):
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        make_run(tmp_path / name, "grpo")
    assert [r.label for r in load_runs([tmp_path / "a", tmp_path / "b"])] == ["grpo a", "grpo b"]
    # the same sweep settings twice: the labels would be equal, so the path tells them apart
    for sweep in ("x", "y"):
        for i, algo in enumerate(("grpo", "trace")):
            (tmp_path / sweep / str(i)).mkdir(parents=True)
            make_run(tmp_path / sweep / str(i), algo, overrides=[f"algorithm={algo}"])
    labels = [r.label for r in load_runs([tmp_path / "x", tmp_path / "y"])]
    assert len(set(labels)) == 4 and labels[0] == "grpo (x/0)" and labels[3] == "trace (y/1)"


def test_job_dirs_sorted_numerically_and_checkpoints_not_searched(tmp_path):
    for i in (0, 2, 10):
        (tmp_path / str(i)).mkdir()
        make_run(tmp_path / str(i), "grpo", steps=i + 1, overrides=[f"trainer.seed={i}"])
    (tmp_path / "0" / "checkpoints" / "step_1").mkdir(parents=True)
    (tmp_path / "0" / "checkpoints" / "step_1" / "summary.json").write_text("{}")
    runs = load_runs([tmp_path, tmp_path / "2"])  # 2 reached twice: counted once
    assert [r.path.name for r in runs] == ["0", "2", "10"]


def test_missing_metrics_give_dashes_and_no_lines(tmp_path):
    (tmp_path / "old").mkdir()  # an older run: no evaluation before, no exposure in its summary
    make_run(tmp_path / "old", "grpo", before=None, summary_exposure=False, teacher_frac=0.25)
    (tmp_path / "bare").mkdir()  # a summary and nothing else
    (tmp_path / "bare" / "summary.json").write_text(json.dumps({"algorithm": "trace", "steps": 0}))
    runs = load_runs([tmp_path])
    rows = table_rows(markdown_table(runs))
    assert rows["grpo old"][1:3] == ["- -> 0.900", "- -> 0.050"]
    assert rows["grpo old"][5:8] == ["0.250", "75", "0"]  # exposure from the last metrics line
    assert rows["trace bare"] == ["0"] + ["-"] * 8
    report = write_report(runs, tmp_path / "out")
    for name in PLOTS:
        assert is_png(tmp_path / "out" / name), name
    # only the bare run: nothing to plot, the table still written
    (tmp_path / "only").mkdir()
    (tmp_path / "bare").rename(tmp_path / "only" / "bare")
    report = write_report(load_runs([tmp_path / "only"]), tmp_path / "out2")
    assert "| trace bare | 0 |" in report.read_text()
    assert not list((tmp_path / "out2").glob("*.png"))


def test_resumed_and_cut_off_metrics(tmp_path):
    make_run(tmp_path, "grpo", steps=3)
    with open(tmp_path / "metrics.jsonl", "a") as f:  # resumed from step 2: steps 3 logged again, then cut off
        f.write(json.dumps({"step": 3, "train/entropy": 0.05, "train/response_length": 99.0}) + "\n")
        f.write('{"step": 4, "train/entr')
    (run,) = load_runs([tmp_path])
    assert run.series("train/response_length") == ([1, 2, 3], [40.0, 41.0, 99.0])
    assert run.final("train/entropy") == 0.05


def test_out_elsewhere_with_several_dirs(tmp_path):
    make_sweep(tmp_path / "s1")
    (tmp_path / "single").mkdir()
    make_run(tmp_path / "single", "grpo")
    out = tmp_path / "report"
    report = write_report(load_runs([tmp_path / "s1", tmp_path / "single"]), out)
    assert report == out / "report.md" and len(table_rows(report.read_text())) == 4
    assert not (tmp_path / "s1" / "report.md").exists()


def test_no_runs_is_an_error_naming_the_dir(tmp_path):
    empty = tmp_path / "empty"
    (empty / "0").mkdir(parents=True)
    (empty / "0" / "metrics.jsonl").write_text('{"step": 1}\n')  # a job that did not finish
    with pytest.raises(ValueError, match="no runs under .*empty.*1 unfinished"):
        load_runs([empty])
    with pytest.raises(FileNotFoundError, match="nowhere"):
        load_runs([tmp_path / "nowhere"])
    proc = subprocess.run([sys.executable, "-m", "trace_rl.report", str(empty)], capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode != 0 and str(empty) in proc.stderr and not (empty / "report.md").exists()
