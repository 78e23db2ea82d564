"""Patient split maths: largest-remainder counts, side strata, one patient in one split."""

from __future__ import annotations

import pytest

from kneegen.data.splits import SplitFractions, split_counts, split_patients


@pytest.mark.parametrize(
    "n, fractions, expected",
    [
        (101, (0.8, 0.1, 0.1), {"train": 81, "val": 10, "test": 10}),  # the AKOA dataset's patients
        (10, (0.8, 0.1, 0.1), {"train": 8, "val": 1, "test": 1}),
        (3, (0.8, 0.1, 0.1), {"train": 1, "val": 1, "test": 1}),  # held-out splits still get one
        (6, (0.8, 0.2, 0.0), {"train": 5, "val": 1, "test": 0}),
        (7, (0.5, 0.25, 0.25), {"train": 3, "val": 2, "test": 2}),  # remainders .5 < .75 = .75
    ],
)
def test_split_counts_by_largest_remainder(n, fractions, expected):
    counts = split_counts(n, SplitFractions(*fractions))
    assert counts == expected and sum(counts.values()) == n


def test_every_patient_gets_exactly_one_split_with_the_planned_counts():
    sides = {
        f"p{i:03d}": ({"LEFT"} if i % 3 == 0 else {"RIGHT"} if i % 3 == 1 else {"LEFT", "RIGHT"}) for i in range(101)
    }
    assignment = split_patients(sides, SplitFractions(), seed=0)
    assert set(assignment) == set(sides)
    totals = {name: sum(1 for s in assignment.values() if s == name) for name in ("train", "val", "test")}
    assert totals == {"train": 81, "val": 10, "test": 10}
    for stratum in ({"LEFT"}, {"RIGHT"}, {"LEFT", "RIGHT"}):  # ~34 patients each: ~3 per held-out split
        in_val = sum(1 for p, s in assignment.items() if sides[p] == stratum and s == "val")
        assert 2 <= in_val <= 4


def test_same_seed_same_split_other_seed_other_split():
    sides = {f"p{i}": {"LEFT"} for i in range(30)}
    first = split_patients(sides, SplitFractions(), seed=1)
    assert first == split_patients(
        dict(reversed(list(sides.items()))), SplitFractions(), seed=1
    )  # input order irrelevant
    assert first != split_patients(sides, SplitFractions(), seed=2)
