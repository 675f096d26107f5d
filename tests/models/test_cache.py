from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from trace_rl.models import cache
from trace_rl.models.build import TinyRecipe
from trace_rl.models.cache import build_atomically, cache_root, is_complete, stage_dir, tiny_model_path


def _counting_build(log: Path, payload: str = "w"):
    def build(tmp: Path) -> dict:
        with open(log, "a") as f:
            f.write("built\n")
        (tmp / "weights.txt").write_text(payload)
        return {"payload": payload}
    return build


def test_cache_root_env(monkeypatch, tmp_path):
    monkeypatch.setenv("TRACE_RL_CACHE", str(tmp_path / "c"))
    assert cache_root() == tmp_path / "c"
    monkeypatch.delenv("TRACE_RL_CACHE")
    assert cache_root() == Path.home() / ".cache" / "trace_rl"


def test_reused_when_present_rebuilt_when_missing(tmp_path):
    log = tmp_path / "log"
    target = tmp_path / "root" / "tiny-x"
    target.parent.mkdir()
    assert build_atomically(target, _counting_build(log)) == target
    assert is_complete(target) and (target / "weights.txt").read_text() == "w"
    assert json.loads((target / "recipe.json").read_text()) == {"payload": "w"}
    build_atomically(target, _counting_build(log))
    assert log.read_text().count("built") == 1          # reused

    import shutil
    shutil.rmtree(target)
    build_atomically(target, _counting_build(log))
    assert log.read_text().count("built") == 2          # rebuilt when missing

    (target / "recipe.json").unlink()                   # an incomplete directory is not trusted
    build_atomically(target, _counting_build(log, "v2"))
    assert log.read_text().count("built") == 3 and (target / "weights.txt").read_text() == "v2"

    build_atomically(target, _counting_build(log, "v3"), force=True)
    assert log.read_text().count("built") == 4 and (target / "weights.txt").read_text() == "v3"
    # Nothing but the target and its lock file is left behind.
    assert sorted(p.name for p in target.parent.iterdir()) == [".tiny-x.lock", "tiny-x"]


def test_failed_build_leaves_nothing(tmp_path):
    target = tmp_path / "tiny-y"

    def boom(tmp: Path) -> dict:
        (tmp / "half.bin").write_text("partial")
        raise RuntimeError("build failed")

    with pytest.raises(RuntimeError, match="build failed"):
        build_atomically(target, boom)
    assert not target.exists()
    assert [p.name for p in tmp_path.iterdir()] == [".tiny-y.lock"]


_RACER = textwrap.dedent("""
    import os, sys, time
    from pathlib import Path
    from trace_rl.models.cache import build_atomically

    target, log = Path(sys.argv[1]), Path(sys.argv[2])

    def build(tmp):
        with open(log, "a") as f:
            f.write(f"start {os.getpid()} {time.time()}\\n")
        time.sleep(1.5)
        (tmp / "weights.txt").write_text(str(os.getpid()))
        with open(log, "a") as f:
            f.write(f"end {os.getpid()} {time.time()}\\n")
        return {"pid": os.getpid()}

    print(build_atomically(target, build))
""")


def test_lock_two_processes_build_once(tmp_path):
    target, log = tmp_path / "tiny-z", tmp_path / "log"
    script = tmp_path / "racer.py"
    script.write_text(_RACER)
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    procs = [subprocess.Popen([sys.executable, str(script), str(target), str(log)], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outs = [p.communicate(timeout=60) for p in procs]
    assert all(p.returncode == 0 for p in procs), [o[1] for o in outs]
    assert [o[0].strip() for o in outs] == [str(target)] * 2
    lines = log.read_text().split()
    assert lines.count("start") == 1 and lines.count("end") == 1   # built exactly once
    builder = json.loads((target / "recipe.json").read_text())["pid"]
    assert (target / "weights.txt").read_text() == str(builder)


def test_tiny_model_path_builds_real_checkpoints(tmp_path, monkeypatch, test_spec):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    monkeypatch.setenv("TRACE_RL_CACHE", str(tmp_path))
    recipe = TinyRecipe(spec=test_spec, vocab_size=300, tokenizer_problems=100, sft_problems=48,
                        sft_steps=3, sft_batch_size=16, sft_warmup_steps=1)
    with pytest.raises(ValueError, match="stage="):
        tiny_model_path("rl", recipe=recipe)
    sft_dir = tiny_model_path("sft", recipe=recipe)
    base_dir = stage_dir("base", recipe)
    assert sft_dir == tmp_path / f"tiny-sft-{recipe.digest('sft')}"
    assert base_dir == tmp_path / f"tiny-base-{recipe.digest('base')}"
    for d in (base_dir, sft_dir):
        assert is_complete(d)
        model = AutoModelForCausalLM.from_pretrained(str(d))
        tok = AutoTokenizer.from_pretrained(str(d))
        assert model.config.vocab_size == len(tok) and tok.chat_template
    rec = json.loads((sft_dir / "recipe.json").read_text())
    assert rec["stage"] == "sft" and rec["key"]["sft_steps"] == 3
    assert not (sft_dir / "sft_data.jsonl").exists()

    mtime = (sft_dir / "model.safetensors").stat().st_mtime_ns
    assert tiny_model_path("sft", recipe=recipe) == sft_dir             # reused, not rebuilt
    assert (sft_dir / "model.safetensors").stat().st_mtime_ns == mtime
    # A changed SFT recipe gets its own directory; the base is shared.
    other = dataclasses.replace(recipe, sft_steps=2)
    other_dir = tiny_model_path("sft", recipe=other)
    assert other_dir != sft_dir and json.loads((other_dir / "recipe.json").read_text())["base_dir"] == str(base_dir)
    assert cache.STAGES == ("base", "sft")
