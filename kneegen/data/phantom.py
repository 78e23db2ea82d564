"""Synthetic sagittal knee MRI phantom standing in for the OAI AKOA DESS slices.

The real data (sagittal 3D DESS water-excitation knee MRI, 260 x 228 PNG slices) cannot be
shipped, so demos and tests draw on this phantom instead. Each "patient" gets a knee whose
anatomy is built from implicit shapes (approximate signed distances of ellipses,
superellipses and capsules) on a coordinate grid, so a slice is a few dozen vectorised
numpy passes.

What is modelled, in DESS water-excitation contrast (fluid and cartilage bright, fat
suppressed, marrow dark-medium with texture, tendons, ligaments, menisci and cortex black):
femur, tibia, patella and fibular head with cortical rim and marrow; femoral, tibial and
patellar cartilage; joint fluid and suprapatellar pouch; menisci; cruciate ligaments in the
notch; patellar and quadriceps tendons; Hoffa fat pad; popliteal fat and vessels; muscle,
subcutaneous fat and skin on black air.

The slice position z runs from -1 (medial) to +1 (lateral): bones are sections through
ellipsoids, so condyles shrink towards the volume edges, vanish in the intercondylar notch
(where the cruciates appear) and give way to soft tissue at the edges. Per patient, bone
sizes, joint flexion, cartilage thickness, effusion, field of view, contrast, noise and a
smooth multiplicative bias field vary. Edges are blurred slightly and the magnitude image
carries Rician noise. A LEFT knee is the RIGHT one mirrored front-to-back with its slice
order reversed, as lateral and medial swap.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
from PIL import Image

AKOA_HEIGHT, AKOA_WIDTH = 228, 260

FIRST_PATIENT_ID = 9_000_000
PATIENT_ID_RANGE = 1_000_000  # OAI ids are seven digits starting with 9
SIDES = ("LEFT", "RIGHT")
SLICES_PER_VOLUME = 20  # slices of one patient's knee the phantom writes
PNG_COMPRESS_LEVEL = 1  # noisy slices barely compress; level 1 halves the save time

# Tissue signal as a fraction of full scale (DESS water excitation: fat suppressed).
BASE_INTENSITY = {
    "skin": 0.3,
    "fat": 0.12,
    "muscle": 0.27,
    "marrow": 0.17,
    "cortex": 0.03,
    "cartilage": 0.62,
    "fluid": 0.95,
    "meniscus": 0.03,
    "tendon": 0.04,
    "acl": 0.15,
    "vessel": 0.45,
}
CORTEX_THICKNESS = 0.018
PLATEAU_X = -0.06  # centre of the tibial plateau, slightly behind the condyle's
JOINT_GAP = 0.004  # between opposing cartilage surfaces
# The two compartments differ as in real knees, so a slice shows which side of the notch it is on:
# the medial femoral condyle is longer front to back, the lateral one rounder; the lateral tibial
# plateau slopes further back and is convex, with the fibular head below it; the medial
# meniscus's posterior horn is much larger than its anterior one, the lateral's horns are alike.
POSTERIOR_SLOPE = {"medial": -0.06, "lateral": -0.2}  # radians; the tibial plateau falls off towards the back
CONDYLE_LENGTH = {"medial": 0.5, "lateral": 0.36}  # half-length front to back, before the patient's factor
MENISCUS_HORNS = {"medial": ((0.24, 0.15), (0.08, 0.08)), "lateral": ((0.13, 0.11), (0.13, 0.11))}  # (back, front)
MIN_SECTION = 0.25
MIN_CARTILAGE_SECTION = 0.45  # the outermost condyle sections are non-articular
TEXTURE_SCALES = (0.1, 0.03, 0.01)  # grid units, see Texture
BLUR_SIGMA_PX = 0.6  # partial-volume softening of tissue borders at AKOA resolution
FAR = 10.0  # signed distance used for shapes absent from a slice


class Texture(NamedTuple):
    """Unit-variance smooth noise at three scales (grid units: ~0.1, 0.03, 0.01)."""

    broad: np.ndarray  # muscle fibre waviness and irregular fat-pad borders
    coarse: np.ndarray  # tissue inhomogeneity
    fine: np.ndarray  # trabecular mottling


@dataclass(frozen=True)
class Patient:
    """Per-volume anatomy, acquisition and display parameters (lengths in grid units)."""

    scale: float  # knee size relative to the field of view
    shift: tuple[float, float]  # field-of-view offset
    tilt: float  # in-plane rotation of the whole leg (radians)
    flexion: float  # tibial rotation about the femoral condyle (radians)
    condyle: float  # femoral condyle size factor
    plateau: float  # tibial plateau width factor
    patella_drop: float  # patella alta (<0) / baja (>0)
    cartilage: float  # cartilage thickness
    effusion: float  # 0..1, amount of joint fluid
    fat: float  # subcutaneous fat thickness
    intensity: dict[str, float]
    noise: float  # Rician noise sigma as a fraction of full scale
    gamma: float
    bias: tuple[float, float, float, float]  # x, y, xy, r^2 coefficients of log bias
    stack: tuple[float, float]  # z of the first and last slice (medial -> lateral)


def phantom_file_name(patient_id: int, side: str, slice_index: int) -> str:
    """AKOA-style name, e.g. OAI9014797_BaseLine_3_de3d1_SAG_3D_DESS_WE_LEFT.nii.gz_12.png."""
    return f"OAI{patient_id}_BaseLine_3_de3d1_SAG_3D_DESS_WE_{side}.nii.gz_{slice_index}.png"


def phantom_volume(
    patient_seed: int, n_slices: int, side: str, height: int = AKOA_HEIGHT, width: int = AKOA_WIDTH
) -> np.ndarray:
    """(n_slices, height, width) uint8 volume of one knee; deterministic for a seed."""
    if side not in SIDES:
        raise ValueError(f"side must be one of {SIDES}, got {side!r}")
    rng = np.random.default_rng(patient_seed)
    patient = _sample_patient(rng)
    grid = _patient_grid(height, width, patient)
    textures = _volume_textures(rng, height, width, _unit_px(height, width))
    bias = _bias_field(*grid, patient)
    zs = np.linspace(*patient.stack, n_slices)
    if side == "LEFT":
        zs = zs[::-1]
    volume = np.empty((n_slices, height, width), np.uint8)
    for i, z in enumerate(zs):
        texture = _slice_texture(textures, float(z))
        clean = _gaussian_blur(
            _render_slice(*grid, float(z), patient, texture),
            BLUR_SIGMA_PX * _unit_px(height, width) / (AKOA_HEIGHT / 2),
        )
        volume[i] = _to_uint8(_rician(clean * bias, patient.noise, rng), patient.gamma)
    return np.ascontiguousarray(volume[:, :, ::-1]) if side == "LEFT" else volume


class PlannedVolume(NamedTuple):
    patient_id: int
    side: str
    slices: int  # how many of the volume's slices are written


def phantom_plan(n_images: int, seed: int = 0, slices_per_volume: int = SLICES_PER_VOLUME) -> list[PlannedVolume]:
    """The volumes `write_phantom` writes for these arguments: known before any file is written,
    so a folder can record every name it is about to receive."""
    n_volumes = -(-n_images // slices_per_volume)
    rng = np.random.default_rng(seed)
    offsets = rng.choice(PATIENT_ID_RANGE, size=n_volumes, replace=False)
    sides = rng.choice(SIDES, size=n_volumes)
    counts = [min(slices_per_volume, n_images - i * slices_per_volume) for i in range(n_volumes)]
    return [PlannedVolume(FIRST_PATIENT_ID + int(o), str(side), c) for o, side, c in zip(offsets, sides, counts)]


def phantom_file_names(n_images: int, seed: int = 0, slices_per_volume: int = SLICES_PER_VOLUME) -> list[str]:
    return [
        phantom_file_name(v.patient_id, v.side, index)
        for v in phantom_plan(n_images, seed, slices_per_volume)
        for index in range(1, v.slices + 1)
    ]


def write_phantom(
    out_dir: Path,
    n_images: int,
    seed: int = 0,
    slices_per_volume: int = SLICES_PER_VOLUME,
    on_volume: Callable[[int], None] | None = None,
) -> list[Path]:
    """Write exactly n_images AKOA-named PNG slices, one volume per patient, into out_dir.

    Patient ids and sides are drawn from `seed`, so the same seed gives byte-identical
    files; the last volume is truncated to hit n_images. on_volume(slices_written) is
    called after each volume so callers can drive a progress bar.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths: list[Path] = []
    for volume_plan in phantom_plan(n_images, seed, slices_per_volume):
        volume = phantom_volume(volume_plan.patient_id, slices_per_volume, volume_plan.side)
        for index, image in enumerate(volume[: volume_plan.slices], start=1):
            path = out_dir / phantom_file_name(volume_plan.patient_id, volume_plan.side, index)
            # 2-D uint8 saves as 8-bit grayscale ("L")
            Image.fromarray(image).save(path, compress_level=PNG_COMPRESS_LEVEL)
            paths.append(path)
        if on_volume is not None:
            on_volume(volume_plan.slices)
    return paths


