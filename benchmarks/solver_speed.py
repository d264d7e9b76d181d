"""How long `planner solve` takes as layers and devices grow.

Profiles are synthetic transformer-shaped models (an embedding, identical blocks, a heavy
head), so that the search is as large as a real one without measuring anything. Targets: a
96-layer profile on 64 GPUs with every knob free (tensor parallelism and ZeRO included) under
2 s, 1,000 layers on 512 GPUs under 60 s. The 96-layer instance also runs at tp 1 and zero 0,
the search as it was before tensor parallelism and ZeRO, for comparison.

    python benchmarks/solver_speed.py [--quick]

Measured on 2 shared x86-64 cores, Python 3.11, OMP_NUM_THREADS=1, before (the search as tensor
parallelism and ZeRO entered it) and after it shared work across ZeRO stages and skipped zb-auto
and the memory program where bounds show they cannot change the answer, runs interleaved. The
machine carried a load average of 7-11 from other work throughout, so wall seconds are 3-5x what
an idle machine gives and vary run to run; CPU seconds (this process, its workers and LP solver
runs) are the steadier figure. The answers are the same before and after.

| layers | devices | pins | CPU s before | CPU s after | wall s before | wall s after | best |
| --- | --- | --- | --- | --- | --- | --- | --- |
| 24 | 8 | none | 1.24-1.34 | 0.75-0.79 | 5.6-5.9 | 2.5-3.7 | pp=1 dp=8 zero=1 mbs=1 1f1b |
| 96 | 64 | none | 5.1-5.2 | 2.8-3.4 | 18-22 | 11-16 | pp=8 dp=8 zero=1 mbs=1 zb-h2 |
| 96 | 64 | tp=1 zero=0 | 4.1-4.2 | 2.4-3.0 | 19-21 | 9-13 | pp=8 dp=8 mbs=1 zb-h2 |
| 1,000 | 512 | none | 63 | 78 | 126 | 123 | pp=32 dp=16 zero=1 mbs=1 zb-v v=2 |

One back-to-back pair of `--quick` runs at a lighter load (average 5.5), wall seconds before ->
after: 24 layers 2.98 -> 0.58, 96 layers all free 5.83 -> 2.20, 96 layers at tp 1 and ZeRO 0
4.51 -> 1.96.

The 1,000-layer search stopped at its 120 s time limit both times (57 configurations solved
before, 105 after, of 6,176). On an idle machine (load 1) before the change, the 96-layer
searches took 3.6 s (all free) and 2.7 s (tp 1, ZeRO 0) wall; the 2 s and 60 s targets are not
shown met here.

After ZeRO 2 and 3 were priced as the pipeline engine runs them (ZeRO 1 dominates them, so the
free search skips them), two runs at load 1.5-4, wall / CPU seconds: 24 layers 0.52-0.65 /
0.52-0.57; 96 layers all free 1.12-2.60 / 1.61-1.96; 96 layers at tp 1 and ZeRO 0 1.06-2.39 /
1.57-2.02; 1,000 layers 122.6 / 126.1, stopped at the 120 s limit with 230 of 2,912
configurations solved: the 60 s target is not met.

After the steps that depend only on a schedule's order were made faster (the DAG the simulator
times and the global order built as single loops over flat index arrays, zb-auto's list
scheduler making an action only for the one it commits, the interleaved builder, in-flight
peaks) and torchgpipe's block partition re-sums only the blocks a move changes, before and after
run back to back, three pairs (one for 1,000 layers) at a load average of 4-5.5 from other work:

| layers | devices | pins | CPU s before | CPU s after | wall s before | wall s after | best |
| --- | --- | --- | --- | --- | --- | --- | --- |
| 24 | 8 | none | 0.68-1.01 | 0.56-0.84 | 0.70-1.01 | 0.62-0.87 | pp=1 dp=8 zero=1 mbs=1 1f1b |
| 96 | 64 | none | 2.13-2.86 | 1.94-2.44 | 2.07-2.85 | 2.04-2.51 | pp=8 dp=8 zero=1 mbs=1 zb-h2 |
| 96 | 64 | tp=1 zero=0 | 2.23-2.58 | 2.00-2.63 | 2.18-3.89 | 1.94-2.66 | pp=8 dp=8 mbs=1 zb-h2 |
| 1,000 | 512 | none | 106 | 69 | 131.7 | 122.6 | pp=32 dp=16 zero=1 mbs=1 zb-h1 v=4 |

The answers are the same (step times 3.697, 6.571, 6.571 and 22.417 s). In one process
(``jobs=1``), where CPU seconds are steadiest, 96 layers all free took 2.09-2.73 CPU s before and
1.91-2.02 after (three pairs; 2.00-2.12 with the first of these changes alone). With the first
change alone, of its 1.6 s own CPU time (the LP solver runs in child processes beside it) the
first answers took 1.0 (each configuration's schedule and memory states 0.35, the DP 0.30,
simulations 0.26, the memory-aware program 0.12) and zb-auto's list scheduling 0.4.
Neither target is met: 96 layers takes 2.0-2.5 s wall at this load (an idle machine gave 2.48 s
wall, 2.41 CPU s before the change), short of under 2 s with margin. The 1,000-layer search
stops at its 120 s limit both times, 91 and 59 of 2,912 configurations solved (the count follows
the CPU share the load left it; alone on the machine before the change, 188 in 140 s): about 780
configurations have quick bounds (15.7 s and up) below the best plan's 22.4 s, the bounds that
see the recomputation memory forces and the pipeline's fill cost seconds each at this size (122
of the best plan's 128 stages recompute).

With ZeRO 1's even shards and the tensor-parallel memory terms in, one run of the whole script at
load 2-2.6, wall / CPU seconds: 24 layers 0.52 / 0.52; 96 layers all free 1.59 / 1.63 (1.11-1.15 s
wall in three more runs of that case alone); 96 layers at tp 1 and ZeRO 0 1.49 / 1.56, the same
plan (6.571 s); 1,000 layers 122.7 / 177.3, stopped at the 120 s limit with 375 of 2,912
configurations solved, best so far pp=16 dp=16 tp=2 sp ZeRO 1 zb-auto, 231 configurations' bounds
allowing up to 15.2% more. The 2 s target holds at this load; the 60 s target is not met.

With the fluid program seeing the pipeline's fill and drain (each rank's first forward waits for
the forward through every earlier stage, its last backward is followed by the backward through
every earlier one), the receive buffers and every stage holding a layer; the configurations
with one stage per rank searched first and zb-auto's order of the best of them built before the
rest (the time to beat that prunes most interleaved and V configurations); the DP's bound tried
before any simulation where it is a relaxation; and the heuristic partitioner of large
interleaved instances held to stages of at most twice an even share: one run of the whole script
at load 0.5-0.7 (nothing else running), wall / CPU seconds: 24 layers 0.78 / 0.78 (0.46 before,
back to back: small searches now solve the program where it can prune, at 5-10 ms a solve);
96 layers all free 1.21 / 1.76 (1.04-1.38 before); 96 layers at tp 1 and ZeRO 0 1.10 / 1.65;
1,000 layers 53.9 / 102.4, every configuration decided (520 of 2,912 solved, 12 too large to
simulate), best pp=16 dp=16 tp=2 sp ZeRO 1 zb-auto at 18.933 s (18.936 before: zb-auto's order
built on another partition of it too), 75 configurations' bounds allowing up to 11.9% more. In
one process the 1,000-layer search took 155 s before and 91 s after. Both targets are met on an
idle machine; at the loads measured above (2-5) the 1,000-layer search would take about twice
as long. Taking schedules of over 50,000 actions after the others of their kind (they then meet
a better time to beat, and their DP's bound rules most out unsimulated): in one process 93.6 ->
79.0 CPU s, back to back, the same plan; with 2 workers 51.3 s wall (load 0.9-1.4, where 96
layers took 1.4-1.7 s with or without it, three pairs).
"""

