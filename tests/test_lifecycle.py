"""How ``planner execute`` ends when it is stopped from outside, and how a model's own errors
reach the user: one line, a distinct exit code, and no process of the run left behind.

The run's processes (planner, torchrun, the workers) are found by a marker in their environment,
which every process the run starts inherits. Multi-process tests use gloo on the CPU."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
from typer.testing import CliRunner

from planner.cli import app
from planner.execute.single import free_port
from planner.model import build_spec
from planner.profile import Options as ProfileOptions
from planner.profile import profile_model
from tests.test_execute import TINY, plan_for

REPO = Path(__file__).resolve().parents[1]
MARKER = "PLANNER_TEST_RUN"
START_S = 180.0  # generous: torch imports slowly on a loaded machine
GONE_S = 10.0  # every process of a stopped run is gone this long after planner exits

runner = CliRunner()


@pytest.fixture(scope="module")
def tiny_plan(tmp_path_factory) -> Path:
    spec = build_spec("models/gpt.py:build", TINY)
    prof = profile_model(spec, "models/gpt.py:build", TINY, ProfileOptions(mbs=(1, 2), repeats=1, warmup=0,
                                                                          threads=1))
    return plan_for(prof, tmp_path_factory.mktemp("plan"), "1f1b")


def _state(pid: int) -> str:
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[-1].split()[0]


def run_processes(marker: str) -> list[str]:
    """Running processes (not zombies) whose environment carries ``marker``, as 'pid: cmdline'."""
    found = []
    needle = f"{MARKER}={marker}".encode()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if needle not in (entry / "environ").read_bytes().split(b"\0") or _state(int(entry.name)) == "Z":
                continue
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:  # gone meanwhile, or not ours to read
            continue
        found.append(f"{entry.name}: {cmdline.strip()}")
    return found


def wait_for(condition, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} not within {timeout_s:.0f} s")
        time.sleep(0.1)


def start_execute(plan: Path, run_dir: Path, marker: str, *extra: str, fault: str | None = None) -> subprocess.Popen:
    """``planner execute`` in a process of its own; its output goes to ``<run_dir>.out``."""
    env = dict(os.environ, OMP_NUM_THREADS="1", **{MARKER: marker})
    env.pop("PLANNER_FAULT", None)
    if fault:
        env["PLANNER_FAULT"] = fault
    cmd = [sys.executable, "-m", "planner", "execute", str(plan), "--run-dir", str(run_dir),
           "--steps", "1", "--warmup", "1", "--timeout", "300", *extra]
    with open(output_file(run_dir), "w") as out:
        return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT)


def output_file(run_dir: Path) -> Path:
    return run_dir.with_name(run_dir.name + ".out")


def workers_started(run_dir: Path, world: int = 2):
    return lambda: len(list(run_dir.glob("rank*.pid"))) == world


def workers(marker: str) -> list[str]:
    """The run's workers (torchrun's command line names the worker module too)."""
    return [line for line in run_processes(marker)
            if "planner.execute.worker" in line and "torch.distributed.run" not in line]


def launcher_pid(marker: str) -> int | None:
    for line in run_processes(marker):
        pid, cmdline = line.split(": ", 1)
        if "torch.distributed.run" in cmdline:
            return int(pid)
    return None


@pytest.fixture
def marker():
    """A unique run marker; whatever carries it is killed at the end, so a failing test leaves
    nothing running either."""
    mark = uuid.uuid4().hex
    yield mark
    for line in run_processes(mark):
        try:
            os.kill(int(line.split(":", 1)[0]), signal.SIGKILL)
        except ProcessLookupError:
            pass


# --------------------------------------------------------------------------- stopped from outside


@pytest.mark.slow
@pytest.mark.parametrize("sig,code,message", [
    (signal.SIGTERM, 143, "error: stopped by SIGTERM: stopped the launcher and its workers"),
    (signal.SIGINT, 130, "error: interrupted by SIGINT (Ctrl-C): stopped the launcher and its workers"),
])
def test_a_signal_to_planner_stops_every_process_of_the_run(tiny_plan, tmp_path, marker, sig, code, message):
    run_dir = tmp_path / "run"
    # rank 1 hangs at its second step: the run goes on until it is stopped
    proc = start_execute(tiny_plan, run_dir, marker, fault="hang@1")
    try:
        wait_for(workers_started(run_dir), START_S, "both workers starting")
        assert len(workers(marker)) == 2, run_processes(marker)  # the check below is not vacuous
        proc.send_signal(sig)
        proc.wait(timeout=60)
    finally:
        proc.kill()
    text = output_file(run_dir).read_text()
    assert proc.returncode == code, text
    assert message in text and f"kept in {run_dir}" in text
    assert "Traceback" not in text
    wait_for(lambda: not run_processes(marker), GONE_S, f"the run's processes ({run_processes(marker)}) ending")


@pytest.mark.slow
def test_a_killed_launcher_is_reported_and_its_workers_end(tiny_plan, tmp_path, marker):
    run_dir = tmp_path / "run"
    proc = start_execute(tiny_plan, run_dir, marker, fault="hang@1")
    try:
        wait_for(workers_started(run_dir), START_S, "both workers starting")
        assert len(workers(marker)) == 2, run_processes(marker)
        torchrun = launcher_pid(marker)
        assert torchrun is not None, run_processes(marker)
        os.kill(torchrun, signal.SIGKILL)
        proc.wait(timeout=60)
    finally:
        proc.kill()
    text = output_file(run_dir).read_text()
    assert proc.returncode == 5, text
    assert "error: the launcher (torchrun) was killed by signal 9 (SIGKILL) from outside planner" in text
    wait_for(lambda: not run_processes(marker), GONE_S, f"the run's processes ({run_processes(marker)}) ending")


# --------------------------------------------------------------------------- two nodes, one machine


@pytest.mark.slow
def test_two_launchers_as_two_nodes_each_report_the_whole_runs_verdict(tiny_plan, tmp_path, marker):
    """The README's multi-node instructions, with two launchers on this machine as the two nodes:
    node 0 does not hold the loss (rank 1 runs the last stage), yet both nodes pass its check."""
    port = str(free_port())
    procs, reports = [], []
    for node in (0, 1):
        reports.append(tmp_path / f"report{node}.json")
        procs.append(start_execute(tiny_plan, tmp_path / f"run{node}", marker, "--nnodes", "2",
                                   "--node-rank", str(node), "--master-port", port, "--tolerance", "1000%",
                                   "--report", str(reports[-1])))
    try:
        for p in procs:
            p.wait(timeout=300)
    finally:
        for p in procs:
            p.kill()
    for node, p in enumerate(procs):
        text = output_file(tmp_path / f"run{node}").read_text()
        assert p.returncode == 0, text
        ver = json.loads(reports[node].read_text())
        checks = {name: ok for name, ok, _ in ver["checks"]}
        assert checks.pop("distributed: loss equals the single-process reference") is True, ver
        (name, ok), = checks.items()
        assert name.startswith("distributed: gradients equal the reference (tolerance scaled") and ok, ver
        memory = sorted(r["what"] for r in ver["rows"] if "peak memory" in r["what"])
        assert memory == ["rank 0 peak memory", "rank 1 peak memory"]
        assert f"node {node} of 2: the checks and times cover every rank" in text


# --------------------------------------------------------------------------- the model's own errors


GOOD = '''
import torch
from torch import nn
from planner.model import ModelSpec


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList([nn.Linear(8, 8) for _ in range(3)])
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        for b in self.blocks:
            x = torch.relu(b(x))
        return self.head(x)


def build():
    torch.manual_seed(0)
    return ModelSpec(model=Net(),
                     batch=lambda n, g: ((torch.randn(n, WIDTH, generator=g),), torch.randint(0, 3, (n,), generator=g)),
                     loss=LOSS)
'''


def _model(tmp_path: Path, name: str, source: str) -> str:
    (tmp_path / f"{name}.py").write_text(source)
    return str(tmp_path / f"{name}.py") + ":build"


def _good(width: int = 8, loss: str = "nn.functional.cross_entropy") -> str:
    return GOOD.replace("WIDTH", str(width)).replace("LOSS", loss)


def _profile(tmp_path: Path, ref: str, *extra: str):
    return runner.invoke(app, ["profile", ref, "-o", str(tmp_path / "out.json"), "--repeats", "1", "--warmup", "0",
                               "--mbs", "2", *extra])


@pytest.mark.parametrize("name,source,message", [
    ("exits_at_import", "import sys\nsys.exit(4)\n",
     "exits_at_import.py: importing it raised SystemExit: it called sys.exit(4)"),
    ("exits_in_factory", "import sys\n\ndef build():\n    sys.exit(4)\n",
     "exits_in_factory.py:build raised SystemExit: it called sys.exit(4)"),
])
def test_a_factory_calling_sys_exit_is_a_model_error_not_planners_exit(tmp_path, name, source, message):
    r = _profile(tmp_path, _model(tmp_path, name, source))
    assert r.exit_code == 2, r.output
    assert message in r.output and not (tmp_path / "out.json").exists()


@pytest.mark.parametrize("source,message", [
    # the shapes are found on the meta device, whose message torch words differently from the CPU's
    (_good(width=5), "error: layer blocks.0: its forward (blocks_0) raised RuntimeError: "),
    (_good(loss="lambda out, target: out.sum(-1)"),
     "error: the loss at micro-batch 2 returned a tensor of shape (2,), not a scalar: reduce it (mean or sum)"),
    (_good(loss="lambda out, target: 1 / 0"),
     "error: the loss at micro-batch 2: its forward raised ZeroDivisionError: division by zero"),
], ids=["wrong-batch-shape", "non-scalar-loss", "loss-raises"])
def test_a_model_failing_while_profiled_names_where_and_why(tmp_path, source, message):
    r = _profile(tmp_path, _model(tmp_path, "net", source))
    assert r.exit_code == 2, r.output
    assert message in r.output
    assert "Traceback" not in r.output


def test_the_good_model_of_these_tests_profiles(tmp_path):
    r = _profile(tmp_path, _model(tmp_path, "net", _good()))
    assert r.exit_code == 0, r.output


@pytest.mark.parametrize("extra,message", [
    (("--depth", "0"), "error: --depth 0: choose 1 (the model's children) to 5 (its deepest modules)"),
    (("--arg", "n_layer=-1"), ("raised ValueError: n_layer=-1, d_model=128, n_head=4, seq=128, vocab=2048: "
                              "n_layer, d_model, n_head and seq must be at least 1")),
])
def test_impossible_profile_options_are_refused(tmp_path, extra, message):
    r = _profile(tmp_path, "models/gpt.py:build", *extra)
    assert r.exit_code == 2, r.output
    assert message in r.output
