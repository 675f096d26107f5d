"""``ray job submit`` through scripts/ray_submit.py against a real head node started on 127.0.0.1.

The head node is a second, private cluster beside the session's ``ray_cluster`` (and beside other
users' clusters on the same machine): its own ``--temp-dir``, explicit free ports for every service
that has a fixed default (GCS 6379, dashboard 8265, agent 52365, client server 10001, ...), and token
authentication with a token of its own (``RAY_AUTH_MODE=token`` + ``RAY_AUTH_TOKEN`` in its
environment, so ``~/.ray/auth_token`` is neither read nor written). ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0``
keeps ``--node-ip-address=127.0.0.1`` (``ray start`` swaps loopback for the routable address otherwise);
the test asserts that every socket the head node listens on is on 127.0.0.1. The job server is queried
from subprocesses: Ray caches the auth mode and token per process, and this one may already hold the
session cluster's.

It is stopped without ``ray stop`` (which kills every Ray process on the machine, other clusters
included): ``ray start --block`` runs in the foreground and tears its node down on SIGTERM; any
process left that still names the cluster's temp dir is then killed by PID.
"""
from __future__ import annotations

import importlib.util
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import pytest

from trace_rl.cluster import free_port

REPO = Path(__file__).resolve().parents[2]
RAY = str(Path(sys.executable).parent / "ray")


