"""Many more mutants of the committed plans and profiles than the tests draw, with a table.

The mutations and the judgement are tests/test_fuzz.py's: each mutant is run in-process through
every command that reads it (simulate, check, export in each format; solve and check --profile;
solve for a cluster file; check --resolve), here also solve on a 4-GPU cluster and simulate
--timeline; a sample is also run as separate ``python -m planner`` processes, where an internal
error is exit 70.

    python benchmarks/fuzz.py [--examples 2000] [--processes 30] [--seed 0]

Prints, per command: runs, refusals (exit 2), internal errors, invalid mutants accepted, other
misbehaviour (a traceback, a refusal not on one line), and the slowest run; then each problem.
Exits 1 if there is any problem or a run took more than 30 s.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

from hypothesis import HealthCheck, Phase, given, seed, settings
from hypothesis import strategies as st

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.test_fuzz import (  # noqa: E402
    Mutant,
    Run,
    cluster_mutants,
    plan_mutants,
    profile_mutants,
    run_mutant,
    settings_mutants,
)

STRATEGIES = {"plan": plan_mutants, "profile": profile_mutants, "cluster": cluster_mutants,
              "saved settings": settings_mutants}

SLOW_S = 30.0


def extra_commands(kind: str):
    def more(path: str, folder: str) -> list[list[str]]:
        if kind == "plan":
            return [["simulate", path, "--timeline", str(Path(folder) / "t.svg")]]
        if kind != "profile":
            return []
        return [["solve", path, "--cluster", "h100x4", "--global-batch", "16", "--time-limit", "2",
                 "--jobs", "1", "--json"]]
    return more


def fuzz(examples: int, rng_seed: int) -> list[tuple[Mutant, Run]]:
    runs: list[tuple[Mutant, Run]] = []
    config = settings(max_examples=examples, deadline=None, database=None, derandomize=False,
                      phases=[Phase.generate], suppress_health_check=list(HealthCheck))

    @seed(rng_seed)
    @config
    @given(pick=st.data())
    def one(pick):
        kind = pick.draw(st.sampled_from(["plan", "plan", "profile", "profile", "cluster", "saved settings"]))
        mutant = pick.draw(STRATEGIES[kind]())
        for run in run_mutant(mutant, kind, extra_commands(kind)):
            runs.append((mutant, run))

    one()
    return runs


def in_processes(pairs: list[tuple[Mutant, Run]], count: int) -> list[str]:
    """Run a sample again as real processes: exit 70 is an internal error there."""
    problems = []
    for mutant, run in pairs[:count]:
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "mutant.json"
            path.write_bytes(mutant.text)
            old = str(Path(next(a for a in run.args if a.endswith("mutant.json"))).parent)
            args = [a.replace(old, tmp) for a in run.args]
            done = subprocess.run([sys.executable, "-m", "planner", *args], capture_output=True, text=True,
                                  check=False, cwd=tmp, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=120)
            text = done.stdout + done.stderr
            if done.returncode == 70 or "Traceback" in text or done.returncode != run.code:
                problems.append(f"{mutant!r}, planner {args[0]} in a process: exit {done.returncode} "
                                f"(in-process {run.code}): {text.strip()[:300]}")
    return problems


def label(args: list[str]) -> str:
    """The command and the options that tell its runs apart (not the files)."""
    shown = [args[0]]
    for flag in ("--cluster", "--format", "--profile", "--timeline", "--resolve", "--json"):
        if flag not in args or (flag == "--json" and args[0] != "simulate"):  # solve always prints JSON here
            continue
        value = args[args.index(flag) + 1] if flag in ("--cluster", "--format") else ""
        shown.append(flag + (" FILE" if value.endswith(".json") else f" {value}" if value else ""))
    return " ".join(shown)


def table(runs: list[tuple[Mutant, Run]]) -> None:
    rows: dict[str, list] = defaultdict(lambda: [0, 0, 0, 0, 0, 0.0])
    for _, run in runs:
        row = rows[label(run.args)]
        problem = run.problem or ""
        internal, accepted = problem.startswith("internal error"), problem.startswith("an invalid mutant")
        row[0] += 1
        row[1] += run.code == 2
        row[2] += internal
        row[3] += accepted
        row[4] += bool(problem) and not (internal or accepted)
        row[5] = max(row[5], run.seconds)
    head = ("command", "runs", "exit 2", "internal errors", "invalid accepted", "other problems", "max s")
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for name, (n, refused, internal, accepted, other, slow) in sorted(rows.items()):
        print(f"| {name} | {n} | {refused} | {internal} | {accepted} | {other} | {slow:.2f} |")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--examples", type=int, default=2000, help="mutants to draw")
    ap.add_argument("--processes", type=int, default=30, help="runs repeated as real processes")
    ap.add_argument("--seed", type=int, default=0)
    opts = ap.parse_args()
    start = time.perf_counter()
    runs = fuzz(opts.examples, opts.seed)
    mutants = len({id(m) for m, _ in runs})
    invalid = len({id(m) for m, _ in runs if m.invalid})
    print(f"{mutants} mutants ({invalid} invalid by construction), {len(runs)} runs, "
          f"{time.perf_counter() - start:.0f} s")
    table(runs)
    problems = [f"{m!r}, planner {r.args[0]}: {r.problem.strip()[-400:]}" for m, r in runs if r.problem]
    problems += [f"{m!r}, planner {' '.join(r.args[:1])}: {r.seconds:.1f} s" for m, r in runs if r.seconds > SLOW_S]
    problems += in_processes(runs[:: max(1, len(runs) // max(1, opts.processes))], opts.processes)
    for line in problems:
        print(line)
    print(f"{len(problems)} problems")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
