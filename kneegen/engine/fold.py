"""The patch fold's own frequencies, taken out of a network's estimate of the clean image.

A network that folds p×p pixels into channels (`model.unet.patch_size` p) writes each of the p²
positions inside a patch through its own output channel. Early in training those channels disagree
by an offset that is the same across the whole image but differs from image to image: a pixel
alternation that repeats every p pixels. All its energy sits in the p² − 1 Fourier components at
the fold frequencies (multiples of H/p and W/p, zero excepted), where real slices have almost none:
on the 64² phantom, samples of an 11-epoch patch-2 model held 30–2,500× the held-out slices' power at
the three Nyquist components, and the rest of their spectrum within 1.2×. Taking those few
components out of each x̂₀ removes the pattern and leaves every other frequency as it was.
"""

from __future__ import annotations

from torch import Tensor


def without_fold(x: Tensor, patch: int) -> Tensor:
    """(B, C, H, W) → the same less its Fourier components at the fold frequencies of `patch`:
    each of the p² sub-grids x[..., i::p, j::p] is shifted to the image's own mean. Identity for
    patch 1, or where H or W is no multiple of the patch (no fold is aligned with such an image)."""
    height, width = x.shape[-2:]
    if patch == 1 or height % patch or width % patch:
        return x
    grid = x.unflatten(-1, (width // patch, patch)).unflatten(-3, (height // patch, patch))  # (B, C, H/p, p, W/p, p)
    offsets = grid.mean(dim=(-4, -2), keepdim=True)  # (B, C, 1, p, 1, p): each sub-grid's mean
    offsets = offsets - offsets.mean(dim=(-3, -1), keepdim=True)
    return (grid - offsets).flatten(-2).flatten(-3, -2)