def load_launcher():
    spec = importlib.util.spec_from_file_location("ray_submit", REPO / "scripts" / "ray_submit.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


# ---------------------------------------------------------------------------------------------
# the launcher's command line (cheap)
def test_launcher_builds_ray_job_submit_command(tmp_path):
    mod = load_launcher()
    environ = {"WANDB_API_KEY": "k-123", "HF_HOME": "/shared/hf", "UNRELATED": "x"}
    args, overrides = mod.parse_args(["--address", "http://10.0.0.1:8265", "--submission-id", "s1",
                                      "--env", "EXTRA=1", "--env", "UNRELATED", "--exclude", "data/", "--",
                                      "algorithm=trace", "trainer.run_dir=/shared/runs/r1"])
    cmd = mod.build_command(args, overrides, environ)
    sep = cmd.index("--")
    assert cmd[:3] == [mod.ray_cli(), "job", "submit"]
    assert cmd[cmd.index("--address") + 1] == "http://10.0.0.1:8265"
    assert cmd[cmd.index("--submission-id") + 1] == "s1"
    assert cmd[sep + 1:] == ["python", "-m", "trace_rl.train", "algorithm=trace", "trainer.run_dir=/shared/runs/r1"]
    renv = json.loads(cmd[cmd.index("--runtime-env-json") + 1])
    assert renv["working_dir"] == str(REPO)
    assert {".git", ".venv", "runs/", "outputs/", "data/"} <= set(renv["excludes"])
    assert renv["env_vars"] == {"WANDB_API_KEY": "k-123", "HF_HOME": "/shared/hf", "UNRELATED": "x", "EXTRA": "1",
                                "PYTHONUNBUFFERED": "1"}
    # secrets are not printed
    shown = json.loads(mod.redacted(cmd)[cmd.index("--runtime-env-json") + 1])
    assert shown["env_vars"]["WANDB_API_KEY"] == "***" and shown["env_vars"]["HF_HOME"] == "/shared/hf"

    args, overrides = mod.parse_args(["--no-working-dir", "--no-env", "--no-wait", "--python", "/opt/venv/bin/python",
                                      "--", "x=1"])
    cmd = mod.build_command(args, overrides, environ)
    renv = json.loads(cmd[cmd.index("--runtime-env-json") + 1])
    assert "working_dir" not in renv and "WANDB_API_KEY" not in renv["env_vars"]
    assert "--no-wait" in cmd and cmd[cmd.index("--") + 1:] == ["/opt/venv/bin/python", "-m", "trace_rl.train", "x=1"]


def test_launcher_auth_mode_and_output_warning(tmp_path):
    mod = load_launcher()
    assert mod.client_env("auto", {"RAY_AUTH_TOKEN": "t"})["RAY_AUTH_MODE"] == "token"
    assert mod.client_env("auto", {"RAY_AUTH_TOKEN_PATH": str(tmp_path / "missing")}).get("RAY_AUTH_MODE") is None
    (tmp_path / "tok").write_text("t")
    assert mod.client_env("auto", {"RAY_AUTH_TOKEN_PATH": str(tmp_path / "tok")})["RAY_AUTH_MODE"] == "token"
    assert mod.client_env("auto", {"RAY_AUTH_MODE": "disabled", "RAY_AUTH_TOKEN": "t"})["RAY_AUTH_MODE"] == "disabled"
    assert mod.client_env("disabled", {"RAY_AUTH_TOKEN": "t"})["RAY_AUTH_MODE"] == "disabled"
    assert mod.output_warning(["trainer.run_dir=/shared/r"]) is None
    assert "relative" in mod.output_warning(["trainer.run_dir=runs/r"])
    assert "trainer.run_dir" in mod.output_warning(["algorithm=grpo"])
    with pytest.raises(SystemExit):
        mod.parse_args(["--working-dir", str(tmp_path), "--", "x=1"])  # no trace_rl/ there


# ---------------------------------------------------------------------------------------------
# a real head node and a real job
class HeadNode:
    """``ray start --head --block`` on 127.0.0.1 with a private temp dir, ports and auth token."""

    def __init__(self, num_cpus: int = 6):
        self.temp_dir = tempfile.mkdtemp(prefix="trl_head_", dir="/tmp")  # short: unix socket paths
        self.gcs_port, self.dashboard_port = free_port(), free_port()
        self.token = uuid.uuid4().hex
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
        self.env.update(
            RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=self.token, PYTHONUNBUFFERED="1",
            # without this `ray start` replaces --node-ip-address=127.0.0.1 by the routable address
            # (ray._private.services.resolve_ip_for_localhost); it also forbids worker nodes joining
            RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0",
            # the job's `python` is the first on the PATH of `ray start` (STACK_NOTES)
            PATH=f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}")
        cmd = [RAY, "start", "--head", "--block", "--node-ip-address=127.0.0.1", f"--port={self.gcs_port}",
               "--dashboard-host=127.0.0.1", f"--dashboard-port={self.dashboard_port}",
               f"--dashboard-agent-listen-port={free_port()}", f"--dashboard-agent-grpc-port={free_port()}",
               f"--ray-client-server-port={free_port()}", f"--metrics-export-port={free_port()}",
               f"--runtime-env-agent-port={free_port()}", f"--num-cpus={num_cpus}", f"--temp-dir={self.temp_dir}",
               "--disable-usage-stats"]
        self.log = open(Path(self.temp_dir) / "ray_start.log", "w")
        self.proc = subprocess.Popen(cmd, env=self.env, stdout=self.log, stderr=subprocess.STDOUT,
                                     start_new_session=True)

    @property
    def address(self) -> str:
        return f"http://127.0.0.1:{self.dashboard_port}"

    def query(self, submission_id: str | None = None) -> dict:
        """Ask the job server (in a subprocess: this test process may hold the session's own Ray
        connection with another token, and Ray caches the auth mode per process)."""
        code = (
            "import json, sys\n"
            "from ray.job_submission import JobSubmissionClient\n"
            "c = JobSubmissionClient(sys.argv[1])\n"
            "out = {'version': c.get_version()}\n"
            "if len(sys.argv) > 2:\n"
            "    i = c.get_job_info(sys.argv[2])\n"
            "    out.update(status=str(i.status.value), runtime_env=i.runtime_env, logs=c.get_job_logs(sys.argv[2]))\n"
            "print(json.dumps(out))\n")
        env = dict(self.env, RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=self.token)
        r = subprocess.run([sys.executable, "-c", code, self.address, *([submission_id] if submission_id else [])],
                           capture_output=True, text=True, timeout=120, env=env)
        if r.returncode != 0:
            raise RuntimeError(r.stderr[-2000:])
        return json.loads(r.stdout.strip().splitlines()[-1])

    def wait_ready(self, timeout_s: float = 180.0) -> None:
        deadline, err = time.time() + timeout_s, None
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"ray start exited with {self.proc.returncode}: {self.read_log()}")
            try:
                self.query()
                return
            except Exception as e:  # not up yet
                err = e
                time.sleep(2)
        raise TimeoutError(f"job server at {self.address} not up after {timeout_s} s: {err}\n{self.read_log()}")

    def read_log(self) -> str:
        return (Path(self.temp_dir) / "ray_start.log").read_text()[-3000:]

    def pids(self) -> list[int]:
        """Live processes of this cluster: those naming its temp dir, and its process group."""
        pids = []
        for d in Path("/proc").iterdir():
            if not d.name.isdigit() or int(d.name) == os.getpid():
                continue
            try:
                cmdline = (d / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
                if self.temp_dir in cmdline or os.getpgid(int(d.name)) == self.proc.pid:
                    pids.append(int(d.name))
            except (OSError, ProcessLookupError):
                continue
        return pids

    def stop(self) -> list[int]:
        """Tear down exactly this cluster; returns the PIDs that needed a SIGKILL."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)  # `ray start --block` kills its node's processes
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=30)
        deadline = time.time() + 30
        while self.pids() and time.time() < deadline:
            time.sleep(1)
        killed = []
        for pid in self.pids():
            try:
                os.kill(pid, signal.SIGKILL)
                killed.append(pid)
            except ProcessLookupError:
                pass
        self.log.close()
        shutil.rmtree(self.temp_dir, ignore_errors=True)
        return killed


def listening_addresses(pids: list[int]) -> set[str]:
    """Local addresses of the TCP sockets these processes listen on (from ss)."""
    r = subprocess.run(["ss", "-Hltnp"], capture_output=True, text=True)
    out = set()
    for line in r.stdout.splitlines():
        if any(f"pid={p}," in line for p in pids):
            out.add(line.split()[3].rsplit(":", 1)[0])
    return out


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_submit_tiny_job_to_head_node(tmp_path, tiny_random_model):
    head = HeadNode()
    try:
        head.wait_ready()
        if shutil.which("ss"):
            addrs = listening_addresses(head.pids())
            assert addrs and addrs <= {"127.0.0.1", "[::ffff:127.0.0.1]"}, f"head node listens beyond loopback: {addrs}"

        run_dir = tmp_path / "run"
        sid = f"trl-test-{uuid.uuid4().hex[:8]}"
        overrides = [f"model.path={tiny_random_model}", "rollout=hf", "learner=torch", "learner.num_ranks=1",
                     "learner.micro_batch_size=4", "trainer.total_steps=1", "data.prompts_per_step=2", "rollout.n=2",
                     "rollout.max_new_tokens=24", "algorithm.filter_zero_variance=false", "eval.before=false",
                     "eval.after=false", "logger.wandb=false", "trainer.save_final=false",
                     "trainer.verifier_workers=1", f"trainer.run_dir={run_dir}"]
        env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
        env.update(RAY_AUTH_TOKEN=head.token, TRACE_RL_LOG="INFO")
        cmd = [sys.executable, str(REPO / "scripts" / "ray_submit.py"), "--address", head.address,
               "--submission-id", sid, "--env", "TRACE_RL_SUBMIT_MARK=42", "--", *overrides]
        t0 = time.time()
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=420, env=env, cwd=tmp_path)
        took = time.time() - t0
        job = head.query(sid)
        assert r.returncode == 0, f"{shlex.join(cmd)}\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}\n{job['logs'][-3000:]}"
        assert "RAY_AUTH_MODE=token" in r.stderr  # --auth auto found RAY_AUTH_TOKEN
        assert job["status"] == "SUCCEEDED"
        # the driver joined the head node's cluster (RAY_ADDRESS from the job server), not a private one
        summary = json.loads((run_dir / "summary.json").read_text())
        assert summary["steps"] == 1 and summary["cluster"]["started_local"] is False
        assert summary["cluster"]["address"].endswith(f":{head.gcs_port}"), summary["cluster"]
        assert f"summary: {run_dir / 'summary.json'}" in job["logs"]
        # the launcher's runtime_env: uploaded working dir and the forwarded variables
        assert job["runtime_env"]["working_dir"].startswith("gcs://")
        assert job["runtime_env"]["env_vars"]["TRACE_RL_SUBMIT_MARK"] == "42"
        assert job["runtime_env"]["env_vars"]["TRACE_RL_LOG"] == "INFO"
        print(f"job {sid}: SUCCEEDED in {took:.1f} s")
    finally:
        killed = head.stop()
    assert head.proc.returncode is not None
    assert head.pids() == [], f"processes of the test's head node survive: {head.pids()}"
    print(f"head node stopped; {len(killed)} stray processes needed SIGKILL")


# ---------------------------------------------------------------------------------------------
# Hydra sweeps on the cluster (conf/hydra/launcher/ray_cluster.yaml; needs the `cluster` extra)
def test_ray_cluster_launcher_config_composes(monkeypatch):
    pytest.importorskip("hydra_plugins.hydra_ray_launcher", reason="the `cluster` extra (hydra-ray-launcher)")
    from hydra import compose, initialize_config_dir
    from hydra.core.config_store import ConfigStore
    from omegaconf import OmegaConf

    from trace_rl.config import Config

    ConfigStore.instance().store(name="trace_rl_schema", node=Config)
    monkeypatch.setenv("RAY_ADDRESS", "10.1.2.3:6379")
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = compose(config_name="config", overrides=["hydra/launcher=ray_cluster", "algorithm=trace"],
                      return_hydra_config=True)
    launcher = OmegaConf.to_container(cfg.hydra.launcher, resolve=True)
    assert launcher["_target_"] == "hydra_plugins.hydra_ray_launcher.ray_launcher.RayLauncher"
    assert launcher["ray"]["init"] == {"address": "10.1.2.3:6379", "object_store_memory": None}
    assert launcher["ray"]["remote"] == {"num_cpus": 1}
    assert cfg.algorithm.name == "trace"


def test_sweep_submit_expands_like_hydra_and_owns_run_dirs(capsys):
    spec = importlib.util.spec_from_file_location("sweep_submit", REPO / "scripts" / "sweep_submit.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    points = mod.expand(["experiment=x", "algorithm=grpo,trace", "algorithm.trace_lambda.start=0.25,0.5",
                         "trainer.total_steps=range(1,3)"])
    expected = [["experiment=x", f"algorithm={a}", f"algorithm.trace_lambda.start={s}", f"trainer.total_steps={n}"]
                for a in ("grpo", "trace") for s in ("0.25", "0.5") for n in (1, 2)]
    assert points == expected
    assert mod.main(["--sweep-dir", "/shared/sw", "--name", "kl", "--dry-run", "--address", "http://h:8265", "--",
                     "algorithm=grpo,trace", "algorithm.kl_coef=0.0,0.01"]) == 0
    out = capsys.readouterr().out
    cmds = [shlex.split(line) for line in out.splitlines() if "job submit" in line]
    assert len(cmds) == 4
    for i, cmd in enumerate(cmds):
        assert cmd[cmd.index("--submission-id") + 1] == f"kl-{i}" and "--no-wait" in cmd
        assert cmd[cmd.index("--address") + 1] == "http://h:8265"
        assert cmd[-1] == f"hydra.run.dir=/shared/sw/{i}"
    assert cmds[3][-3:-1] == ["algorithm=trace", "algorithm.kl_coef=0.01"]
    with pytest.raises(SystemExit, match="trainer.run_dir"):
        mod.main(["--sweep-dir", "/shared/sw", "--dry-run", "--", "trainer.run_dir=/a"])
