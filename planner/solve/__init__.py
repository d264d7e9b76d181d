"""``planner solve``: the fastest plan that fits, found exactly.

``search`` walks the configurations, ``exact`` partitions the layers for one configuration (a
dynamic program on per-stage lower bounds, then branch and bound with the simulator), ``ilp``
solves the joint problems with per-layer recomputation, ``baselines`` prices today's splits.
None of it imports torch.
"""

from planner.solve.search import Candidate, Settings, SolveResult, solve

__all__ = ["Candidate", "Settings", "SolveResult", "solve"]
