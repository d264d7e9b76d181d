"""`execute --calibrate`: the profile's time scale follows the measurement, and a measurement far
from the prediction is flagged before anyone plans on it."""

from types import SimpleNamespace

import pytest

from planner.calibrate import calibrated_profile
from planner.formats import load_plan, load_profile


def _verification(measured: float, predicted: float) -> SimpleNamespace:
    row = SimpleNamespace(unit="s", checked=True, measured=measured, predicted=predicted)
    return SimpleNamespace(rows=[row])


@pytest.fixture(scope="module")
def files():
    return load_profile("profiles/gpt.cpu.json"), load_plan("plans/gpt.cpu2-pp2.json")


def test_scale_follows_measured_over_predicted(files):
    profile, plan = files
    c = calibrated_profile(profile, plan, _verification(measured=0.33, predicted=0.30))
    assert c.ratio == pytest.approx(1.1)
    assert c.warning is None
    for key, whole in profile.whole.items():
        assert c.profile.whole[key].scale == pytest.approx(whole.scale * 1.1)


@pytest.mark.parametrize("measured", [4.37 * 0.30, 0.3 * 0.30])  # +337%, -70%
def test_implausible_measurement_is_flagged(files, measured):
    profile, plan = files
    c = calibrated_profile(profile, plan, _verification(measured=measured, predicted=0.30))
    assert c.warning is not None and "off the prediction" in c.warning


def test_nothing_measured_keeps_the_profile(files):
    profile, plan = files
    c = calibrated_profile(profile, plan, SimpleNamespace(rows=[]))
    assert c.profile is profile and c.ratio is None and "unchanged" in c.warning
