"""Estimated against measured per-layer times, and the efficiencies that close the gap.

For each model and micro-batch size, profiles the model on this machine's device (measured, layer
by layer, calibrated on the whole where it fits) and estimates it for the device kind given
(FLOPs and bytes against the datasheet peaks and the efficiencies in planner/clusters.py,
``planner profile --estimate``). Prints, per layer kind (the first layer, the repeated blocks, the
last layers), measured and estimated forward + backward seconds and their ratio: 1 is a perfect
estimate, and the blocks' ratio (matrix products dominate them) is the factor by which the matmul
efficiency in clusters.py is off on this device.

On an H100 or H200 this is the table the README's accuracy paragraph asks for (bundled GPT and
Hugging Face Llama at two sizes, micro-batch 1 to 8, bfloat16):

    python benchmarks/estimate_vs_measured.py --device cuda --kind h100 --dtype bfloat16

On a CPU the estimate is for a GPU the machine does not have, so the ratio says nothing about
accuracy; ``--quick`` runs tiny models to check the script itself.
"""

from __future__ import annotations

import argparse
import platform

from planner.model import build_spec
from planner.profile import Options, profile_model
from planner.units import fmt_time

# (label, factory, arguments): two sizes each; GPT-2-medium-sized blocks are the bar
MODELS = {
    "gpt-medium": ("models/gpt.py:build", {"n_layer": 4, "d_model": 1024, "n_head": 16, "vocab": 50257, "seq": 1024}),
    "gpt-xl": ("models/gpt.py:build", {"n_layer": 4, "d_model": 1600, "n_head": 25, "vocab": 50257, "seq": 1024}),
    "llama-1b": ("models/hf.py:build", {"model_type": "llama", "n_layer": 4, "d_model": 2048, "n_head": 32,
                                        "num_key_value_heads": 8, "vocab": 32000, "seq": 2048}),
    "llama-8b": ("models/hf.py:build", {"model_type": "llama", "n_layer": 2, "d_model": 4096, "n_head": 32,
                                        "num_key_value_heads": 8, "intermediate_size": 14336, "vocab": 32000,
                                        "seq": 2048}),
}
QUICK = {
    "gpt-tiny": ("models/gpt.py:build", {"n_layer": 2, "d_model": 64, "n_head": 2, "vocab": 128, "seq": 32}),
    "llama-tiny": ("models/hf.py:build", {"model_type": "llama", "n_layer": 2, "d_model": 64, "n_head": 2,
                                          "vocab": 128, "seq": 32}),
}


def _times(prof, mbs: int) -> list[tuple[str, float]]:
    """(layer, forward + backward seconds) at ``mbs``, scaled by the whole-model calibration."""
    key = str(mbs)
    whole = prof.whole.get(key)
    scale = whole.scale if whole else 1.0
    return [(layer.name, (layer.by_mbs[key].fwd_s + layer.by_mbs[key].bwd_s) * scale) for layer in prof.layers]


def _kinds(names: list[str]) -> dict[str, list[int]]:
    """Layers grouped as first, block (the middle ones) and last, by position."""
    n = len(names)
    return {"first": [0], "block": list(range(1, max(n - 2, 1))), "last": list(range(max(n - 2, 1), n))}


def compare(label: str, ref: str, args: dict, mbs: tuple[int, ...], device: str, kind: str, dtype: str,
            repeats: int) -> list[tuple]:
    spec = build_spec(ref, args)
    measured = profile_model(spec, ref, args, Options(device=device, dtype=dtype, mbs=mbs, repeats=repeats,
                                                      warmup=max(repeats // 3, 1)))
    estimated = profile_model(build_spec(ref, args), ref, args, Options(dtype=dtype, mbs=mbs, estimate=kind))
    rows = []
    for size in mbs:
        meas, est = _times(measured, size), _times(estimated, size)
        for group, idx in _kinds([n for n, _ in meas]).items():
            m = sum(meas[i][1] for i in idx)
            e = sum(est[i][1] for i in idx)
            rows.append((label, size, group, m, e, e / m if m > 0 else float("nan")))
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="auto")
    ap.add_argument("--kind", default="h100", help="the device kind estimated for (a --cluster kind)")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--mbs", default="1,2,4,8")
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--quick", action="store_true", help="tiny models, to check the script on a CPU")
    args = ap.parse_args()
    models = QUICK if args.quick else MODELS
    mbs = tuple(int(x) for x in args.mbs.split(","))
    print(f"machine: {platform.node()}, device {args.device}, estimated for {args.kind}, {args.dtype}")
    print(f"{'model':<12} {'mbs':>4} {'layers':<6} {'measured':>11} {'estimated':>11} {'est/meas':>9}")
    for label, (ref, fargs) in models.items():
        for row in compare(label, ref, fargs, mbs, args.device, args.kind, args.dtype, args.repeats):
            name, size, group, m, e, ratio = row
            print(f"{name:<12} {size:>4} {group:<6} {fmt_time(m):>11} {fmt_time(e):>11} {ratio:>9.3f}")


if __name__ == "__main__":
    main()