def _sample_patient(rng: np.random.Generator) -> Patient:
    """Draw one knee: anatomy within normal adult variation, scanner settings within OAI's."""
    u = rng.uniform
    centre = u(-0.1, 0.1)
    return Patient(
        scale=u(0.9, 1.08),
        shift=(u(-0.1, 0.1), u(-0.1, 0.1)),
        tilt=u(-0.08, 0.08),
        flexion=u(-0.1, 0.1),
        condyle=u(0.9, 1.1),
        plateau=u(0.9, 1.1),
        patella_drop=u(-0.08, 0.08),
        cartilage=u(0.026, 0.045),
        effusion=u(0.0, 1.0),
        fat=u(0.03, 0.11),
        intensity={k: v * u(0.85, 1.15) for k, v in BASE_INTENSITY.items()},
        noise=u(0.015, 0.04),
        gamma=u(0.85, 1.15),
        bias=(u(-0.25, 0.25), u(-0.25, 0.25), u(-0.1, 0.1), u(-0.15, 0.05)),
        stack=(centre - u(0.8, 0.92), centre + u(0.8, 0.92)),
    )


def _unit_px(height: int, width: int) -> float:
    """Pixels per grid unit: half the image height at the AKOA aspect ratio."""
    return min(height, width * AKOA_HEIGHT / AKOA_WIDTH) / 2


