"""The core package, installed alone in a fresh virtual environment, solves, simulates, checks and
exports the committed files without torch (what a CI job that checks plans installs)."""

import shutil
import subprocess
import sys
import venv
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _run(args: list, cwd: Path, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([str(a) for a in args], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout)


@pytest.fixture(scope="module")
def core_env(tmp_path_factory) -> Path:
    """A virtual environment without system site packages holding only `pip install SRC`, where
    SRC is a copy of the checkout's package files (so building leaves nothing in the checkout)."""
    tmp = tmp_path_factory.mktemp("core")
    src = tmp / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    shutil.copytree(ROOT / "planner", src / "planner", ignore=shutil.ignore_patterns("__pycache__"))
    env = tmp / "venv"
    venv.create(env, with_pip=True, system_site_packages=False)
    bindir = env / ("Scripts" if sys.platform == "win32" else "bin")
    done = _run([bindir / "python", "-m", "pip", "install", "-q", "--disable-pip-version-check",
                 str(src)], cwd=tmp, timeout=300)
    assert done.returncode == 0, f"pip install of the core package failed:\n{done.stderr[-2000:]}"
    return bindir


@pytest.mark.slow
def test_core_install_has_no_torch(core_env):
    done = _run([core_env / "python", "-c", "import torch"], cwd=ROOT)
    assert done.returncode != 0 and "No module named 'torch'" in done.stderr
    done = _run([core_env / "python", "-c", "import PIL"], cwd=ROOT)
    assert done.returncode != 0
    done = _run([core_env / "planner", "--version"], cwd=ROOT)
    assert done.returncode == 0 and done.stdout.startswith("planner "), done.stderr


@pytest.mark.slow
def test_core_install_solves_simulates_checks_and_exports(core_env, tmp_path):
    planner = core_env / "planner"
    plans = sorted((ROOT / "plans").glob("*.json"))
    assert plans
    runs = {
        "solve": [planner, "solve", ROOT / "profiles" / "gpt.cpu.json", "--cluster", "cpu2",
                  "--pp", "2", "--global-batch", "16", "-o", tmp_path / "gpt.plan.json"],
        "simulate": [planner, "simulate", ROOT / "plans" / "gpt.cpu2-pp2.json",
                     "--timeline", tmp_path / "t.svg"],
        "check": [planner, "check", *plans],
        "export": [planner, "export", ROOT / "plans" / "gpt.cpu2-pp2.json", "--format", "megatron"],
    }
    for name, args in runs.items():
        done = _run(args, cwd=tmp_path)
        assert done.returncode == 0, f"planner {name} exited {done.returncode}:\n{done.stderr[-2000:]}"
    assert (tmp_path / "gpt.plan.json").is_file() and (tmp_path / "t.svg").is_file()


@pytest.mark.slow
def test_core_install_names_the_extra_for_torch_commands(core_env, tmp_path):
    done = _run([core_env / "planner", "profile", ROOT / "models" / "gpt.py:build",
                 "-o", tmp_path / "p.json"], cwd=tmp_path)
    assert done.returncode == 2
    assert "pip install -e '.[torch]'" in done.stderr and "Traceback" not in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "p.json").exists()
    done = _run([core_env / "planner", "simulate", ROOT / "plans" / "gpt.cpu2-pp2.json",
                 "--timeline", tmp_path / "t.png"], cwd=tmp_path)
    assert done.returncode == 2 and "needs pillow" in done.stderr, done.stderr
    assert not (tmp_path / "t.png").exists()
