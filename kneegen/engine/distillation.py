"""Progressive distillation (Salimans & Ho 2022, "Progressive Distillation for Fast Sampling of
Diffusion Models", Alg. 2): a student learns to take in one DDIM step what its teacher takes in two.

Round k's teacher samples with 2N deterministic DDIM steps on the grid t_i = T(2N − i)/(2N) − 1;
its student, started from the teacher's weights, is trained so that one DDIM step t → s on the
grid of N steps lands where the teacher's two steps t → t′ → s land. The student then teaches the
next round, so each round halves the steps: 16 → 8 → 4 → 2 → 1. The grids are nested (the N-step
grid is every second point of the 2N-step one), and the last step of every grid lands on the
clean image (s = −1, ᾱ = 1), where the DDIM step returns x̂_0 itself.

With the v-parameterisation a one-step student stays well defined at t = T − 1, where x_t is all
noise (sec. 4 of the paper); the loss is on x̂_0 with weight max(SNR_t, 1), the paper's
"truncated SNR" weighting.

A teacher that samples with autoguidance (Karras et al. 2024) teaches its guided steps: round 0's
targets come from its network and its guide (`distill.autoguidance`), so the students learn the
guided sampler in one network call per step, as Meng et al. 2023 distil classifier-free guidance.

Round 0's teacher may integrate to second order for free (`distill.teacher_solver: dpm++2m`): its
second step adds DPM-Solver++(2M)'s multistep term from the first step's x̂_0. Measured: the
student gains 1.3–1.6 FID of ~59, within a seed's spread (README, "Few-step sampling").

`distill.method: consistency` trains instead in one stage a consistency model (Song et al. 2023,
"Consistency Models", Alg. 2, consistency distillation): on the teacher's grid of N steps, the
student's x̂_0 at (x_t, t) is pulled towards its own x̂_0, without gradient, where the teacher's one
deterministic step t → s lands (at the clean end, towards the teacher's x̂_0 itself). Consistent
along the teacher's ODE, its x̂_0 from any point of a trajectory is the trajectory's end, so it
samples in any number of steps (`consistency` sampler: x̂_0, fresh noise to the next level, …).

`distill.method: dmd` matches distributions instead (engine/fake_score.py, Yin et al. 2024): the
student's x̂_0 on its own grid of N steps is moved where the teacher, diffusing it afresh, finds
the data denser than a fake score trained on the student's samples does. It samples as a
consistency student does: x̂_0, fresh noise to the next level of its grid, x̂_0 again.

Any method's student may also be judged by a patch discriminator (`distill.adversarial_weight`,
engine/adversary.py), which is why `Distillation.loss` hands back the x̂_0 it scored.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from kneegen.config import DistillMethod, Prediction, RunConfig, TeacherSolver
from kneegen.engine.checkpoint import load_training_checkpoint, load_weights
from kneegen.engine.companion import companion_fields
from kneegen.engine.denoiser import make_denoiser
from kneegen.engine.device import Compute
from kneegen.engine.distributed import SINGLE, Distributed
from kneegen.engine.fake_score import FakeScore, MatchingDraws, distribution_matching_loss, draw_matching
from kneegen.engine.loss import per_image_loss
from kneegen.engine.network import network_settings
from kneegen.engine.optimizer import make_optimizer
from kneegen.engine.samplers import Denoiser, second_order_term, trailing_timesteps
from kneegen.engine.schedule import Schedule
from kneegen.engine.teacher_pairs import TeacherPairs, draw_teacher_pairs
from kneegen.errors import KneegenError

CLEAN = -1  # the timestep after a grid's last one: ᾱ_{−1} = 1, the data itself


def distillation_rounds(teacher_steps: int, steps: int) -> int:
    """How many halvings take `teacher_steps` (round 0's teacher) to `steps` (the config checks
    that it is a power of two)."""
    return (teacher_steps // steps).bit_length() - 1


def halvings(steps: int) -> list[int]:
    """The step counts a progressive student of `steps` can be distilled further to, one round
    per halving: 12 → [6, 3]; none for an odd count."""
    counts = []
    while steps % 2 == 0:
        steps //= 2
        counts.append(steps)
    return counts


@dataclass
class Distillation:
    """The teacher of the current round and where the rounds stand; kept in the training state
    (and in checkpoints: after round 0 the teacher is an earlier student, found nowhere else)."""

    teacher: nn.Module  # frozen, in eval mode
    schedule: Schedule
    prediction: Prediction
    compute: Compute
    clip: bool  # clip the teacher's x̂_0 to the data range, as its sampler does (pixels, not latents)
    teacher_steps: int  # DDIM steps of round 0's teacher
    rounds: int
    trained_epochs: int  # the epochs of the diffusion model at the root of the lineage (a student's teacher's …)
    round: int = 0
    round_start: int = 0  # the optimizer step at which the current round began
    guide: nn.Module | None = None  # round 0's teacher's autoguidance guide (train.guide_at), frozen
    autoguidance: float = 1.0  # its w: round 0's teacher steps as the teacher samples, the students learn that
    autoguidance_sigma_max: float = math.inf  # ... and the noise levels it guides at
    # Round 0's two steps: plain DDIM, or the second with DPM-Solver++(2M)'s term.
    teacher_solver: TeacherSolver = "ddim"
    method: DistillMethod = "progressive"
    student: nn.Module | None = None  # the network being trained: consistency's target, dmd's backward simulation
    steps: int = 0  # consistency: the steps its sampler takes by default (it takes any)
    fake_score: FakeScore | None = None  # dmd: the denoiser of the student's own samples
    regression_weight: float = 0.0  # dmd: of the first step's regression on the teacher's ODE pairs
    anchor_pairs: int = 0  # dmd: how many pairs to draw
    conditions: int = 0  # the model's conditions K: the pairs are drawn with all of them unknown
    anchor: TeacherPairs | None = None  # dmd: those pairs, once drawn (or restored from a checkpoint)
    backward_simulation: bool = False  # dmd: later steps learn from the student's own earlier steps (DMD2)
    fold: int = 1  # a pixel network's patch size, whose fold frequencies its sampler takes out of x̂_0

    @property
    def single_stage(self) -> bool:
        """Consistency and distribution matching train one student in one stage; progressive in rounds."""
        return self.method != "progressive"

    @property
    def student_steps(self) -> int:
        """The steps the student samples in: progressive, N of the current round, the only count
        it learns; consistency, the default of a sampler that takes any."""
        if self.single_stage:
            return self.steps
        return self.teacher_steps >> (self.round + 1)

    @property
    def grid_steps(self) -> int:
        """The steps of the grid the student's timesteps are drawn from: progressive and dmd, its own;
        consistency, the teacher's, whose one step each pair of neighbours is."""
        return self.teacher_steps if self.method == "consistency" else self.student_steps

    def describe_round(self) -> str:
        if self.method == "consistency":
            return f"consistency on the teacher's {self.teacher_steps} steps"
        if self.method == "dmd":
            return f"distribution matching on {self.steps} steps"
        return f"round {self.round + 1}/{self.rounds}: {self.student_steps} steps"

    def round_end(self, total_steps: int) -> int:
        """The step at which the current round ends: rounds share the run's `total_steps` evenly."""
        return round(total_steps * (self.round + 1) / self.rounds)

    def round_over(self, step: int, total_steps: int) -> bool:
        """Whether the current round, not the last, has reached its end at `step`."""
        return self.round < self.rounds - 1 and step >= self.round_end(total_steps)

    def span(self, total_steps: int) -> tuple[int, int]:
        """(first step, steps) of the current round, over which its LR warms up and cools down;
        the last round runs to the end of the run."""
        end = self.round_end(total_steps) if self.round < self.rounds - 1 else total_steps
        return self.round_start, max(1, end - self.round_start)

    def draw(self, batch: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        """(B,) student timesteps, uniform over its grid (`grid_steps`), and (B,) fp32 loss weights
        max(SNR_t, 1). For consistency too: with Song et al.'s λ ≡ 1 the large x̂_0 errors of high
        noise levels outweighed the rest and the student lost even the last step, whose target is
        the teacher's own x̂_0 (x̂_0 error there 5× the teacher's, samples pure noise; README)."""
        grid = torch.tensor(trailing_timesteps(self.schedule.timesteps, self.grid_steps))
        t = grid[torch.randint(0, len(grid), (batch,), generator=generator)]
        return t, self.weight(t)

    def draw_matching(
        self,
        t: Tensor,
        shape: tuple[int, ...],
        generator: torch.Generator,
        updates: int | None = None,
        anchored: bool = True,
        simulated: bool = True,
    ) -> MatchingDraws | None:
        """dmd: the levels and noise of a global batch's distribution matching, with those of the
        fake score's updates (`updates`, default its own count), (`anchored`) a teacher pair for
        each row at the first step T − 1 of the student's grid t (B,) when it has pairs, and
        (`simulated`, with backward simulation) the noise of the student's own sampling up to each
        row's step; None for other methods."""
        if self.fake_score is None:
            return None
        updates = self.fake_score.updates if updates is None else updates
        first = t == self.schedule.timesteps - 1
        pairs = len(self.anchor) if self.anchor is not None and anchored else 0
        simulated_steps = self.steps - 1 if self.backward_simulation and simulated else 0
        return draw_matching(len(t), shape, updates, self.schedule.timesteps, generator, first, pairs, simulated_steps)

    @property
    def has_regression_anchor(self) -> bool:
        """Whether the first step is regressed on teacher pairs (dmd with a regression weight)."""
        return self.method == "dmd" and self.regression_weight > 0

    @property
    def wants_anchor(self) -> bool:
        """Whether teacher pairs are asked for and not drawn yet (a resumed run has its own)."""
        return self.has_regression_anchor and self.anchor is None

    def draw_anchor(self, image_shape: tuple[int, ...], seed: int, on_batch: Callable[[int], None]) -> None:
        """The teacher's ODE images of `anchor_pairs` noises of the student's input shape (C, H, W)."""
        unknown = torch.full((1, self.conditions), math.nan) if self.conditions else None
        teacher = self.teacher_denoiser(unknown)
        self.anchor = draw_teacher_pairs(
            teacher, self.schedule, self.anchor_pairs, image_shape, seed, self.compute.device, on_batch
        )

    def anchored_inputs(
        self, x_t: Tensor, conditions: Tensor | None, draws: MatchingDraws | None
    ) -> tuple[Tensor, Tensor | None]:
        """x_t (B, C, H, W) with each first-step row that drew a teacher pair replaced by the pair's
        noise, as the student's first step meets noise when it samples; its conditions unknown, as
        the pair was drawn."""
        if draws is None or self.anchor is None or not bool((rows := draws.pair >= 0).any()):
            return x_t, conditions
        x_t = x_t.clone()
        x_t[rows] = self.anchor.noise[draws.pair[rows].cpu()].to(x_t.device, x_t.dtype)
        if conditions is not None:
            conditions = conditions.clone()
            conditions[rows] = math.nan
        return x_t, conditions

    def simulated_inputs(
        self, x_t: Tensor, t: Tensor, noise: Tensor, conditions: Tensor | None, draws: MatchingDraws | None
    ) -> Tensor:
        """DMD2's backward simulation: x_t (B, C, H, W) with each row past the first step replaced
        by what the student meets there when it samples. From the draws' starting noise the student
        runs its own sampler (x̂_0, fresh noise to the next level) without gradient up to the row's
        step t, the last x̂_0 noised to t with the row's ε `noise`. A student trained on noised
        slices learns its later steps from inputs its earlier steps never give it."""
        if draws is None or draws.path.shape[1] == 0:
            return x_t
        grid = trailing_timesteps(self.schedule.timesteps, self.steps)
        level = torch.tensor([grid.index(value) for value in t.tolist()], device=t.device)  # (B,) step of each row
        if not bool((level > 0).any()):
            return x_t
        assert self.student is not None  # set by start_distillation for this method
        was_training = self.student.training
        current = draws.path[:, 0].to(x_t.dtype, copy=True)  # (B, C, H, W): every row's x at the first step, pure noise
        try:
            for step in range(1, int(level.max()) + 1):
                rows = level >= step  # the rows that sample on past this step
                denoise = make_denoiser(
                    self.student,
                    self.schedule,
                    self.prediction,
                    self.compute,
                    conditions[rows] if conditions is not None else None,
                    clip=self.clip,
                    fold=self.fold,  # as its sampler steps
                )
                count = int(rows.sum())
                x0, _ = denoise(current[rows], torch.full((count,), grid[step - 1], device=t.device))
                arrived = (level[rows] == step).view(-1, *[1] * (x_t.dim() - 1))  # at their own step: their ε
                fresh = torch.where(arrived, noise[rows], draws.path[rows, min(step, self.steps - 2)])
                here = torch.full((count,), grid[step], device=t.device)
                current[rows] = self.schedule.add_noise(x0.float(), fresh, here).to(current.dtype)
        finally:
            self.student.train(was_training)
        simulated = (level > 0).view(-1, *[1] * (x_t.dim() - 1))
        return torch.where(simulated, current.to(x_t.device), x_t).contiguous(memory_format=self.compute.memory_format)

    def weight(self, t: Tensor) -> Tensor:
        """(B,) fp32 loss weights max(SNR_t, 1): the x̂_0 error counts as an ε error would at low
        noise, and no less than itself at high noise (the paper's truncated-SNR weighting); 1 for
        distribution matching, whose gradient has one size at every level already."""
        if self.method == "dmd":
            return torch.ones(t.shape, dtype=torch.float32, device=t.device)
        return self.schedule.snr(t).clamp(min=1.0).float()

    def loss(
        self, output: Tensor, x_t: Tensor, t: Tensor, conditions: Tensor | None, draws: MatchingDraws | None = None
    ) -> tuple[Tensor, Tensor]:
        """(B,) squared error between the student's x̂_0 (from its network `output` at (x_t, t)) and
        its target: the teacher's two-step x̃ (progressive), or its own x̂_0 one teacher step on
        (consistency); or (dmd, with the batch's `draws`) the distribution-matching loss; and that
        x̂_0 (B, C, H, W), which a discriminator may judge and a fake score learn."""
        teacher = self.teacher_denoiser(conditions)
        if self.method == "dmd":
            return self.matching_loss(teacher, output, x_t, t, conditions, draws)
        if self.method == "consistency":
            target = self.consistency_target(teacher, x_t, t, conditions)
        else:
            second_order = self.round == 0 and self.teacher_solver == "dpm++2m"  # later teachers step as learnt
            target = two_step_target(teacher, x_t, t, self.teacher_grid_after(t), self.schedule, second_order)
        x0, _ = self.schedule.to_x0_eps(output.float(), x_t, t, self.prediction)
        return per_image_loss(x0, target.clone(), "l2"), x0  # clone: out of inference mode, autograd may keep it

    def teacher_denoiser(self, conditions: Tensor | None) -> Denoiser:
        """The current round's teacher as it steps: autoguided in round 0 (later teachers are
        students, guided already), its x̂_0 clipped as its sampler clips it."""
        return make_denoiser(
            self.teacher,
            self.schedule,
            self.prediction,
            self.compute,
            conditions,
            clip=self.clip,
            guide=self.guide if self.round == 0 else None,
            autoguidance=self.autoguidance,
            autoguidance_sigma_max=self.autoguidance_sigma_max,
        )

    def matching_loss(
        self,
        teacher: Denoiser,
        output: Tensor,
        x_t: Tensor,
        t: Tensor,
        conditions: Tensor | None,
        draws: MatchingDraws | None,
    ) -> tuple[Tensor, Tensor]:
        """The distribution-matching loss of the student's x̂_0 at (x_t, t), judged by the teacher
        and the fake score at the draws' τ and ε; plus, for the rows that started from a teacher
        pair's noise, `regression_weight` × the squared error to the teacher's image of it."""
        assert self.fake_score is not None and draws is not None  # set by start_distillation, drawn per batch
        x0, _ = self.schedule.to_x0_eps(output.float(), x_t, t, self.prediction)
        fake = make_denoiser(
            self.fake_score.network, self.schedule, self.prediction, self.compute, conditions, clip=self.clip
        )
        per_image = distribution_matching_loss(x0, teacher, fake, draws.tau, draws.noise, self.schedule)
        rows = draws.pair >= 0
        if self.anchor is not None and bool(rows.any()):
            images = self.anchor.images[draws.pair[rows].cpu()].to(x0.device)
            regression = torch.zeros_like(per_image)
            regression[rows] = per_image_loss(x0[rows], images, "l2")
            per_image = per_image + self.regression_weight * regression
        return per_image, x0

    def consistency_target(self, teacher: Denoiser, x_t: Tensor, t: Tensor, conditions: Tensor | None) -> Tensor:
        """The student's own x̂_0 where the teacher's step from (x_t, t) lands, in eval mode (as it
        samples) and without gradient, its training mode given back after."""
        assert self.student is not None  # set by start_distillation for this method
        was_training = self.student.training
        student = make_denoiser(self.student, self.schedule, self.prediction, self.compute, conditions, clip=self.clip)
        try:
            return one_step_consistency_target(teacher, student, x_t, t, self.next_on_grid(t), self.schedule)
        finally:
            self.student.train(was_training)

    def next_on_grid(self, t: Tensor) -> Tensor:
        """(B,) the timestep after each t on the grid of `grid_steps`, CLEAN after the last."""
        grid = trailing_timesteps(self.schedule.timesteps, self.grid_steps) + [CLEAN]
        position = {value: i for i, value in enumerate(grid[:-1])}
        return torch.tensor([grid[position[value] + 1] for value in t.tolist()], device=t.device)

    def teacher_grid_after(self, t: Tensor) -> tuple[Tensor, Tensor]:
        """For each student timestep t: the teacher's midpoint t′ and the student's next step s."""
        student = trailing_timesteps(self.schedule.timesteps, self.student_steps)
        teacher = trailing_timesteps(self.schedule.timesteps, 2 * self.student_steps)
        position = {value: i for i, value in enumerate(student)}
        middle = torch.tensor([teacher[2 * position[value] + 1] for value in t.tolist()], device=t.device)
        return middle, self.next_on_grid(t)

    def begin_next_round(self, network: nn.Module, step: int) -> None:
        """The student's weights become the next round's teacher (and its student's start)."""
        self.teacher.load_state_dict(network.state_dict())
        self.round += 1
        self.round_start = step

    def state_dict(self) -> dict[str, object]:
        """With the student's steps, which sampling from the checkpoint needs."""
        return {
            "teacher": self.teacher.state_dict(),
            "round": self.round,
            "round_start": self.round_start,
            "steps": self.student_steps,
            "method": self.method,
            "trained_epochs": self.trained_epochs,
            "fake_score": self.fake_score.state_dict() if self.fake_score is not None else None,
            "anchor": self.anchor.state_dict() if self.anchor is not None else None,
        }

    def load_state_dict(self, state: dict[str, object]) -> None:
        self.teacher.load_state_dict(state["teacher"])  # type: ignore[arg-type]
        self.round, self.round_start = int(state["round"]), int(state["round_start"])  # type: ignore[call-overload]
        self.trained_epochs = int(state["trained_epochs"])  # type: ignore[call-overload]
        if self.fake_score is not None:
            self.fake_score.load_state_dict(state["fake_score"])  # type: ignore[arg-type]
        if state.get("anchor") is not None:
            self.anchor = TeacherPairs(**state["anchor"])  # type: ignore[arg-type]


def start_distillation(
    network: nn.Module, cfg: RunConfig, compute: Compute, dist: Distributed = SINGLE
) -> tuple[Distillation, dict]:
    """Load the teacher checkpoint of `distill.teacher` (its EMA weights, as it samples) into the
    student `network` and into a frozen copy, round 0's teacher (and for dmd into the fake score,
    which trains); also return the teacher's payload."""
    path = Path(cfg.distill.teacher)
    if not path.is_file():
        raise KneegenError(
            f"distill.teacher {path}: the teacher checkpoint is not there: give its place with "
            "--set distill.teacher=PATH (a resumed distillation accepts a moved teacher)"
        )
    payload = load_training_checkpoint(path)
    load_weights(
        network,
        payload["ema"] if payload["ema"] is not None else payload["model"],
        f"{path} (the teacher)",
        "distil with the teacher's own config (kneegen distill takes it from the checkpoint) and leave model.* as "
        "they are",
    )
    teacher = copy.deepcopy(network).eval().requires_grad_(False)
    distill = cfg.distill
    guide = None
    if distill.autoguidance != 1.0:
        if payload.get("guide") is None:
            raise KneegenError(
                f"distill.autoguidance {distill.autoguidance:g}: the teacher {path} holds no guide (train.guide_at): "
                "set distill.autoguidance to 1"
            )
        guide = copy.deepcopy(teacher)
        guide.load_state_dict(payload["guide"])
    schedule = Schedule(cfg.diffusion.schedule, cfg.diffusion.timesteps)
    rounds = 1 if distill.method != "progressive" else distillation_rounds(distill.teacher_steps, distill.steps)
    clip = not cfg.model.autoencoder
    trained_epochs = root_epochs(payload)
    return Distillation(
        teacher,
        schedule,
        cfg.diffusion.prediction,
        compute,
        clip,
        distill.teacher_steps,
        rounds,
        trained_epochs,
        guide=guide,
        autoguidance=distill.autoguidance,
        autoguidance_sigma_max=distill.autoguidance_sigma_max,
        teacher_solver=distill.teacher_solver,
        method=distill.method,
        student=network if distill.method != "progressive" else None,
        steps=distill.steps,
        fake_score=make_fake_score(teacher, cfg, compute, schedule, dist) if distill.method == "dmd" else None,
        regression_weight=distill.regression_weight,
        anchor_pairs=distill.regression_pairs,
        conditions=len(cfg.model.conditions),
        backward_simulation=distill.backward_simulation,
        fold=1 if cfg.model.autoencoder else getattr(network_settings(cfg.model)[1], "patch_size", 1),
    ), payload


def make_fake_score(
    teacher: nn.Module, cfg: RunConfig, compute: Compute, schedule: Schedule, dist: Distributed
) -> FakeScore:
    """A trainable copy of the teacher, with the run's optimiser, to learn the student's samples;
    frozen outside its own updates."""
    network = copy.deepcopy(teacher).requires_grad_(True)
    diffusion = cfg.diffusion
    return FakeScore(
        **companion_fields(network, make_optimizer(network, cfg.train), compute, dist),
        schedule=schedule,
        prediction=diffusion.prediction,
        loss_kind=diffusion.loss,
        min_snr_gamma=diffusion.min_snr_gamma,
        updates=cfg.distill.fake_score_updates,
    )


def root_epochs(payload: dict) -> int:
    """The epochs the diffusion model behind a checkpoint trained for: its own, or, for a distilled
    student, those of the model its lineage started from (what a distillation's length scales with)."""
    distilled = payload.get("distillation")
    return int(distilled.get("trained_epochs", payload["epoch"])) if distilled else int(payload["epoch"])


def two_step_target(
    teacher: Denoiser,
    x_t: Tensor,
    t: Tensor,
    middle_and_next: tuple[Tensor, Tensor],
    schedule: Schedule,
    second_order: bool = False,
) -> Tensor:
    """x̃ of Alg. 2: the x̂_0 with which ONE DDIM step t → s lands on the teacher's TWO steps t → t′ → s.

    A DDIM step is x_s = α_s x̂_0 + σ_s ε̂ with ε̂ = (x_t − α_t x̂_0) / σ_t; solving
    x″ = α_s x̃ + (σ_s/σ_t)(x_t − α_t x̃) for x̃ gives x̃ = (x″ − (σ_s/σ_t) x_t) / (α_s − (σ_s/σ_t) α_t),
    which is the teacher's x̂_0 at t′ when s is the clean end (α_s = 1, σ_s = 0).

    With `second_order` the second step is DPM-Solver++(2M)'s (dpm_solver_pp over t, t′, s): the
    first step's x̂_0 is its history, so the teacher integrates the ODE to second order for no
    extra network call (its last step, to the clean end, stays x̂_0 itself)."""
    middle, following = middle_and_next
    # 1. The teacher's first DDIM step, t → t′.
    x0, eps = teacher(x_t, t)
    alpha_mid, sigma_mid = schedule.alpha_sigma(middle, x_t)
    x_mid = alpha_mid * x0 + sigma_mid * eps
    # 2. Its second, t′ → s.
    x0_mid, eps_mid = teacher(x_mid, middle)
    alpha_s, sigma_s = schedule.alpha_sigma(following, x_t)
    x_s = alpha_s * x0_mid + sigma_s * eps_mid
    if second_order:
        x_s = x_s + multistep_term(x0_mid, x0, t, middle, following, alpha_s, schedule)
    # 3. The student's x̂_0 for one step t → s to land on x_s.
    alpha_t, sigma_t = schedule.alpha_sigma(t, x_t)
    ratio = sigma_s / sigma_t
    return (x_s - ratio * x_t) / (alpha_s - ratio * alpha_t)


def multistep_term(
    x0: Tensor, x0_previous: Tensor, t: Tensor, middle: Tensor, following: Tensor, alpha_s: Tensor, schedule: Schedule
) -> Tensor:
    """DPM-Solver++(2M)'s second-order term for the steps t′ → s of a batch, each image on its own
    grid points; zero where s is the clean end, where the solver returns x̂_0 itself."""
    lam = schedule.log_snrs.to(x0.device)
    step = lam[following.clamp(min=0)] - lam[middle]  # h of t′ → s (in λ, per image)
    before = lam[middle] - lam[t]  # h′ of t → t′
    per_image = (following >= 0).to(torch.float64).view(-1, *[1] * (x0.dim() - 1))
    ratio, phi = (step / before).view_as(per_image), torch.expm1(-step).view_as(per_image)
    return second_order_term(x0, x0_previous, ratio, alpha_s, phi).mul(per_image).to(x0.dtype)


def one_step_consistency_target(
    teacher: Denoiser, student: Denoiser, x_t: Tensor, t: Tensor, following: Tensor, schedule: Schedule
) -> Tensor:
    """Consistency distillation's target for the student at (x_t, t) (Song et al. 2023, Alg. 2):
    x_s = α_s x̂_0 + σ_s ε̂ is the teacher's deterministic DDIM step t → s (its Euler step of the
    probability-flow ODE), and the target is the student's x̂_0 at (x_s, s): the same trajectory's
    end as seen from one step nearer to it. Where s is the clean end the boundary condition
    f(x, 0) = x makes it x_s, the teacher's x̂_0 itself."""
    x0, eps = teacher(x_t, t)
    alpha_s, sigma_s = schedule.alpha_sigma(following, x_t)
    x_s = alpha_s * x0 + sigma_s * eps  # (B, C, H, W): x̂_0 where s is the clean end (α = 1, σ = 0)
    clean = (following < 0).view(-1, *[1] * (x_t.dim() - 1))
    if clean.all():
        return x_s
    own, _ = student(x_s, following.clamp(min=0))
    return torch.where(clean, x_s, own)