def _patient_grid(height: int, width: int, patient: Patient) -> tuple[np.ndarray, np.ndarray]:
    """Anatomical coordinates of each pixel: x anterior, y inferior, knee joint near 0."""
    unit = _unit_px(height, width)
    x = ((np.arange(width, dtype=np.float32) + 0.5 - width / 2) / unit)[None, :]
    y = ((np.arange(height, dtype=np.float32) + 0.5 - height / 2) / unit)[:, None]
    cos, sin = math.cos(patient.tilt), math.sin(patient.tilt)
    xs, ys = x - patient.shift[0], y - patient.shift[1]
    return (cos * xs + sin * ys) / patient.scale, (cos * ys - sin * xs) / patient.scale


# ---- implicit shapes: approximate signed distance in grid units, negative inside ----


def _rotated(X: np.ndarray, Y: np.ndarray, cx: float, cy: float, angle: float):
    """Offsets of every point from (cx, cy) in a frame rotated by angle."""
    dx, dy = X - cx, Y - cy
    if angle == 0.0:
        return dx, dy
    cos, sin = math.cos(angle), math.sin(angle)
    return cos * dx + sin * dy, cos * dy - sin * dx


def _ellipse(X, Y, cx, cy, a, b, angle=0.0):
    """Ellipse distance (Quilez's first-order estimate), accurate near the border."""
    if a <= 0 or b <= 0:
        return FAR
    dx, dy = _rotated(X, Y, cx, cy, angle)
    k0 = np.sqrt((dx / a) ** 2 + (dy / b) ** 2)
    k1 = np.sqrt((dx / a**2) ** 2 + (dy / b**2) ** 2)
    return (k0 - 1) * np.clip(k0 / (k1 + 1e-9), min(a, b), max(a, b))


def _box(X, Y, cx, cy, a, b, angle=0.0):
    """Rounded box (superellipse of power 4) for flat-topped bone ends."""
    dx, dy = _rotated(X, Y, cx, cy, angle)
    dx, dy = (dx / a) ** 2, (dy / b) ** 2
    return (np.sqrt(np.sqrt(dx * dx + dy * dy)) - 1) * min(a, b)


def _column(X, Y, cx, top, bottom, half_top, half_bottom):
    """Bone shaft tapering linearly from top to bottom, its top corners rounded off."""
    t = np.clip((Y - top) / (bottom - top), 0.0, 1.0)
    half = half_top + (half_bottom - half_top) * t
    sides = np.maximum(np.abs(X - cx) - half, Y - bottom)
    return -_union(-sides, Y - top, 0.25)


