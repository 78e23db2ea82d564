"""A patch discriminator (Isola et al. 2017's PatchGAN) for the autoencoder, as Esser et al. 2021 and
Rombach et al. 2022 train theirs, and for a distillation's student, as Sauer et al. 2023 (ADD) do.

L1, MS-SSIM and the amplitude spectrum all score a reconstruction against its own slice, so
whatever the latent cannot pin down comes back as a smooth average of what it could be. A
discriminator instead judges whether each overlapping patch (70 px across with three halvings)
looks like a patch of a real slice, so the decoder is asked for texture of the data's kind, not
for its mean. Its hinge loss and the adaptive weight that balances its gradient against the
reconstruction loss's at the decoder's last layer are Esser et al.'s (sec. 3.2, eq. 7).

A distillation's regression losses have the same failing: where the student cannot follow its
teacher exactly, its x̂_0 drifts towards a blurred mean. With `distill.adversarial_weight` the
discriminator judges the student's x̂_0 against the clean training images, balanced against the
distillation loss by the same adaptive weight taken at x̂_0 itself (any network has one).

The discriminator trains only while its generator does (`model.vae.adversarial_weight` > 0 from
epoch `adversarial_start`, or `distill.adversarial_weight` > 0): it is kept in the training state
and in checkpoints, so a resumed run continues it exactly, and it is not part of what sampling or
latent runs load.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kneegen.engine.companion import Companion, companion_fields
from kneegen.engine.device import Compute
from kneegen.engine.distributed import SINGLE, Distributed

HALVINGS = 3  # strided layers: a 70-px receptive field, the PatchGAN of pix2pix and taming
SMALLEST_SIDE = 24  # the shortest input side it judges at all: one patch (side/8 − 2 with the two last layers)
KERNEL = 4
SLOPE = 0.2  # LeakyReLU's negative slope
BETAS = (0.5, 0.9)  # Adam's, as Esser et al. train both players: a short memory suits a moving target
WEIGHT_RANGE = (0.0, 1e4)  # the adaptive weight's clamp (Esser et al.'s code)
GRADIENT_EPS = 1e-4  # keeps the adaptive weight finite while the adversarial gradient is ~0


class PatchDiscriminator(nn.Module):
    """(B, C, H, W) images → (B, 1, h, w) logits, one per overlapping patch: positive = real.
    GroupNorm instead of the original BatchNorm, so a patch's logit does not depend on the other
    images of the batch (and data-parallel processes need no synchronised statistics)."""

    def __init__(self, image_channels: int, channels: int) -> None:
        super().__init__()
        widths = [channels * min(2**level, 8) for level in range(HALVINGS + 1)]  # 64, 128, 256, 512
        layers: list[nn.Module] = [
            nn.Conv2d(image_channels, widths[0], KERNEL, stride=2, padding=1),
            nn.LeakyReLU(SLOPE),
        ]
        for level in range(1, HALVINGS + 1):
            stride = 2 if level < HALVINGS else 1
            layers += [
                nn.Conv2d(widths[level - 1], widths[level], KERNEL, stride=stride, padding=1, bias=False),
                nn.GroupNorm(min(32, widths[level]), widths[level]),
                nn.LeakyReLU(SLOPE),
            ]
        layers.append(nn.Conv2d(widths[-1], 1, KERNEL, stride=1, padding=1))
        self.layers = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        return self.layers(x)


def discriminator_loss(real_logits: Tensor, fake_logits: Tensor) -> Tensor:
    """Per image (B,): the hinge loss, mean over patches of relu(1 − D(x)) + relu(1 + D(x̂)); zero
    once real patches score ≥ 1 and reconstructed ones ≤ −1."""
    real = F.relu(1.0 - real_logits.float()).mean(dim=(1, 2, 3))
    fake = F.relu(1.0 + fake_logits.float()).mean(dim=(1, 2, 3))
    return real + fake


def generator_loss(fake_logits: Tensor) -> Tensor:
    """Per image (B,): −mean over patches of D(x̂), lower the more real the reconstruction looks."""
    return -fake_logits.float().mean(dim=(1, 2, 3))


def adaptive_weight(reconstruction_loss: Tensor, adversarial_loss: Tensor, last_layer: Tensor) -> Tensor:
    """λ = ‖∇_w L_rec‖ / (‖∇_w L_adv‖ + ε) at a tensor w both losses pass through (Esser et al. eq. 7
    take the decoder's last weight): the adversarial gradient is made as large as the
    reconstruction's wherever training stands, so one `adversarial_weight` means the same early
    (large reconstruction errors) and late."""
    reconstruction_grad = torch.autograd.grad(reconstruction_loss, last_layer, retain_graph=True)[0]
    adversarial_grad = torch.autograd.grad(adversarial_loss, last_layer, retain_graph=True)[0]
    weight = reconstruction_grad.norm() / (adversarial_grad.norm() + GRADIENT_EPS)
    return weight.clamp(*WEIGHT_RANGE).detach()


@dataclass(kw_only=True)
class Adversary(Companion):
    """The discriminator (with its optimiser and loss scaler, a Companion), and the real and
    reconstructed crops of the current step's micro-batches, which its own step then trains on.
    Its epoch loss is the mean hinge loss: 2 = undecided, 0 = telling every patch apart."""

    weight: float  # model.vae.adversarial_weight, or distill.adversarial_weight
    start_epoch: int  # model.vae.adversarial_start; a distillation's judges from the start (0)
    pending: list[tuple[Tensor, Tensor]] = field(default_factory=list)

    def active(self, epoch: int) -> bool:
        return epoch >= self.start_epoch

    def generator_term(
        self, real: Tensor, reconstruction: Tensor, reconstruction_loss: Tensor, last_layer: Tensor
    ) -> Tensor:
        """Per image (B,): weight · λ · the generator loss of `reconstruction`, whose gradient
        reaches the generator only (the discriminator's own weights are frozen outside `step`);
        λ is balanced at `last_layer`. The images are kept for the discriminator's step."""
        with self.compute.autocast():
            fake_logits = self.network(reconstruction)  # (B, 1, h, w)
        adversarial = generator_loss(fake_logits)
        balance = adaptive_weight(reconstruction_loss.mean(), adversarial.mean(), last_layer)
        self.pending.append((real.detach(), reconstruction.detach()))
        return self.weight * balance * adversarial

    def step(self, lr: float, batch_images: int, dist: Distributed = SINGLE, skipped: bool = False) -> float:
        """One optimiser step on this step's crops (the hinge loss, the mean over the global batch
        as the autoencoder's); returns that mean loss. A `skipped` step (a non-finite loss or
        gradient of the autoencoder's) drops its crops instead, as they may hold NaN; a non-finite
        loss of its own leaves its weights as they were."""
        pairs, self.pending = self.pending, []
        if skipped:
            return float("nan")
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.optimizer.zero_grad(set_to_none=True)
        self.network.requires_grad_(True)
        loss_sum = torch.zeros((), device=self.compute.device)
        for k, (real, fake) in enumerate(pairs):
            with dist.no_sync(self.train_network, sync=k == len(pairs) - 1), self.compute.autocast():
                # One call for both halves: DDP counts one forward per backward, and GroupNorm keeps images apart.
                real_logits, fake_logits = self.train_network(torch.cat([real, fake])).chunk(2)
                per_image = discriminator_loss(real_logits, fake_logits)  # (b,)
                self.scaler.scale(per_image.sum() * (dist.world_size / batch_images)).backward()
            loss_sum += per_image.detach().sum()
        mean_loss = dist.sum(loss_sum) / batch_images
        if math.isfinite(mean_loss):
            self.epoch_losses.append(mean_loss)
            self.scaler.step(self.optimizer)
        self.scaler.update()
        self.network.requires_grad_(False)
        return mean_loss


def make_adversary(
    image_channels: int, channels: int, weight: float, start_epoch: int, lr: float, compute: Compute, dist: Distributed
) -> Adversary:
    """A fresh discriminator (from the global RNG, seeded by the caller), frozen until its first step."""
    network = PatchDiscriminator(image_channels, channels).to(compute.device, memory_format=compute.memory_format)
    optimizer = torch.optim.Adam(network.parameters(), lr=lr, betas=BETAS)
    return Adversary(**companion_fields(network, optimizer, compute, dist), weight=weight, start_epoch=start_epoch)
