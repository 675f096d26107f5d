"""The on-disk cache of the tiny model: ``tiny_model_path(stage)`` returns a ready checkpoint directory.

Layout: ``$TRACE_RL_CACHE`` (default ``~/.cache/trace_rl``) holds one directory per stage and
recipe, ``tiny-<stage>-<hash>``, where ``<hash>`` is a short digest of everything the stage's
weights depend on (``TinyRecipe.key(stage)``: model spec, tokenizer and SFT settings, the code
version constant and the task source). A changed recipe therefore gets a new directory and is
rebuilt; an unchanged one is reused.

Concurrency: building is serialised by an exclusive ``fcntl.flock`` on ``.tiny-<stage>-<hash>.lock``
(parallel tests, Ray actors), the build writes into a temporary directory beside the target and
``os.rename``\\ s it into place, so a reader never sees a half-written checkpoint. A directory
counts as complete only when it holds ``recipe.json`` (written last, before the rename).
"""
from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable, Iterator

STAGES = ("base", "sft")
DONE_FILE = "recipe.json"


def cache_root() -> Path:
    """``$TRACE_RL_CACHE`` if set, else ``~/.cache/trace_rl`` (created on demand)."""
    env = os.environ.get("TRACE_RL_CACHE")
    root = Path(env).expanduser() if env else Path.home() / ".cache" / "trace_rl"
    return root


def stage_dir(stage: str, recipe=None) -> Path:
    """Where ``stage`` of ``recipe`` (default: ``TinyRecipe()``) lives in the cache (built or not)."""
    from trace_rl.models.build import TinyRecipe

    _check_stage(stage)
    recipe = recipe if recipe is not None else TinyRecipe()
    return cache_root() / f"tiny-{stage}-{recipe.digest(stage)}"


def is_complete(path: Path) -> bool:
    """True when ``path`` is a finished build (its ``recipe.json`` exists)."""
    return (path / DONE_FILE).is_file()


@contextlib.contextmanager
def file_lock(path: Path) -> Iterator[None]:
    """Hold an exclusive ``flock`` on ``path`` (created if needed) for the ``with`` body; blocks."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(str(path), os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


def build_atomically(target: Path, build: Callable[[Path], dict], *, force: bool = False) -> Path:
    """Make ``target`` by calling ``build(tmp_dir)`` under a lock, unless it is already complete.

    ``build`` fills ``tmp_dir`` and returns the JSON-able record written to ``recipe.json``; the
    directory is then renamed to ``target``. With ``force`` an existing ``target`` is replaced.
    Leftover temporary directories of crashed builds of the same target are removed.
    """
    lock = target.parent / f".{target.name}.lock"
    if not force and is_complete(target):
        return target
    with file_lock(lock):
        # Someone else may have finished it while we waited for the lock.
        if not force and is_complete(target):
            return target
        for stale in target.parent.glob(f".{target.name}.tmp*"):
            shutil.rmtree(stale, ignore_errors=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp", dir=target.parent))
        try:
            record = build(tmp)
            (tmp / DONE_FILE).write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")
            if target.exists():  # incomplete leftover, or --force
                trash = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-old", dir=target.parent))
                os.rename(target, trash / "old")
                os.rename(tmp, target)
                shutil.rmtree(trash, ignore_errors=True)
            else:
                os.rename(tmp, target)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return target


def tiny_model_path(stage: str = "sft", *, recipe=None, force: bool = False,
                    log: Callable[[str], None] | None = None) -> Path:
    """Directory of the tiny model's ``stage`` ("base": random init, "sft": warm-started), built if missing.

    ``recipe`` defaults to ``TinyRecipe()``; ``force`` rebuilds the stage (not its inputs) even if
    cached. ``log`` receives progress lines while building (silent by default). The result is an
    ordinary HF checkpoint directory (config, safetensors weights, tokenizer, generation config).
    """
    from trace_rl.models.build import TinyRecipe, build_base, build_sft

    _check_stage(stage)
    recipe = recipe if recipe is not None else TinyRecipe()
    target = stage_dir(stage, recipe)
    if stage == "base":
        return build_atomically(target, lambda tmp: build_base(recipe, tmp, log=log), force=force)
    base = tiny_model_path("base", recipe=recipe, log=log)
    return build_atomically(target, lambda tmp: build_sft(recipe, base, tmp, log=log), force=force)


def _check_stage(stage: str) -> None:
    if stage not in STAGES:
        raise ValueError(f"stage={stage!r} is not one of {STAGES}")