def _capsule(X, Y, p, q, radius):
    """Thick line segment from p to q, for tendons, ligaments and vessels."""
    (px, py), (qx, qy) = p, q
    vx, vy = qx - px, qy - py
    t = np.clip(((X - px) * vx + (Y - py) * vy) / (vx * vx + vy * vy), 0.0, 1.0)
    return np.hypot(X - px - t * vx, Y - py - t * vy) - radius


def _union(a, b, k=0.08):
    """Smooth union so bone parts merge with anatomical fillets instead of corners."""
    if isinstance(a, float) or isinstance(b, float):  # an absent (FAR) shape adds nothing
        return np.minimum(a, b)
    h = np.clip(0.5 + 0.5 * (b - a) / k, 0.0, 1.0)
    return b + (a - b) * h - k * h * (1 - h)


def _section(z: float, centre: float, half_width: float) -> float:
    """Relative radius of the slice at z through an ellipsoid: 1 at its centre, 0 outside.

    Sections thinner than MIN_SECTION are dropped: bones end bluntly, and the distance
    estimate of very flat ellipses is unreliable.
    """
    factor = math.sqrt(max(0.0, 1 - ((z - centre) / half_width) ** 2))
    return factor if factor >= MIN_SECTION else 0.0


# ---- anatomy ----


class _Condyle(NamedTuple):
    """The femoral condyle's ellipse in this slice and how central the slice is to it."""

    x: float
    y: float
    rx: float
    ry: float
    section: float  # 1 through the middle of a condyle, 0 in the notch and beyond the edges


@dataclass
class _Bones:
    """Bone distance fields of one slice plus the landmarks soft tissue is placed by."""

    femur: np.ndarray
    tibia: np.ndarray
    patella: np.ndarray | float
    fibula: np.ndarray | float
    condyle: _Condyle
    plateau_y: float
    plateau_half: float  # half the plateau's front-to-back length
    Xt: np.ndarray  # tibial frame (rotated by flexion)
    Yt: np.ndarray
    tuberosity: tuple[float, float]  # where the patellar tendon inserts (femoral frame)
    patella_poles: tuple[tuple[float, float], tuple[float, float]]
    z: float  # where the slice cuts, -1 medial … +1 lateral


def compartment(z: float) -> str:
    """The half of the knee a slice at z cuts: medial (z < 0) or lateral."""
    return "medial" if z < 0 else "lateral"


def _bones(X, Y, z: float, p: Patient) -> _Bones:
    """Femur, tibia, patella and fibular head sectioned at z."""
    cx, cy, ry = -0.1, -0.22, 0.35 * p.condyle
    medial, lateral = _section(z, -0.56, 0.38), _section(z, 0.56, 0.36)
    cond = max(medial, lateral)
    rx = CONDYLE_LENGTH[compartment(z)] * p.condyle
    shaft_top = -1.5 + (z / 0.85) ** 2  # the metaphysis narrows upwards, so edge slices end lower
    has_shaft = shaft_top < -0.55 and (cond > 0 or abs(z) < 0.3)
    # the shaft's bottom is cut at a slope: the notch roof (Blumensaat's line)
    shaft = -_union(-_column(X, Y, -0.02, shaft_top, 0.0, 0.2, 0.32), 0.35 * X - 0.12 - Y) if has_shaft else FAR
    # the condyle is flat-bottomed from side to side: its sections shrink but stay on the joint
    radius = (0.2 + 0.8 * cond) if cond else 0.0
    height = ry * (0.5 + 0.5 * radius)
    condyle = _Condyle(cx, cy + ry - height, rx * radius, height, cond)
    femur = _union(_ellipse(X, Y, cx, condyle.y, condyle.rx, condyle.ry), shaft, 0.15)
    plateau_y = cy + ry + 2 * p.cartilage + JOINT_GAP
    Xt, Yt = _rotated(X, Y, cx, cy, p.flexion)
    Xt, Yt = Xt + cx, Yt + cy
    plateau_half = 0.5 * p.plateau * (0.5 + 0.5 * _section(z, 0, 0.95))
    tibia = _tibia(Xt, Yt, z, p, plateau_y, plateau_half)
    fibula = (
        _union(
            _ellipse(Xt, Yt, -0.36, plateau_y + 0.42, 0.15, 0.15),
            _column(Xt, Yt, -0.4, plateau_y + 0.5, 2.0, 0.06, 0.05),
        )
        if _section(z, 0.7, 0.3)
        else FAR
    )
    tx, ty = 0.32, plateau_y + 0.42
    cos, sin = math.cos(p.flexion), math.sin(p.flexion)
    tuberosity = (cx + cos * (tx - cx) - sin * (ty - cy), cy + sin * (tx - cx) + cos * (ty - cy))
    px, py, tilt, ps = 0.55, -0.55 + p.patella_drop, 0.15, _section(z, 0.05, 0.6)
    half_height = 0.27 * (0.6 + 0.4 * ps)
    patella = _ellipse(X, Y, px, py, 0.15 * (0.5 + 0.5 * ps), half_height, tilt) if ps else FAR
    poles = (
        (px + half_height * math.sin(tilt), py - half_height * math.cos(tilt)),
        (px - half_height * math.sin(tilt), py + half_height * math.cos(tilt)),
    )
    return _Bones(femur, tibia, patella, fibula, condyle, plateau_y, plateau_half, Xt, Yt, tuberosity, poles, z)


