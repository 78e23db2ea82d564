"""The latent space of a trained autoencoder, as latent diffusion uses it (Rombach et al. 2022).

Latents are the encoder's posterior means times `scale`, which makes the training split's latents
unit-variance (sec. 4.3.2 of the paper), so the diffusion schedule fits them as it fits pixels in
[-1, 1]; decoding divides the scale out again. The autoencoder is named by the content hash of
the weights it uses, so a latent model and its latent cache can tell when they are given another.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from kneegen.config import ModelConfig, config_from_mapping
from kneegen.engine.autoencoder import Autoencoder, AutoencoderConfig, latent_shape
from kneegen.engine.checkpoint import OTHER_CHECKPOINT, load_checkpoint, load_weights
from kneegen.engine.device import Compute
from kneegen.engine.network import network_settings, size_multiple
from kneegen.errors import KneegenError

DIGEST_CHARS = 16  # hex characters of the SHA-256 kept: enough to tell autoencoders apart


@dataclass
class LatentSpace:
    autoencoder: Autoencoder  # in eval mode, on the compute device
    digest: str  # content hash of its weights
    path: Path  # the checkpoint it came from
    scale: float = 1.0  # latents = posterior mean × scale; set from the training split's latents

    @property
    def settings(self) -> AutoencoderConfig:
        return self.autoencoder.cfg

    def shape_of(self, image_shape: tuple[int, int]) -> tuple[int, int, int]:
        """(C, h, w) of the latent of an (H, W) image."""
        return latent_shape(self.settings, image_shape)

    def encode(self, images: Tensor, compute: Compute) -> Tensor:
        """(B, 1, H, W) in [-1, 1] → (B, C, H/f, W/f) scaled latents, float32."""
        with torch.inference_mode(), compute.autocast():
            means = self.autoencoder.encode(images.to(compute.device, memory_format=compute.memory_format))
        return means.float() * self.scale

    def decode(self, latents: Tensor, compute: Compute) -> Tensor:
        """(B, C, h, w) scaled latents → (B, 1, h·f, w·f) images, float32 (not clamped)."""
        with torch.inference_mode(), compute.autocast():
            images = self.autoencoder.decode((latents / self.scale).to(memory_format=compute.memory_format))
        return images.float()


def load_latent_space(path: Path, compute: Compute, source: str) -> LatentSpace:
    """The autoencoder of the kneegen checkpoint `path` (its EMA weights when it had an EMA);
    `source` names what asked for it (a config key, a checkpoint) in every error."""
    if not path.is_file():
        raise KneegenError(
            f"{source}: autoencoder checkpoint {path} not found: give the best.pt of an autoencoder run "
            f"(kneegen train --config examples/autoencoder-256.yaml), or put back the one a model was trained with"
        )
    payload = load_checkpoint(path)
    if not isinstance(payload.get("config"), dict) or "model" not in payload:
        raise KneegenError(f"{source}: {path} is not a training checkpoint: give the best.pt of an autoencoder run")
    config = config_from_mapping(payload["config"], str(path))
    if config.model.arch != "vae":
        raise KneegenError(
            f"{source}: {path} is a {config.model.arch} checkpoint, not an autoencoder's (model.arch: vae): "
            f"give the best.pt of an autoencoder run"
        )
    _, settings = network_settings(config.model, str(path))
    weights = payload["ema"] if payload["ema"] is not None else payload["model"]
    autoencoder = Autoencoder(settings)
    load_weights(autoencoder, weights, f"{source}: {path}", OTHER_CHECKPOINT)
    autoencoder = autoencoder.to(compute.device, memory_format=compute.memory_format).eval()
    return LatentSpace(autoencoder, weights_digest(weights), path)


def check_latent_size(space: LatentSpace, model: ModelConfig, image_shape: tuple[int, int], source: str) -> None:
    """Refuse, in pixels, an image size the autoencoder cannot halve f times exactly, or whose
    latent the denoiser cannot downsample: both are fixed by preparing the data at another size."""
    multiple = space.settings.factor * size_multiple(model)
    height, width = image_shape
    if height % multiple or width % multiple:
        fit = "x".join(str(max(1, round(side / multiple)) * multiple) for side in image_shape)
        raise KneegenError(
            f"{source}: images of {height}x{width} do not fit latent diffusion with autoencoder factor "
            f"{space.settings.factor} and model.arch={model.arch} (the pixel size must be a multiple of {multiple}): "
            f"prepare the data with --size {fit}"
        )


def weights_digest(weights: dict[str, Tensor]) -> str:
    """SHA-256 of the parameter names and bytes, so re-saving the same weights keeps the digest."""
    digest = hashlib.sha256()
    for name in sorted(weights):
        digest.update(name.encode())
        digest.update(weights[name].detach().cpu().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:DIGEST_CHARS]


def check_same_autoencoder(space: LatentSpace, expected_digest: str, source: str) -> None:
    """Refuse an autoencoder other than the one a latent model was trained with."""
    if space.digest != expected_digest:
        raise KneegenError(
            f"{source} was trained with autoencoder {expected_digest}, but {space.path} holds autoencoder "
            f"{space.digest} (different weights): give model.autoencoder the checkpoint it was trained with"
        )
