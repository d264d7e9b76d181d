"""Write measured costs back into a profile, so the next solve plans on measured numbers."""

from __future__ import annotations

from dataclasses import dataclass

from planner.formats import Plan, Profile, WholeCost

# A measured step more than twice or less than half the prediction is more likely a loaded machine,
# a different device or a different thread count than a cost model that is off by that much.
PLAUSIBLE_RATIO = (0.5, 2.0)


@dataclass(frozen=True)
class Calibration:
    profile: Profile
    ratio: float | None  # measured / predicted step time; None when nothing was measured

    @property
    def warning(self) -> str | None:
        if self.ratio is None:
            return "nothing was measured: the profile is written unchanged"
        low, high = PLAUSIBLE_RATIO
        if low <= self.ratio <= high:
            return None
        return (f"the measured step is {self.ratio - 1:+.0%} off the prediction: check that the run had "
                "the devices and threads the profile was made with before planning on this profile")


def calibrated_profile(profile: Profile, plan: Plan, ver) -> Calibration:
    """Scale the profile's time calibration by measured / predicted step time (the whole step is
    what was measured; per-layer shares stay as profiled)."""
    rows = [r for r in ver.rows if r.unit == "s" and r.checked and r.predicted > 0]
    if not rows:
        return Calibration(profile, None)
    ratio = rows[0].measured / rows[0].predicted
    whole = {}
    for key, w in profile.whole.items():
        whole[key] = w.model_copy(update={"scale": w.scale * ratio})
    for key in (layer_mbs for layer_mbs in profile.layers[0].by_mbs if layer_mbs not in whole):
        whole[key] = WholeCost(fwd_s=0.0, bwd_s=0.0, layer_sum_s=0.0, scale=ratio)
    return Calibration(profile.model_copy(update={"whole": whole}), ratio)
