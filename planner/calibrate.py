"""Write measured costs back into a profile, so the next solve plans on measured numbers."""

from __future__ import annotations

from planner.formats import Plan, Profile, WholeCost


def calibrated_profile(profile: Profile, plan: Plan, ver) -> Profile:
    """Scale the profile's time calibration by measured / predicted step time (the whole step is
    what was measured; per-layer shares stay as profiled)."""
    rows = [r for r in ver.rows if r.unit == "s" and r.checked and r.predicted > 0]
    if not rows:
        return profile
    ratio = rows[0].measured / rows[0].predicted
    whole = {}
    for key, w in profile.whole.items():
        whole[key] = w.model_copy(update={"scale": w.scale * ratio})
    for key in (layer_mbs for layer_mbs in profile.layers[0].by_mbs if layer_mbs not in whole):
        whole[key] = WholeCost(fwd_s=0.0, bwd_s=0.0, layer_sum_s=0.0, scale=ratio)
    return profile.model_copy(update={"whole": whole})