def _tibia(Xt, Yt, z: float, p: Patient, plateau_y: float, half: float):
    """Flat plateau with posterior slope over a tapering shaft and the anterior tuberosity."""
    side = compartment(z)
    plateau = _box(Xt, Yt, PLATEAU_X, plateau_y + 0.2, half, 0.2, POSTERIOR_SLOPE[side]) if half else FAR
    if half and side == "lateral":  # a convex lateral plateau: a low dome on top
        plateau = _union(plateau, _ellipse(Xt, Yt, PLATEAU_X, plateau_y + 0.03, 0.8 * half, 0.05), 0.03)
    bottom = plateau_y + 1.6 - 1.2 * (z / 0.9) ** 2
    shaft = _column(Xt, Yt, -0.08, plateau_y + 0.1, bottom, 0.42 * p.plateau, 0.18)
    tuberosity = _ellipse(Xt, Yt, 0.22, plateau_y + 0.42, 0.13 * _section(z, 0.05, 0.35), 0.17)
    tibia = _union(plateau, _union(shaft, tuberosity, 0.12), 0.12)
    spine = _section(z, 0, 0.2)
    return _union(tibia, _ellipse(Xt, Yt, -0.04, plateau_y, 0.1, 0.06 * spine), 0.05) if spine else tibia


def _render_slice(X, Y, z: float, p: Patient, texture: Texture) -> np.ndarray:
    """Paint tissues back to front: soft tissue, joint contents, then bone on top."""
    bones = _bones(X, Y, z, p)
    img = np.zeros(X.shape, np.float32)
    _paint_soft_tissue(img, X, Y, z, p, bones, texture)
    _paint_joint(img, X, Y, z, p, bones)
    _paint_bones(img, Y, p, bones, texture)
    return img