from __future__ import annotations

import argparse
import platform
import resource
import time

from planner.clusters import from_spec
from planner.solve import Settings, solve
from planner.synthetic import chain_profile

GiB = 1024**3


def transformer_profile(n_layers: int):
    """Embedding, n_layers - 2 blocks, LM head; micro-batch sizes 1, 2, 4, 8."""
    blocks = n_layers - 2
    fwd = [0.8e-3] + [1.3e-3] * blocks + [9e-3]
    act = [20 * 2**20] + [160 * 2**20] * blocks + [400 * 2**20]
    params = [200 * 2**20] + [100 * 2**20] * blocks + [200 * 2**20]
    return chain_profile(fwd, act_bytes=act, param_bytes=params, out_bytes_per_sample=8 * 2**20,
                         mbs=(1, 2, 4, 8), name=f"transformer-{n_layers}")


def cpu_s() -> float:
    """CPU seconds of this process and its finished children (the search's workers and LP
    solver runs): steadier than wall time on a shared machine."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def run(n_layers: int, cluster: str, global_batch: int,
        pins: dict) -> tuple[float, float, str, bool, int, int, list[str]]:
    prof = transformer_profile(n_layers)
    t0, c0 = time.perf_counter(), cpu_s()
    r = solve(prof, from_spec(cluster), Settings(global_batch=global_batch, time_limit_s=120, **pins))
    return (time.perf_counter() - t0, cpu_s() - c0, r.best.config.describe(), r.proven, r.configs_solved,
            r.configs_total, r.notes)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="only the sizes up to 96 layers")
    args = ap.parse_args()
    free: dict = {}
    cases = [(24, "h100x8", 256, None, free), (96, "8xh100x8", 1024, 2.0, free),
             (96, "8xh100x8", 1024, None, {"tp": 1, "zero": 0})]
    if not args.quick:
        cases.append((1000, "64xh100x8", 2048, 60.0, free))
    print(f"machine: {platform.processor() or platform.machine()}, python {platform.python_version()}")
    print(f"{'layers':>6} {'devices':>8} {'pins':>12} {'seconds':>8} {'cpu s':>6} {'target':>7} {'configs':>11}  "
          "proven  best")
    for n, cluster, gb, target, pins in cases:
        secs, cpu, best, proven, solved, total, notes = run(n, cluster, gb, pins)
        devices = len(from_spec(cluster).devices)
        tgt = f"{target:.0f} s" if target else "-"
        pinned = " ".join(f"{k}={v}" for k, v in pins.items()) or "none"
        print(f"{n:>6} {devices:>8} {pinned:>12} {secs:>8.2f} {cpu:>6.2f} {tgt:>7} {solved:>5}/{total:<5}  "
              f"{str(proven):<6}  {best}")
        for note in notes:
            print(f"{'':>8}note: {note}")


if __name__ == "__main__":
    main()
