"""Train / val / test by patient: deterministic for a seed, stratified by knee side.

Neighbouring slices of one knee are near-duplicates, so a per-file split leaks; the patient is
the unit (which also keeps each volume whole). Within each stratum of patients (left knees
only, right knees only, both or unknown) patients are shuffled with the seed and dealt out by
largest remainder, so the sides stay balanced across splits when there are enough patients.
"""

from __future__ import annotations

import random
from collections import Counter, defaultdict
from dataclasses import dataclass

from kneegen.errors import KneegenError

SPLITS = ("train", "val", "test")


@dataclass(frozen=True)
class SplitFractions:
    train: float = 0.8
    val: float = 0.1
    test: float = 0.1

    @classmethod
    def held_out(cls, val: float, test: float) -> SplitFractions:
        """Train takes the rest, rounded so that 1 − 0.9 − 0.1 is 0 rather than −2.8e-17."""
        return cls(round(1.0 - val - test, 12) + 0.0, val, test)  # + 0.0 turns −0.0 into 0.0

    def as_dict(self) -> dict[str, float]:
        return {"train": self.train, "val": self.val, "test": self.test}

    def check(self) -> None:
        """Fractions sum to 1, each between 0 and 1, and train and val are not empty."""
        if abs(sum(self.as_dict().values()) - 1.0) > 1e-6 or not 0.0 <= self.train <= 1.0:
            raise KneegenError(
                f"split fractions train {self.train:g} + val {self.val:g} + test {self.test:g} must add up to 1, "
                "each between 0 and 1: lower --val-fraction / --test-fraction (train takes the rest)"
            )
        for name in ("val", "test"):
            if not 0.0 <= self.as_dict()[name] <= 1.0:
                raise KneegenError(f"--{name}-fraction {self.as_dict()[name]:g}: must be between 0 and 1")
        if self.train == 0:
            raise KneegenError(
                f"--val-fraction {self.val:g} and --test-fraction {self.test:g} leave no patients to train on: "
                "lower them (train takes the rest)"
            )
        if self.val == 0:
            raise KneegenError("training needs patients in both train and val: give --val-fraction between 0 and 1")


def split_patients(patient_sides: dict[str, set[str]], fractions: SplitFractions, seed: int) -> dict[str, str]:
    """Patient → split name, for patients given with the set of knee sides they have slices of."""
    fractions.check()
    wanted = [name for name, value in fractions.as_dict().items() if value > 0]
    counts = split_counts(len(patient_sides), fractions)
    empty = [name for name in wanted if counts[name] == 0]
    if empty:
        n = len(patient_sides)
        advice = (
            f"a patient-level split into {', '.join(wanted)} needs at least {len(wanted)} patients"
            + ("; or set --test-fraction 0" if "test" in wanted else "")
            if n < len(wanted)
            else f"raise --{empty[0]}-fraction or add patients"
        )
        raise KneegenError(
            f"{n} patients cannot fill the {', '.join(empty)} split at fractions {fractions.as_dict()}: {advice}"
        )

    # Deal each stratum out in turn; a running tally keeps the totals at `counts`.
    rng = random.Random(seed)
    strata: dict[str, list[str]] = defaultdict(list)
    for patient in sorted(patient_sides):
        strata[stratum(patient_sides[patient])].append(patient)
    assignment: dict[str, str] = {}
    for key in sorted(strata):
        patients = strata[key]
        rng.shuffle(patients)
        for patient, split in zip(patients, deal(len(patients), fractions, counts, Counter(assignment.values()))):
            assignment[patient] = split
    return assignment


def split_counts(n_patients: int, fractions: SplitFractions) -> dict[str, int]:
    """Patients per split by largest remainder; a split with a positive fraction gets ≥ 1 if possible."""
    shares = {name: value * n_patients for name, value in fractions.as_dict().items()}
    counts = {name: int(share) for name, share in shares.items()}
    by_remainder = sorted(shares, key=lambda name: (shares[name] - counts[name], shares[name]), reverse=True)
    for name in by_remainder[: n_patients - sum(counts.values())]:
        counts[name] += 1
    for name, value in fractions.as_dict().items():  # a tiny held-out split still gets one patient
        donor = max(counts, key=counts.__getitem__)
        if value > 0 and counts[name] == 0 and counts[donor] > 1:
            counts[name], counts[donor] = 1, counts[donor] - 1
    return counts


def deal(n: int, fractions: SplitFractions, totals: dict[str, int], taken: Counter) -> list[str]:
    """Splits for `n` more patients: proportional to the fractions, never past a split's total."""
    shares = {name: value * n for name, value in fractions.as_dict().items()}
    room = {name: totals[name] - taken[name] for name in SPLITS}
    dealt: list[str] = []
    for _ in range(n):
        # The split furthest below its share of this stratum that still has room.
        given = Counter(dealt)
        name = max((s for s in SPLITS if room[s] > given[s]), key=lambda s: (shares[s] - given[s], -SPLITS.index(s)))
        dealt.append(name)
    return dealt


def stratum(sides: set[str]) -> str:
    """LEFT, RIGHT, or BOTH/UNKNOWN: the patient's knee-side profile."""
    known = sides - {None}  # type: ignore[arg-type]
    return "+".join(sorted(known)) if known else "unknown"
