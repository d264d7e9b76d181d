"""Prediction accuracy: predicted against measured step time and memory for every bundled model.

On a CPU machine each model's plan runs on two gloo processes (one thread each, profiled the same
way); with one GPU each rank's action list is replayed alone on it. Writes the profiles and plans
it made to --out.

    python benchmarks/accuracy.py [--device cpu|cuda] [--out DIR] [--models gpt,cnn,...]
"""

from __future__ import annotations

import argparse
import platform
from pathlib import Path

MODELS = {
    "gpt": ("models/gpt.py:build", {}),
    "gpt-tied-50k": ("models/gpt.py:build", {"tied": True, "vocab": 50257, "n_layer": 8}),
    "cnn": ("models/cnn.py:build", {}),
    "unet": ("models/unet.py:build", {}),
    "encdec": ("models/encdec.py:build", {}),
}
GPU_SIZES = {  # big enough that a GPU is not idle
    "gpt": {"n_layer": 12, "d_model": 768, "n_head": 12, "vocab": 50257, "seq": 512},
    "gpt-tied-50k": {"n_layer": 8, "d_model": 768, "n_head": 12, "vocab": 50257, "seq": 512, "tied": True},
}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="auto")
    ap.add_argument("--out", default="accuracy-out")
    ap.add_argument("--models", default=",".join(MODELS))
    args = ap.parse_args()
    import torch

    from planner.clusters import from_spec
    from planner.execute import Options, execute
    from planner.formats import dump
    from planner.model import build_spec
    from planner.profile import Options as ProfileOptions
    from planner.profile import profile_model, resolve_device
    from planner.solve import Settings, solve
    from planner.solve.plan import make_plan

    device = resolve_device(args.device)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    cuda = device.type == "cuda"
    if cuda:
        from tests.test_cuda import local_cluster
        cluster, pp, mode, dtype, sizes = local_cluster(4), 4, "replay", "bfloat16", (1, 2, 4)
    else:
        cluster, pp, mode, dtype, sizes = from_spec("cpu2"), 2, "distributed", "float32", (1, 2, 4)
    name = torch.cuda.get_device_name(0) if cuda else (platform.processor() or platform.machine())
    print(f"device: {name}; {mode} runs of {pp}-stage 1F1B plans")
    print(f"{'model':<14} {'what':<26} {'predicted':>12} {'measured':>12} {'error':>8}")
    for key in args.models.split(","):
        ref, margs = MODELS[key]
        margs = dict(GPU_SIZES.get(key, margs)) if cuda else dict(margs)
        spec = build_spec(ref, margs)
        prof = profile_model(spec, ref, margs, ProfileOptions(device=str(device), dtype=dtype, mbs=sizes,
                                                              threads=None if cuda else 1))
        dump(prof, out / f"{key}.profile.json")
        settings = Settings(global_batch=16, pp=pp, dp=1, schedules=("1f1b",))
        plan = make_plan(prof, cluster, solve(prof, cluster, settings), settings)
        dump(plan, out / f"{key}.plan.json")
        ver = execute(out / f"{key}.plan.json", Options(mode=mode, device=str(device), steps=5, warmup=2,
                                                       run_dir=str(out / f"{key}-run")))
        for r in ver.rows:
            fmt = (lambda v: f"{v * 1e3:.2f} ms") if r.unit == "s" else (lambda v: f"{v / 2**20:.1f} MiB") \
                if r.unit == "bytes" else (lambda v: f"{v:.1f}")
            print(f"{key:<14} {r.what[:26]:<26} {fmt(r.predicted):>12} {fmt(r.measured):>12} {r.error:>+8.1%}")
        for check, ok, detail in ver.checks:
            print(f"{key:<14} {'ok' if ok else 'FAILED'}: {check}" + ("" if ok else f": {detail}"))


if __name__ == "__main__":
    main()
