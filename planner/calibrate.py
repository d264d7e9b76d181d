"""Write measured costs back into a profile, so the next solve plans on measured numbers."""

from __future__ import annotations

import os
from dataclasses import dataclass

from planner.errors import InputError
from planner.formats import Plan, Profile, WholeCost, load_plan, load_profile

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


def check_inputs(profile_path: str | os.PathLike[str], plan_path: str | os.PathLike[str]) -> None:
    """Before a run whose measurements go into the profile: the profile reads, and it is of the
    plan's model (else the run's times would be written into another model's profile)."""
    profile, plan = load_profile(profile_path), load_plan(plan_path)
    if profile.model.fingerprint != plan.model.fingerprint:
        raise InputError(f"--profile {profile_path} is of model {profile.model.name} "
                         f"({profile.model.fingerprint[:19]}...), the plan of {plan.model.name} "
                         f"({plan.model.fingerprint[:19]}...): give the profile the plan was solved from")
