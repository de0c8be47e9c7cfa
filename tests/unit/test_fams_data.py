"""FAMS record planning: every face of a person with two or more photos is a ground truth once,
its source shows the same person, its donor another."""

from __future__ import annotations

import pytest

pytest.importorskip("diffusers")

from anonloader.errors import ConfigError  # noqa: E402
from anonloader.methods.fams.data import FAMSSwapper, Swapper, plan_records  # noqa: E402


def test_plan_pairs_within_a_person_and_donates_across():
    groups = [0, 0, 1, 1, 1, 2]  # person 2 has one photo: donor only
    plans = plan_records(groups, seed=1)
    assert sorted(p.ground_truth for p in plans) == [0, 1, 2, 3, 4]
    for plan in plans:
        assert plan.source != plan.ground_truth and groups[plan.source] == groups[plan.ground_truth]
        assert groups[plan.donor] != groups[plan.ground_truth]
    assert plan_records(groups, seed=1) == plans  # the seed fixes the donors
    assert {p.donor for s in range(10) for p in plan_records(groups, seed=s)} - {0, 1} >= {5}


def test_plan_needs_two_people_and_a_pair():
    with pytest.raises(ConfigError, match="two people"):
        plan_records([0, 0, 0])
    with pytest.raises(ConfigError, match="two photos"):
        plan_records([0, 1, 2])


def test_fams_swapper_is_a_swapper():
    from anonloader.methods.fams import FAMS

    assert isinstance(FAMSSwapper(FAMS(tiny=True)), Swapper)
