"""How long `planner solve` takes as layers and devices grow.

Profiles are synthetic transformer-shaped models (an embedding, identical blocks, a heavy
head), so that the search is as large as a real one without measuring anything. Targets: a
96-layer profile on 64 GPUs with every knob free (tensor parallelism and ZeRO included) under
2 s, 1,000 layers on 512 GPUs under 60 s. The 96-layer instance also runs at tp 1 and zero 0,
the search as it was before tensor parallelism and ZeRO, for comparison.

    python benchmarks/solver_speed.py [--quick]
"""

from __future__ import annotations

import argparse
import platform
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


def run(n_layers: int, cluster: str, global_batch: int, pins: dict) -> tuple[float, str, bool, int, int, list[str]]:
    prof = transformer_profile(n_layers)
    t0 = time.perf_counter()
    r = solve(prof, from_spec(cluster), Settings(global_batch=global_batch, time_limit_s=120, **pins))
    return (time.perf_counter() - t0, r.best.config.describe(), r.proven, r.configs_solved,
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
    print(f"{'layers':>6} {'devices':>8} {'pins':>12} {'seconds':>8} {'target':>7} {'configs':>11}  proven  best")
    for n, cluster, gb, target, pins in cases:
        secs, best, proven, solved, total, notes = run(n, cluster, gb, pins)
        devices = len(from_spec(cluster).devices)
        tgt = f"{target:.0f} s" if target else "-"
        pinned = " ".join(f"{k}={v}" for k, v in pins.items()) or "none"
        print(f"{n:>6} {devices:>8} {pinned:>12} {secs:>8.2f} {tgt:>7} {solved:>5}/{total:<5}  "
              f"{str(proven):<6}  {best}")
        for note in notes:
            print(f"{'':>8}note: {note}")


if __name__ == "__main__":
    main()