def _paint_soft_tissue(img, X, Y, z, p: Patient, b: _Bones, texture: Texture) -> None:
    """Leg outline with skin, subcutaneous fat and muscle; fat pads, vessels and tendons."""
    broad, coarse, fine = texture
    val = p.intensity
    (upper, lower), central = b.patella_poles, abs(z) < 0.45
    tendon = _capsule(X, Y, lower, b.tuberosity, 0.028) if central else FAR
    quad = _capsule(X, Y, upper, (upper[0] - 0.1, -1.5), 0.035) if central else FAR
    girth = 0.85 + 0.15 * _section(z, 0, 1.3)
    anterior = _union(_union(b.patella, tendon), _union(b.tibia, quad))
    leg = _union(_box(X, Y, -0.3, 0.0, 0.9 * girth, 2.0), anterior - 0.08 - p.fat, 0.2)
    np.copyto(img, val["skin"] * (1 + 0.1 * fine), where=leg < 0)
    np.copyto(img, val["fat"] * (1 + 0.3 * coarse), where=leg < -0.015)
    fibres = np.sin(40 * (Y + 0.2 * X) + 3 * broad)  # faint striation along the leg
    muscle = val["muscle"] * (1 + 0.1 * coarse + 0.05 * fine + 0.04 * fibres)
    np.copyto(img, muscle, where=leg < -0.015 - p.fat)
    popliteal = _ellipse(X, Y, -0.78, -0.15, 0.2 * _section(z, 0, 0.7), 0.6) + 0.06 * broad
    hoffa = _ellipse(X, Y, 0.36, 0.0, 0.3 * _section(z, 0, 0.65), 0.28) + 0.04 * broad
    fat = val["fat"] * (1 + 0.3 * coarse + 0.15 * fine)
    np.copyto(img, fat, where=np.minimum(popliteal, hoffa) < 0)
    if abs(z) < 0.3:
        vessels = np.minimum(
            _capsule(X, Y, (-0.74, -1.0), (-0.68, 0.0), 0.035), _capsule(X, Y, (-0.68, 0.0), (-0.62, 1.0), 0.035)
        )
        np.copyto(img, val["vessel"] * (1 + 0.1 * fine), where=(vessels < 0) & (popliteal < -0.03))
    np.copyto(img, val["tendon"], where=np.minimum(tendon, quad) < 0)
    if 0.72 < abs(z) < 0.88:  # collateral ligaments run down the sides of the joint
        ligament = (
            _capsule(X, Y, (-0.1, -0.45), (-0.05, 0.6), 0.025)
            if z < 0
            else _capsule(X, Y, (-0.15, -0.5), (-0.34, b.plateau_y + 0.4), 0.03)
        )
        np.copyto(img, val["tendon"], where=ligament < 0)


def _paint_joint(img, X, Y, z, p: Patient, b: _Bones) -> None:
    """Fluid, cartilage, menisci and cruciate ligaments between the bones."""
    val, cart = p.intensity, p.cartilage
    fluid_t = cart + 0.006 + 0.02 * p.effusion
    cx, cy = b.condyle.x, b.condyle.y
    upper_pole_y = b.patella_poles[0][1]
    trochlea = (X > 0.05) & (Y > upper_pole_y) & isinstance(b.patella, np.ndarray)
    articular_femur = ((Y > cy - 0.1) & (b.condyle.section > MIN_CARTILAGE_SECTION)) | trochlea
    under_condyle = np.abs(b.Xt - cx) < 0.9 * b.condyle.rx
    top_of_tibia = (b.Yt < b.plateau_y + 0.06) & under_condyle
    behind_patella = X < b.patella_poles[1][0]
    pouch = _ellipse(X, Y, 0.38, upper_pole_y - 0.2, 0.015 + 0.05 * p.effusion, 0.2 * _section(z, 0, 0.6), 0.1)
    fluid = (
        ((b.femur < fluid_t) & articular_femur)
        | ((b.tibia < fluid_t) & top_of_tibia)
        | ((b.patella < fluid_t) & behind_patella)
        | (pouch < 0)
    )
    np.copyto(img, val["fluid"], where=fluid)
    cartilage = (
        ((b.femur < cart) & articular_femur)
        | ((b.tibia < cart) & top_of_tibia)
        | ((b.patella < 1.4 * cart) & behind_patella)
    )
    np.copyto(img, val["cartilage"] * (1 + 0.15 * (Y - cy)), where=cartilage)
    if b.condyle.section:
        _paint_menisci(img, p, b)
    if abs(z) < 0.2:
        _paint_cruciates(img, X, Y, z, p, b)


def _paint_menisci(img, p: Patient, b: _Bones) -> None:
    """Black wedges on the tibial plateau's back and front; longer towards the periphery."""
    cart = p.cartilage
    base = b.plateau_y - cart
    reach = 0.25 * (1 - b.condyle.section) + 0.08
    outside_cartilage = (b.femur > cart) & (b.tibia > cart)
    back, front = PLATEAU_X - b.plateau_half + 0.02, PLATEAU_X + b.plateau_half - 0.06
    (back_length, back_height), (front_length, front_height) = MENISCUS_HORNS[compartment(b.z)]
    for edge, direction, length, height in (
        (back, 1, back_length, back_height),
        (front, -1, front_length, front_height),
    ):
        depth = (b.Xt - edge) * direction
        wedge = (
            (depth > 0)
            & (depth < length + reach)
            & (b.Yt < base)
            & (base - b.Yt < height * (1 - depth / (length + reach)))
        )
        np.copyto(img, p.intensity["meniscus"], where=wedge & outside_cartilage)


