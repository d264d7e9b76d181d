"""Plan quality: planner's partition against the splits users get today, same configuration, same
cost model. Step times are predicted; benchmarks/accuracy.py checks predictions against runs.

    python benchmarks/quality.py
"""

from __future__ import annotations

from pathlib import Path

from planner.clusters import from_spec
from planner.formats import load_profile
from planner.solve import Settings, solve
from planner.synthetic import chain_profile

ROOT = Path(__file__).resolve().parents[1]


def gpt2_medium():
    """Per-layer costs measured on an H100 80GB (bf16, micro-batch 8, sequence 1024): 2.4 ms for
    the embedding, 4.0 ms per block, 27 ms for final norm, LM head and loss (forward + backward)."""
    tot = [2.4e-3] + [4.0e-3] * 24 + [27e-3]
    return chain_profile([t / 3 / 8 for t in tot], [2 * t / 3 / 8 for t in tot],
                         names=["emb"] + [f"h.{i}" for i in range(24)] + ["head"],
                         act_bytes=[2**20] + [36 * 2**20] * 24 + [200 * 2**20],
                         param_bytes=[2 * 50257 * 1024] + [2 * 12 * 2**20] * 24 + [2 * 50257 * 1024],
                         out_bytes_per_sample=2 * 2**20, mbs=(8,), dtype="bfloat16", name="gpt2-medium (H100 numbers)")


def cases():
    yield gpt2_medium(), "h100x8", 64
    for name in ("gpt.h200", "gpt-tied-50k.h200", "unet.h200", "encdec.h200", "gpt.cpu"):
        path = ROOT / "profiles" / f"{name}.json"
        if path.exists():
            yield load_profile(path), "cpu2" if name.endswith("cpu") else "h200x8", 64


def main() -> None:
    print(f"{'model':<28} {'cluster':<8} {'pp':>3} {'schedule':<16} {'planner':>10} "
          f"{'equal':>7} {'params':>7} {'time':>7}   (baseline step / planner step)")
    for prof, cluster, gb in cases():
        c = from_spec(cluster)
        for pp in (2, 4, 8):
            if pp > len(c.devices) or pp > len(prof.layers):
                continue
            for schedules in (("1f1b",), None):  # 1F1B, then every schedule the engine runs
                r = solve(prof, c, Settings(global_batch=gb, pp=pp, dp=1, schedules=schedules))
                mine = r.best.inner.step_time_s
                ratios = []
                for _, _, ev in r.baselines:
                    ratios.append(f"{ev.step_time_s / mine:6.2f}x" if ev is not None and ev.fits else "  n/fit")
                cfg = r.best.config
                sched = cfg.schedule + (f" v={cfg.v}" if cfg.v > 1 else "")
                print(f"{prof.model.name[:28]:<28} {cluster:<8} {pp:>3} {sched:<16} {mine * 1e3:>8.1f}ms "
                      + " ".join(ratios))


if __name__ == "__main__":
    main()
