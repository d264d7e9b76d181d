"""``planner solve``: the fastest plan that fits, found exactly.

``settings`` says what is searched, ``search`` walks the configurations (``time_search``, or
``least_memory`` for the memory objective; ``quick`` bounds and orders them, ``pool`` runs them
in worker processes), ``exact`` partitions the layers for one configuration (a dynamic program
on per-stage lower bounds, then branch and bound with the simulator), ``ilp`` solves the joint
problems with per-layer recomputation, ``baselines`` prices today's splits and ``infeasible``
says why nothing fits. None of it imports torch.
"""

from planner.solve.baselines import Baseline
from planner.solve.result import Candidate, SolveResult
from planner.solve.search import solve
from planner.solve.settings import Settings

__all__ = ["Baseline", "Candidate", "Settings", "SolveResult", "solve"]