def _paint_cruciates(img, X, Y, z: float, p: Patient, b: _Bones) -> None:
    """ACL (dark grey, lateral half of the notch) and PCL (black arc, medial half)."""
    cy, ty = b.condyle.y, b.plateau_y
    if z > -0.05:
        acl = _capsule(X, Y, (0.1, ty - 0.02), (-0.2, cy + 0.08), 0.04)
        np.copyto(img, p.intensity["acl"], where=acl < 0)
    if z < 0.05:
        pcl = np.minimum(
            _capsule(X, Y, (-0.36, ty + 0.06), (-0.22, ty - 0.12), 0.045),
            _capsule(X, Y, (-0.22, ty - 0.12), (0.0, cy + 0.12), 0.04),
        )
        np.copyto(img, p.intensity["tendon"], where=pcl < 0)


def _paint_bones(img, Y, p: Patient, b: _Bones, texture: Texture) -> None:
    """Dark cortical rim around mottled marrow, with faint physeal scars."""
    _, coarse, fine = texture
    marrow = p.intensity["marrow"] * (1 + 0.15 * fine + 0.12 * coarse)
    for bone, scar_y in (
        (b.femur, b.condyle.y - 0.22),
        (b.tibia, b.plateau_y + 0.2),
        (b.patella, None),
        (b.fibula, None),
    ):
        if not isinstance(bone, np.ndarray):
            continue
        np.copyto(img, p.intensity["cortex"], where=bone < 0)
        np.copyto(img, marrow, where=bone < -CORTEX_THICKNESS)
        if scar_y is not None:
            scar = (np.abs(Y - scar_y - 0.03 * coarse) < 0.008) & (bone < -CORTEX_THICKNESS)
            np.copyto(img, 0.6 * marrow, where=scar)


# ---- texture, blur and MRI signal model ----


def _volume_textures(rng, height: int, width: int, unit_px: float) -> np.ndarray:
    """Two noise fields per Texture scale; slices mix each pair so texture drifts slowly."""
    fields = rng.standard_normal((6, height, width), dtype=np.float32)
    sigmas = [scale * unit_px for scale in TEXTURE_SCALES for _ in range(2)]
    blurred = np.stack([_gaussian_blur(f, s) for f, s in zip(fields, sigmas)])
    return blurred / (blurred.std(axis=(1, 2), keepdims=True) + 1e-6)


def _slice_texture(fields: np.ndarray, z: float) -> Texture:
    """Rotate between each pair of fields with z, keeping unit variance."""
    c, s = math.cos(2.0 * z), math.sin(2.0 * z)
    return Texture(*(c * fields[i] + s * fields[i + 1] for i in (0, 2, 4)))


def _gaussian_blur(img: np.ndarray, sigma: float) -> np.ndarray:
    """Separable Gaussian blur with edge padding (numpy only; no scipy in the project)."""
    radius = math.ceil(3 * sigma)
    if sigma <= 0 or radius == 0:
        return img
    taps = np.exp(-0.5 * (np.arange(-radius, radius + 1) / sigma) ** 2)
    taps = (taps / taps.sum()).astype(np.float32)
    h, w = img.shape
    padded = np.pad(img, radius, mode="edge")
    rows = sum(t * padded[:, k : k + w] for k, t in enumerate(taps))
    return sum(t * rows[k : k + h] for k, t in enumerate(taps))


def _bias_field(X, Y, p: Patient) -> np.ndarray:
    """Smooth multiplicative coil sensitivity, fixed for the whole volume."""
    bx, by, bxy, br = p.bias
    return np.exp(bx * X + by * Y + bxy * X * Y + br * (X * X + Y * Y)).astype(np.float32)


def _rician(img: np.ndarray, sigma: float, rng: np.random.Generator) -> np.ndarray:
    """Magnitude of the signal plus complex Gaussian noise: MRI's Rician noise floor."""
    real = img + sigma * rng.standard_normal(img.shape, dtype=np.float32)
    imag = sigma * rng.standard_normal(img.shape, dtype=np.float32)
    return np.hypot(real, imag)


def _to_uint8(img: np.ndarray, gamma: float) -> np.ndarray:
    """Display mapping with a per-patient gamma, as window settings differ between scans."""
    return (np.clip(img, 0.0, 1.0) ** gamma * 255 + 0.5).astype(np.uint8)
