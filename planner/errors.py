"""Errors raised by the library. Only ``cli.py`` turns them into a message and an exit code.

Exit codes are the same for every command:

    0  success
    1  a check failed (the plan is stale, no longer fits, or a better one exists)
    2  bad input (missing or malformed file, unknown name, invalid combination)
    3  infeasible (nothing fits the devices' memory)
    4  measured outside tolerance
    5  execution failed (a worker raised, ran out of memory, was killed or timed out, or the
       launcher itself was killed)
  129  stopped by SIGHUP (the terminal closed)
  130  interrupted by SIGINT (Ctrl-C)
  143  stopped by SIGTERM (``timeout``, a CI cancellation, a job scheduler)

A command that started processes (``execute``) stops all of them before it exits, whatever the
reason, and its message says what happened.
"""

from __future__ import annotations

import re


def one_line(text: str) -> str:
    """``text`` with its line breaks and other control characters escaped, as Python writes them
    (a file name or a key in a file may hold any of them)."""
    return re.sub(r"[\x00-\x1f\x7f]", lambda m: repr(m.group())[1:-1], text)


class PlannerError(Exception):
    """Base class: a message for one line, and the exit code that goes with it."""

    exit_code = 2


class InputError(PlannerError):
    """Bad input: a missing or malformed file, an unknown name, an invalid combination."""

    exit_code = 2


class ScheduleError(InputError):
    """A schedule that cannot be built for the given stages and micro-batches."""


class InfeasibleError(PlannerError):
    """No configuration fits the devices' memory."""

    exit_code = 3


class CheckFailed(PlannerError):
    """`planner check` found a stale, over-memory or beaten plan."""

    exit_code = 1


class ToleranceError(PlannerError):
    """Measured step time or memory differs from the prediction by more than allowed."""

    exit_code = 4


class ExecutionError(PlannerError):
    """A worker failed: raised, ran out of memory, was killed or timed out."""

    exit_code = 5


class ModelError(InputError):
    """A model factory that cannot be imported, raises, or does not trace."""


# The optional parts of planner and the extra that installs each (pyproject.toml).
EXTRAS = {"torch": "torch", "PIL": "torch", "transformers": "hf"}


class MissingExtraError(InputError):
    """A command needs a package that only an extra installs (torch for profile and execute)."""

    def __init__(self, module: str, needed_for: str = "this command"):
        root = module.split(".")[0]
        package = {"PIL": "pillow"}.get(root, root)
        aside = " (.svg and .html timelines need nothing more)" if root == "PIL" else ""
        super().__init__(f"{needed_for} needs {package}, which is not installed{aside}: "
                         f"pip install -e '.[{EXTRAS.get(root, 'torch')}]' in the planner checkout "
                         "(or ./install.sh)")


class Interrupted(PlannerError):
    """Stopped by a signal; the exit code is the shell's, 128 + the signal number."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.signum = signum
        self.exit_code = 128 + signum
