"""The typed reuse profile: what the profiler writes round-trips exactly, another format
version or a broken field is refused with a message naming it, and a consumer whose pair's
profile is unreadable recomputes and says why (engine-neutral: no torch here)."""

from __future__ import annotations

import copy
import math

import pytest

from cachesvc_connectors.reuse import (PROFILE_FORMAT, Plan, PlanPolicy, PlanSelector, ProfileFormatError,
                                       ReuseProfile)
from cachesvc_connectors.reuse.profile import LayerSensitivity, PlanRow


def _profile() -> ReuseProfile:
    L = 8
    rows = (PlanRow(Plan(L), 0.4, (0.2, 0.6), 0.3, 0.1, True, False),
            PlanRow(Plan(L, ((0, 1),)), 0.3, (0.1, 0.5), 0.4, 0.2, False, False),
            PlanRow(Plan(L, ((4, 6),)), 0.96, (0.8, 1.0), 0.01, 0.0, True, False),
            PlanRow(Plan(L, ((4, 6), (7, 8))), 1.0, (0.9, 1.0), 0.0, 0.0, True, True))
    return ReuseProfile(L, 20, rows, metric="identical", slab_dtype="bfloat16", window_sizes=(1, 2),
                        max_groups=2, full_reuse_quality=0.4,
                        layer_sensitivity=(LayerSensitivity(0, 0.3, 0.4),), elapsed_s=1.5, scoring_s=1.2,
                        producer="base", consumer="tuned", producer_digest="ab", consumer_digest="cd")


def test_round_trip_and_reading():
    profile = _profile()
    doc = profile.to_json()
    assert doc["format"] == PROFILE_FORMAT and doc["frontier"] == ["full reuse", "[4,6)", "[4,6),[7,8)"]
    again = ReuseProfile.from_json(copy.deepcopy(doc))
    assert again == profile and again.to_json() == doc
    assert profile.best_plan(0.95) == Plan(8, ((4, 6),)) and profile.best_plan(1.0).recomputed_layers == 3
    assert profile.best_plan(1.01) is None
    assert profile.frontier(0.9) == [(Plan(8, ((4, 6),)), 0.96), (Plan(8, ((4, 6), (7, 8))), 1.0)]
    assert profile.ladder_above(Plan(8)) == [Plan(8, ((4, 6),)), Plan(8, ((4, 6), (7, 8)))]
    assert profile.quality_of(Plan(8, ((0, 1),))) == 0.3 and profile.quality_of(Plan(8, ((1, 2),))) is None


@pytest.mark.parametrize("edit, message", [
    (lambda d: d.update(format=2), "format 2"),
    (lambda d: d.pop("format"), "format None"),
    (lambda d: d.pop("num_layers"), "no field 'num_layers'"),
    (lambda d: d.update(plans=[]), "no measured plan"),
    (lambda d: d["plans"][1].update(groups=[[3, 1]]), r"plans\[1\].groups"),
    (lambda d: d["plans"][2].update(quality=1.5), r"plans\[2\].quality: 1.5 is outside"),
    (lambda d: d["plans"][0].update(quality="high"), r"plans\[0\].quality: expected"),
    (lambda d: d["plans"][0].pop("frontier"), r"plans\[0\]: no field 'frontier'"),
])
def test_another_version_or_a_broken_field_is_refused(edit, message):
    doc = _profile().to_json()
    edit(doc)
    with pytest.raises(ProfileFormatError, match=message):
        ReuseProfile.from_json(doc)


class _Registry:
    """Serves one stored document, as the SDK's get_profile would (a fake of the SDK's
    interface for the engine-neutral selector; the service path is tested in
    test_profiler.py and test_planner.py)."""

    def __init__(self, document: dict) -> None:
        self.document, self.calls = document, 0

    def get_profile(self, producer, consumer):
        from cachesvc_client import StoredProfile
        self.calls += 1
        return StoredProfile(producer, consumer, "ab", "cd", 3, self.document)


def test_selector_sources_in_order_and_an_unreadable_profile_recomputes():
    good = _Registry(_profile().to_json())
    selector = PlanSelector(good, "tuned", PlanPolicy(min_quality=0.95))
    choice = selector.choose("base", 512, 530)
    assert choice.plan == Plan(8, ((4, 6),)) and choice.source == "profile" and choice.quality == 0.96
    selector.choose("base")
    assert good.calls == 1                                         # read once, then cached
    explicit = PlanSelector(good, "tuned", PlanPolicy(plans={"base": Plan(8, ((0, 8),))}))
    assert explicit.choose("base").source == "explicit"
    strict = PlanSelector(good, "tuned", PlanPolicy(min_quality=1.01))
    refused = strict.choose("base")
    assert refused.plan is None and "no profiled plan" in refused.why
    broken = _profile().to_json() | {"format": 99}
    fallback = PlanSelector(_Registry(broken), "tuned", PlanPolicy(default_plan=Plan(8)))
    assert fallback.choose("base").source == "default"
    none = PlanSelector(_Registry(broken), "tuned", PlanPolicy()).choose("base")
    assert none.plan is None and "unreadable" in none.why and "format 99" in none.why
    assert math.isclose(selector.expectation("base", Plan(8, ((4, 6),)))[0], 0.96)
