"""Synthetic B-mode ultrasound phantoms with exact lesion masks, for tests and the demo.

The image is simulated the way a scanner forms it, in *beam space* (axial sample x beam line),
then scan-converted to the display grid:

1. reflectivity: tissue (superficial layers with bright interfaces, smooth echotexture) and
   lesions (hypoechoic, hyperechoic, anechoic cyst, complex: a near-isoechoic solid wall around
   an anechoic fluid part, labelled whole, wrapping: smooth tissue carved around an unlabelled
   round neighbour, a vessel, an airway or a muscle, or halo: near-isoechoic solid tissue outlined
   only by a thin dark halo or bright capsule, as many thyroid nodules are) whose border is an
   ellipse perturbed by a radial Fourier series, at a random orientation;
2. scatterers: a complex Gaussian per sample with variance = reflectivity (fully developed
   speckle), times the round-trip transmission: tissue attenuation plus each lesion's own
   attenuation, which is what casts a posterior shadow behind solid lesions and posterior
   enhancement behind fluid, plus a mild focal-zone gain;
3. the complex baseband point-spread function (Gaussian, wider laterally than axially, as
   beam width exceeds pulse length), plus band-limited receiver noise;
4. time-gain compensation from a nominal attenuation, imperfect (wrong slope, slider bumps);
5. envelope detection (its amplitude is Rayleigh distributed in homogeneous tissue), log
   compression to a dynamic range, scan conversion of a curvilinear fan (black outside).

Masks are not derived from the image: each lesion's analytic region is evaluated at the pixel
centres of the display grid (and clipped to the field of view), so they are exact.
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
from PIL import Image
from scipy import ndimage

from uniultra.atomic import atomic_write_bytes, atomic_write_text

KINDS: tuple[str, ...] = ("hypoechoic", "hyperechoic", "cyst", "complex", "wrapping", "halo", "mixed",
                          "mixed-complex", "mixed-wrapping")
GEOMETRIES: tuple[str, ...] = ("linear", "sector", "random")
LESION_KINDS: tuple[str, ...] = ("hypoechoic", "hyperechoic", "cyst", "complex", "wrapping", "halo")
# How often each lesion kind is drawn for kind="mixed" (never complex or wrapping: the phantoms of earlier
# recipes stay as they were; a zero weight at the end leaves the draws unchanged), "mixed-complex" and
# "mixed-wrapping".
_MIXED_WEIGHTS = {"mixed": (0.5, 0.2, 0.3, 0.0, 0.0, 0.0), "mixed-complex": (0.35, 0.15, 0.2, 0.3, 0.0, 0.0),
                  "mixed-wrapping": (0.3, 0.15, 0.2, 0.0, 0.35, 0.0)}
# A complex lesion's fluid part: its semi-axes as a share of the lesion's, and how far its centre may
# sit off the lesion's (a share of the semi-axes); the solid wall is what is left, at least ~1/5 thick.
_CORE_SCALE = (0.45, 0.8)
_CORE_OFFSET = 0.2
# A wrapping lesion's neighbour (what it is carved around, as a thyroid lobe around the trachea or tissue
# around a vessel): its centre's distance from the lesion's, as a share of the lesion's radius in that
# direction (past 1 - radius share it opens to the outside: a crescent, else a hole), its radius as a
# share of the lesion's smaller semi-axis, and its echo: anechoic like a vessel, dark with a bright ring
# like an airway, or darker tissue like a muscle.
_NEIGHBOUR_DISTANCE = (0.4, 1.0)
_NEIGHBOUR_SCALE = (0.5, 0.95)
_NEIGHBOUR_ECHO = {"vessel": (-40.0, 0.0), "airway": (-20.0, 14.0), "muscle": (-8.0, 0.0)}  # (contrast, ring) dB

# A halo lesion's rim is at least this wide (display pixels): thinner, speckle and the PSF wash it out.
_MIN_HALO_PX = 3.0

SOUND_SPEED_MM_PER_US = 1.54
# What scanners assume for soft tissue when setting the default time-gain compensation.
NOMINAL_ATTENUATION_DB_CM_MHZ = 0.5
# Round-trip attenuation a probe is used up to before the image drowns in noise; it ties
# frequency to the depth setting the way a sonographer would.
_MAX_ROUND_TRIP_DB = 50.0
_FOV_MARGIN_PX = 2.0


# ---------------------------------------------------------------------------------------------
# Public records


@dataclass(frozen=True)
class Lesion:
    """One lesion, in display-pixel coordinates (x = column, y = row, pixel centres at ints).

    The border is the ellipse with semi-axes `semi_axes_px` rotated by `angle_rad`, its radius
    scaled in direction phi by 1 + sum(a_k cos(k phi + p_k)) over `harmonics` (k, a_k, p_k).
    """

    kind: str
    center_xy: tuple[float, float]
    semi_axes_px: tuple[float, float]
    angle_rad: float
    harmonics: tuple[tuple[int, float, float], ...]
    contrast_db: float
    attenuation_db_cm_mhz: float
    # A complex lesion's anechoic fluid part, with its centre relative to the lesion's (None: solid or cyst).
    core: Lesion | None = None
    # Echo level (dB, relative to the lesion's) of a rim inside its border, and the rim's width as a share
    # of the semi-axes: a bright capsule or a dark halo (0 dB: none).
    rim_db: float = 0.0
    rim_width: float = 0.0
    # A wrapping lesion's neighbour, centre relative to the lesion's: carved out of the lesion (not
    # labelled) and drawn with its own echo level, inside the lesion's outline and beyond it.
    neighbour: Lesion | None = None

    @property
    def bounding_radius_px(self) -> float:
        own = max(self.semi_axes_px) * (1.0 + sum(abs(a) for _, a, _ in self.harmonics))
        if self.neighbour is None:
            return own
        return max(own, math.hypot(*self.neighbour.center_xy) + self.neighbour.bounding_radius_px)

    def contains(self, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        """Exact membership of points (x, y), as a bool array of their broadcast shape."""
        inside = self._outline_contains(x, y)
        return inside if self.neighbour is None else inside & ~self.neighbour_contains(x, y)

    def neighbour_contains(self, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        """Membership of points in the neighbour a wrapping lesion is carved around (all False without one)."""
        if self.neighbour is None:
            return np.zeros(np.broadcast(x, y).shape, dtype=bool)
        cx, cy = self.center_xy
        return self.neighbour.contains(x - cx, y - cy)

    def _outline_contains(self, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        cos_t, sin_t = math.cos(self.angle_rad), math.sin(self.angle_rad)
        dx, dy = x - self.center_xy[0], y - self.center_xy[1]
        u = (dx * cos_t + dy * sin_t) / self.semi_axes_px[0]
        v = (dy * cos_t - dx * sin_t) / self.semi_axes_px[1]
        phi = np.arctan2(v, u)
        border = np.ones_like(phi)
        for order, amplitude, phase in self.harmonics:
            border += amplitude * np.cos(order * phi + phase)
        return np.hypot(u, v) <= border

    def rim_contains(self, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        """Membership of points in the rim (inside the border, outside the border shrunk by the rim width)."""
        if not self.rim_db:
            return np.zeros(np.broadcast(x, y).shape, dtype=bool)
        shrunk = replace(self, semi_axes_px=tuple(a * (1 - self.rim_width) for a in self.semi_axes_px))
        return self.contains(x, y) & ~shrunk.contains(x, y)

    def core_contains(self, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        """Membership of points in the fluid part (all False without one)."""
        if self.core is None:
            return np.zeros(np.broadcast(x, y).shape, dtype=bool)
        cx, cy = self.center_xy
        return self.core.contains(x - cx, y - cy)


@dataclass(frozen=True, eq=False)
class Phantom:
    """A simulated B-mode image with its exact ground truth.

    `image` uint8 HxW (0 outside the field of view); `mask` bool HxW, union of the HxW
    `lesion_masks` (N x H x W, one per lesion, clipped to the field of view); `envelope`
    float32 HxW, the detected amplitude after gain and before log compression (arbitrary
    linear units); `fov` bool HxW, the imaged region (all True for a linear probe).
    """

    image: np.ndarray
    mask: np.ndarray
    lesion_masks: np.ndarray
    envelope: np.ndarray
    fov: np.ndarray
    lesions: tuple[Lesion, ...]
    geometry: str
    frequency_mhz: float
    depth_mm: float
    pixel_spacing_mm: float
    attenuation_db_cm_mhz: float  # of the tissue (lesions carry their own)
    dynamic_range_db: float
    seed: int

    @property
    def boxes(self) -> np.ndarray:
        """One box per lesion, (N, 4) int64 x_min, y_min, x_max, y_max with inclusive maxima."""
        boxes = np.zeros((len(self.lesions), 4), dtype=np.int64)
        for i, lesion_mask in enumerate(self.lesion_masks):
            rows, cols = np.nonzero(lesion_mask)
            if rows.size:
                boxes[i] = (cols.min(), rows.min(), cols.max(), rows.max())
        return boxes


# ---------------------------------------------------------------------------------------------
# Probe and scan geometry


@dataclass(frozen=True)
class _Probe:
    geometry: str
    frequency_mhz: float
    depth_mm: float
    sigma_axial_mm: float
    sigma_lateral_mm: float
    attenuation_db_cm_mhz: float  # of this tissue; TGC assumes the nominal value
    tgc_error_db: tuple[float, ...]  # slider offsets, spread evenly over depth
    focal_depth: float  # fraction of depth
    focal_gain_db: float
    snr_db: float  # unit-reflectivity tissue at the skin over receiver noise, per sample
    dynamic_range_db: float
    tissue_gray: float
    display_smoothing_px: float


def _draw_probe(rng: np.random.Generator, geometry: str, homogeneous: bool) -> _Probe:
    # The coin is tossed even for a fixed geometry, so the random stream, hence the phantom,
    # does not depend on whether the geometry was given or drawn.
    coin = rng.random()
    if geometry == "random":
        geometry = "sector" if coin < 0.35 else "linear"
    # Linear probes: high frequency, small parts (breast, thyroid). Curvilinear: abdomen.
    frequency = rng.uniform(6.0, 12.0) if geometry == "linear" else rng.uniform(2.5, 5.0)
    low_mm, high_mm = (30.0, 55.0) if geometry == "linear" else (80.0, 160.0)
    max_depth_mm = 10.0 * _MAX_ROUND_TRIP_DB / (2 * NOMINAL_ATTENUATION_DB_CM_MHZ * frequency)
    depth = rng.uniform(low_mm, max(low_mm, min(high_mm, max_depth_mm)))
    wavelength = SOUND_SPEED_MM_PER_US / frequency
    realism = 0.0 if homogeneous else 1.0
    return _Probe(
        geometry=geometry,
        frequency_mhz=frequency,
        depth_mm=depth,
        sigma_axial_mm=rng.uniform(0.5, 0.8) * wavelength,
        sigma_lateral_mm=rng.uniform(1.3, 2.2) * wavelength,
        attenuation_db_cm_mhz=NOMINAL_ATTENUATION_DB_CM_MHZ * (1 + realism * rng.uniform(-0.15, 0.15)),
        tgc_error_db=tuple(realism * rng.normal(0.0, 1.5, size=5)),
        focal_depth=rng.uniform(0.35, 0.7),
        focal_gain_db=realism * rng.uniform(1.0, 3.0),
        snr_db=rng.uniform(60.0, 70.0),
        dynamic_range_db=rng.uniform(45.0, 65.0),
        tissue_gray=rng.uniform(80.0, 120.0),
        display_smoothing_px=rng.uniform(0.0, 0.7),
    )


@dataclass(frozen=True)
class _Fan:
    """Curvilinear sector: beams from a virtual apex above the image, radii r_min..r_max."""

    apex_x: float
    apex_y: float
    r_min: float
    r_max: float
    half_angle: float


@dataclass(frozen=True)
class _Scan:
    """Beam-space sampling grid and its relation to the display grid."""

    x: np.ndarray  # (n_axial, n_beams): display x of each beam sample
    y: np.ndarray
    depth_mm: np.ndarray  # (n_axial,)
    axial_step_mm: float
    lateral_step_mm: float  # between neighbouring beams (at mid depth for a fan)
    pixel_mm: float
    fov: np.ndarray  # (H, W) bool
    fov_beam_coords: np.ndarray | None  # (2, n_fov) beam-space coordinates of the fov pixels
    fan: _Fan | None
    depth_px: float
    lateral_px: float

    def point(self, depth_fraction: float, lateral_fraction: float) -> tuple[float, float]:
        if self.fan is None:
            return lateral_fraction * (self.fov.shape[1] - 1), depth_fraction * (self.fov.shape[0] - 1)
        f = self.fan
        radius = f.r_min + depth_fraction * (f.r_max - f.r_min)
        angle = (2 * lateral_fraction - 1) * f.half_angle
        return f.apex_x + radius * math.sin(angle), f.apex_y + radius * math.cos(angle)

    def holds_disc(self, x: float, y: float, radius: float) -> bool:
        """Whether a disc lies inside the field of view with a margin."""
        reach = radius + 2 * _FOV_MARGIN_PX
        if self.fan is None:
            h, w = self.fov.shape
            return reach <= x <= w - 1 - reach and reach <= y <= h - 1 - reach
        f = self.fan
        r = math.hypot(x - f.apex_x, y - f.apex_y)
        angle = abs(math.atan2(x - f.apex_x, y - f.apex_y))
        edge_distance = r * math.sin(f.half_angle - angle) if angle < f.half_angle else -1.0
        return r - reach >= f.r_min and r + reach <= f.r_max and edge_distance >= reach


def _linear_scan(probe: _Probe, h: int, w: int) -> _Scan:
    pixel_mm = probe.depth_mm / h
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    return _Scan(
        x=x, y=y, depth_mm=(np.arange(h) + 0.5) * pixel_mm, axial_step_mm=pixel_mm,
        lateral_step_mm=pixel_mm, pixel_mm=pixel_mm, fov=np.ones((h, w), dtype=bool),
        fov_beam_coords=None, fan=None, depth_px=float(h), lateral_px=float(w),
    )


def _sector_scan(rng: np.random.Generator, probe: _Probe, h: int, w: int) -> _Scan:
    half_angle = math.radians(rng.uniform(28.0, 38.0))
    r_min_rel = rng.uniform(0.25, 0.6)  # probe radius relative to the imaged depth
    r_max_rel = r_min_rel + 1.0
    # Largest fan (in pixels per unit depth) whose bounding box fits the image, apex centred.
    usable_w, usable_h = w - 1 - 2 * _FOV_MARGIN_PX, h - 1 - 2 * _FOV_MARGIN_PX
    scale = min(usable_w / (2 * r_max_rel * math.sin(half_angle)),
                usable_h / (r_max_rel - r_min_rel * math.cos(half_angle)))
    fan = _Fan(apex_x=(w - 1) / 2, apex_y=_FOV_MARGIN_PX - r_min_rel * scale * math.cos(half_angle),
               r_min=r_min_rel * scale, r_max=r_max_rel * scale, half_angle=half_angle)
    # About one sample per pixel axially and at most one pixel between beams at full depth.
    n_axial = math.ceil(scale) + 1
    n_beams = math.ceil(2 * half_angle * fan.r_max) + 1
    axial_step_px, angle_step = scale / (n_axial - 1), 2 * half_angle / (n_beams - 1)
    radius = fan.r_min + np.arange(n_axial, dtype=np.float32)[:, None] * axial_step_px
    angle = np.linspace(-half_angle, half_angle, n_beams, dtype=np.float32)[None, :]
    pixel_mm = probe.depth_mm / scale
    fov, coords = _scan_conversion(fan, h, w, axial_step_px, angle_step, n_axial, n_beams)
    return _Scan(
        x=fan.apex_x + radius * np.sin(angle), y=fan.apex_y + radius * np.cos(angle),
        depth_mm=np.arange(n_axial) * axial_step_px * pixel_mm, axial_step_mm=axial_step_px * pixel_mm,
        lateral_step_mm=(fan.r_min + scale / 2) * angle_step * pixel_mm, pixel_mm=pixel_mm,
        fov=fov, fov_beam_coords=coords, fan=fan, depth_px=scale,
        lateral_px=2 * (fan.r_min + scale / 2) * math.sin(half_angle),
    )


def _scan_conversion(fan: _Fan, h: int, w: int, axial_step_px: float, angle_step: float,
                     n_axial: int, n_beams: int) -> tuple[np.ndarray, np.ndarray]:
    """Field of view on the display grid, and where each of its pixels falls in beam space."""
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    dx, dy = x - fan.apex_x, y - fan.apex_y
    axial = (np.hypot(dx, dy) - fan.r_min) / axial_step_px
    beam = (np.arctan2(dx, dy) + fan.half_angle) / angle_step
    fov = (axial >= 0) & (axial <= n_axial - 1) & (beam >= 0) & (beam <= n_beams - 1)
    return fov, np.stack([axial[fov], beam[fov]])


# ---------------------------------------------------------------------------------------------
# Lesions


def _draw_lesion(rng: np.random.Generator, kind: str, size_px: float, tissue_db_cm_mhz: float) -> Lesion:
    """Shape, echogenicity and attenuation for one lesion, centred at the origin."""
    if kind == "hypoechoic":  # solid, often irregular, attenuating -> posterior shadow
        contrast, irregularity = rng.uniform(-15.0, -6.0), rng.uniform(0.08, 0.3)
        attenuation = tissue_db_cm_mhz + rng.uniform(0.2, 1.1)
    elif kind == "hyperechoic":  # smooth-ish, attenuating like tissue -> no posterior effect
        contrast, irregularity = rng.uniform(6.0, 14.0), rng.uniform(0.02, 0.12)
        attenuation = tissue_db_cm_mhz
    elif kind == "complex":  # solid wall near the tissue's echo level around a fluid part
        contrast, irregularity = rng.uniform(-8.0, 3.0), rng.uniform(0.02, 0.12)
        attenuation = tissue_db_cm_mhz
    elif kind == "wrapping":  # smooth organ tissue near the surroundings' level, carved around a neighbour
        contrast, irregularity = rng.uniform(-6.0, 6.0), rng.uniform(0.02, 0.1)
        attenuation = tissue_db_cm_mhz
    elif kind == "halo":  # solid, about as echoic as the tissue: only its rim tells where it ends
        contrast, irregularity = rng.uniform(-4.0, 4.0), rng.uniform(0.02, 0.1)
        attenuation = tissue_db_cm_mhz
    else:  # cyst: anechoic fluid, nearly no attenuation -> posterior enhancement
        contrast, irregularity = -40.0, rng.uniform(0.0, 0.04)
        attenuation = 0.002
    orders = np.arange(2, 13)
    raw = rng.normal(size=orders.size) / orders  # roughness falls off with spatial frequency
    amplitudes = raw * irregularity / max(float(np.linalg.norm(raw)), 1e-9)
    amplitudes *= min(1.0, 0.45 / max(float(np.abs(amplitudes).sum()), 1e-9))  # keep it star-shaped
    phases = rng.uniform(0, 2 * np.pi, size=orders.size)
    semi_major = rng.uniform(0.08, 0.2) * size_px
    semi_minor = semi_major * rng.uniform(0.5, 1.0)
    lesion = Lesion(
        kind=kind, center_xy=(0.0, 0.0), semi_axes_px=(semi_major, max(semi_minor, 2.0)),
        angle_rad=float(rng.uniform(0, np.pi)),
        harmonics=tuple(
            (int(k), float(a), float(p)) for k, a, p in zip(orders, amplitudes, phases, strict=True)
        ),
        contrast_db=float(contrast), attenuation_db_cm_mhz=float(attenuation),
    )
    if kind == "wrapping":
        return replace(lesion, neighbour=_draw_neighbour(rng, lesion))
    if kind == "halo":  # the thyroid nodule's thin dark halo (most), or a bright capsule
        rim_db = rng.uniform(-16.0, -8.0) if rng.random() < 0.7 else rng.uniform(6.0, 12.0)
        width = max(rng.uniform(0.06, 0.16), min(0.35, _MIN_HALO_PX / min(lesion.semi_axes_px)))
        return replace(lesion, rim_db=float(rim_db), rim_width=float(width))
    if kind != "complex":
        return lesion
    # Half have a bright capsule, a quarter a dark halo, the rest no rim: the wall's outline is faint or absent.
    rim = rng.choice(3, p=(0.5, 0.25, 0.25))
    rim_db = (rng.uniform(8.0, 14.0), rng.uniform(-14.0, -8.0), 0.0)[int(rim)]
    return replace(lesion, core=_draw_core(rng, lesion), rim_db=float(rim_db), rim_width=float(rng.uniform(0.1, 0.2)))


def _draw_core(rng: np.random.Generator, lesion: Lesion) -> Lesion:
    """The fluid part of a complex lesion: a smaller, rougher shape off its centre (relative coordinates)."""
    scale = rng.uniform(*_CORE_SCALE)
    offset = rng.uniform(-_CORE_OFFSET, _CORE_OFFSET, size=2) * (1 - scale) / (1 - _CORE_SCALE[0])
    cos_t, sin_t = math.cos(lesion.angle_rad), math.sin(lesion.angle_rad)
    du, dv = offset[0] * lesion.semi_axes_px[0], offset[1] * lesion.semi_axes_px[1]
    orders = np.arange(2, 9)
    amplitudes = rng.normal(size=orders.size) / orders
    amplitudes *= rng.uniform(0.05, 0.25) / max(float(np.linalg.norm(amplitudes)), 1e-9)
    return Lesion(
        kind="fluid", center_xy=(du * cos_t - dv * sin_t, du * sin_t + dv * cos_t),
        semi_axes_px=(lesion.semi_axes_px[0] * scale, lesion.semi_axes_px[1] * scale),
        angle_rad=lesion.angle_rad,
        harmonics=tuple((int(k), float(a), float(p)) for k, a, p in
                        zip(orders, amplitudes, rng.uniform(0, 2 * np.pi, size=orders.size), strict=True)),
        contrast_db=-40.0, attenuation_db_cm_mhz=0.002,
    )


def _draw_neighbour(rng: np.random.Generator, lesion: Lesion) -> Lesion:
    """What a wrapping lesion is carved around: a round structure off its centre (relative coordinates)."""
    direction = rng.uniform(0, 2 * np.pi)
    a, b = lesion.semi_axes_px
    t = direction - lesion.angle_rad  # the lesion's ellipse radius in that direction
    reach = a * b / math.hypot(b * math.cos(t), a * math.sin(t))
    distance = rng.uniform(*_NEIGHBOUR_DISTANCE) * reach
    radius = rng.uniform(*_NEIGHBOUR_SCALE) * min(a, b)
    echo = list(_NEIGHBOUR_ECHO)[int(rng.integers(len(_NEIGHBOUR_ECHO)))]
    contrast, ring = _NEIGHBOUR_ECHO[echo]
    attenuation = 0.002 if echo == "vessel" else lesion.attenuation_db_cm_mhz
    return Lesion(
        kind=echo, center_xy=(distance * math.cos(direction), distance * math.sin(direction)),
        semi_axes_px=(radius, radius * rng.uniform(0.8, 1.0)), angle_rad=float(rng.uniform(0, np.pi)),
        harmonics=(), contrast_db=contrast, attenuation_db_cm_mhz=attenuation,
        rim_db=ring, rim_width=float(rng.uniform(0.15, 0.25)) if ring else 0.0,
    )


def _place_lesions(rng: np.random.Generator, kinds: list[str], scan: _Scan, probe: _Probe,
                   lesion_scale: float = 1.0) -> list[Lesion]:
    """Non-overlapping lesions entirely inside the field of view (rejection sampling)."""
    size_px = lesion_scale * min(scan.depth_px, scan.lateral_px) / math.sqrt(max(len(kinds), 1))
    placed: list[Lesion] = []
    for kind in kinds:
        for _ in range(200):
            lesion = _draw_lesion(rng, kind, size_px, probe.attenuation_db_cm_mhz)
            radius = lesion.bounding_radius_px
            x, y = _lesion_centre(rng, scan, radius, enlarged=lesion_scale > 1.0)
            apart = all(math.hypot(x - o.center_xy[0], y - o.center_xy[1]) > radius + o.bounding_radius_px + 4
                        for o in placed)
            if apart and scan.holds_disc(x, y, radius):
                placed.append(replace(lesion, center_xy=(float(x), float(y))))
                break
        else:
            raise ValueError(f"could not fit {len(kinds)} non-overlapping lesions in this image; use fewer")
    return placed


def _lesion_centre(rng: np.random.Generator, scan: _Scan, radius: float, enlarged: bool) -> tuple[float, float]:
    """Where to try a lesion: mid-depth anywhere across; an enlarged lesion on a linear scan anywhere it
    fits (mid-depth alone would keep only the smaller ones)."""
    if enlarged and scan.fan is None:
        h, w = scan.fov.shape
        reach = min(radius + 2 * _FOV_MARGIN_PX, (min(h, w) - 1) / 2)
        return float(rng.uniform(reach, w - 1 - reach)), float(rng.uniform(reach, h - 1 - reach))
    return scan.point(rng.uniform(0.25, 0.75), rng.uniform(0.0, 1.0))


def _label_beam_space(lesions: list[Lesion], scan: _Scan) -> np.ndarray:
    """0 for tissue, i + 1 inside lesion i, for every beam sample."""
    labels = np.zeros(scan.x.shape, dtype=np.int16)
    for i, lesion in enumerate(lesions):
        cx, cy = lesion.center_xy
        reach = lesion.bounding_radius_px + 1
        near = np.flatnonzero((np.abs(scan.x - cx) <= reach) & (np.abs(scan.y - cy) <= reach))  # cheap cull
        inside = lesion.contains(scan.x.reshape(-1)[near], scan.y.reshape(-1)[near])
        labels.reshape(-1)[near[inside]] = i + 1
    return labels


def _display_masks(lesions: list[Lesion], fov: np.ndarray) -> np.ndarray:
    """Exact lesion masks at the display pixel centres, clipped to the field of view."""
    h, w = fov.shape
    masks = np.zeros((len(lesions), h, w), dtype=bool)
    for i, lesion in enumerate(lesions):
        cx, cy = lesion.center_xy
        reach = lesion.bounding_radius_px + 1
        rows = slice(max(0, math.floor(cy - reach)), min(h, math.ceil(cy + reach) + 1))
        cols = slice(max(0, math.floor(cx - reach)), min(w, math.ceil(cx + reach) + 1))
        y, x = np.mgrid[rows, cols]
        masks[i, rows, cols] = lesion.contains(x.astype(np.float32), y.astype(np.float32))
    return masks & fov


# ---------------------------------------------------------------------------------------------
# Echo formation


def _power(decibels):
    """10^(dB/10), through exp, which is several times faster than a float power."""
    return np.exp(decibels * (math.log(10) / 10))


def _smooth_basis(n: int, cells: int) -> np.ndarray:
    """(n, cells) Gaussian bumps on a coarse grid, rows scaled so a unit-variance weighting of
    them has unit variance at every sample."""
    t = (np.arange(n, dtype=np.float32)[:, None] + 0.5) * (cells / n)
    basis = np.exp(-0.5 * ((t - np.arange(cells, dtype=np.float32) - 0.5) / 0.8) ** 2)
    return basis / np.sqrt((basis**2).sum(axis=1, keepdims=True))


def _smooth_field(rng: np.random.Generator, shape: tuple[int, int], cells: int, sigma_db: float):
    """Low-frequency random variation in dB with std `sigma_db` everywhere: a coarse Gaussian
    grid expanded separably, far cheaper than a spline zoom."""
    coarse = rng.normal(0.0, sigma_db, size=(cells, cells)).astype(np.float32)
    rows = _smooth_basis(shape[0], cells) @ coarse
    # einsum rather than a BLAS matmul: with an inner size of a few cells, waking BLAS threads
    # on a busy machine costs far more than the arithmetic.
    return np.einsum("ik,jk->ij", rows, _smooth_basis(shape[1], cells))


def _tissue_db(rng: np.random.Generator, shape: tuple[int, int], homogeneous: bool):
    """Background echogenicity (dB) and specular interface power, in beam space.

    Layers follow the probe surface: skin, then bands (fat is darker than gland or muscle)
    separated by wavy bright interfaces (fascia), then deep parenchyma.
    """
    n_axial, n_beams = shape
    if homogeneous:
        return np.zeros(shape, np.float32), np.zeros(shape, np.float32), np.zeros(shape, np.float32)
    texture = _smooth_field(rng, shape, 6, 1.5)
    n_layers = int(rng.integers(2, 5))
    depth_idx = np.arange(n_axial, dtype=np.float32)[:, None]
    beam_phase = np.linspace(0, 2 * np.pi, n_beams, dtype=np.float32)[None, :]
    band = np.zeros(shape, dtype=np.int16)
    specular = np.zeros(shape, dtype=np.float32)
    boundaries = np.concatenate([[0.006], np.sort(rng.uniform(0.04, 0.35, size=n_layers))])
    for k, fraction in enumerate(boundaries):
        amplitude = rng.uniform(0.004, 0.02) * n_axial
        cycles, phase = rng.uniform(0.5, 2.5), rng.uniform(0, 2 * np.pi)
        interface = fraction * n_axial + (amplitude * np.sin(cycles * beam_phase + phase) if k else 0.0)
        band += depth_idx > interface
        power, width = _power(rng.uniform(6.0, 14.0)), rng.uniform(0.6, 1.5)
        # The bright line only matters a few widths around the interface.
        near = slice(max(0, int(np.min(interface) - 5 * width)), int(np.max(interface) + 5 * width) + 1)
        specular[near] += power * np.exp(-0.5 * ((depth_idx[near] - interface) / width) ** 2)
    # Bands above the last interface get their own level; the deepest band is parenchyma (0 dB).
    offsets = np.append(rng.uniform(-8.0, 2.0, size=len(boundaries)), 0.0).astype(np.float32)
    return texture + offsets[band], texture, specular


def _reflectivity(rng, scan: _Scan, labels: np.ndarray, lesions: list[Lesion], homogeneous: bool):
    shape = scan.x.shape
    tissue_db, texture_db, specular = _tissue_db(rng, shape, homogeneous)
    internal_db = np.zeros(shape, np.float32) if homogeneous else _smooth_field(rng, shape, 16, 2.0)
    level_db = tissue_db
    for i, lesion in enumerate(lesions):
        # A lesion replaces the tissue (layers and fascia included) with its own echo level,
        # set relative to the surrounding echotexture.
        inside = labels == i + 1
        level_db = np.where(inside, texture_db + internal_db + lesion.contrast_db, level_db)
        if lesion.core is not None or lesion.rim_db:
            where = np.flatnonzero(inside)
            x, y = scan.x.reshape(-1)[where], scan.y.reshape(-1)[where]
            level_db.reshape(-1)[where[lesion.rim_contains(x, y)]] += lesion.rim_db
            if lesion.core is not None:
                fluid = where[lesion.core_contains(x, y)]
                level_db.reshape(-1)[fluid] = texture_db.reshape(-1)[fluid] + lesion.core.contrast_db
        specular[inside] = 0.0
        if lesion.neighbour is not None:
            _draw_neighbour_echo(scan, lesion, texture_db, level_db, specular)
    return _power(level_db) + specular


def _draw_neighbour_echo(scan: _Scan, lesion: Lesion, texture_db: np.ndarray, level_db: np.ndarray,
                         specular: np.ndarray) -> None:
    """A wrapping lesion's neighbour, in place: its own level (and ring) over its whole disc."""
    cx, cy = lesion.center_xy
    ncx, ncy = cx + lesion.neighbour.center_xy[0], cy + lesion.neighbour.center_xy[1]
    reach = lesion.neighbour.bounding_radius_px + 1
    near = np.flatnonzero((np.abs(scan.x - ncx) <= reach) & (np.abs(scan.y - ncy) <= reach))
    x, y = scan.x.reshape(-1)[near] - cx, scan.y.reshape(-1)[near] - cy
    where = near[lesion.neighbour.contains(x, y)]
    level_db.reshape(-1)[where] = texture_db.reshape(-1)[where] + lesion.neighbour.contrast_db
    ring = near[lesion.neighbour.rim_contains(x, y)]
    level_db.reshape(-1)[ring] += lesion.neighbour.rim_db
    specular.reshape(-1)[where] = 0.0


def _round_trip_db(probe: _Probe, scan: _Scan, labels: np.ndarray, lesions: list[Lesion]) -> np.ndarray:
    """Echo gain in dB at each sample: focal zone minus attenuation there and back."""
    per_sample = np.full(labels.shape, probe.attenuation_db_cm_mhz, dtype=np.float32)
    for i, lesion in enumerate(lesions):
        per_sample[labels == i + 1] = lesion.attenuation_db_cm_mhz
    per_sample *= probe.frequency_mhz * scan.axial_step_mm / 10.0
    # Attenuation accumulates along each beam: this is where shadows and enhancement come from.
    attenuation = 2.0 * (np.cumsum(per_sample, axis=0) - 0.5 * per_sample)
    depth = scan.depth_mm / scan.depth_mm[-1]
    focal = probe.focal_gain_db * np.exp(-0.5 * ((depth - probe.focal_depth) / 0.25) ** 2)
    return focal[:, None].astype(np.float32) - attenuation


def _tgc_db(probe: _Probe, scan: _Scan) -> np.ndarray:
    """Receiver gain vs depth: the nominal attenuation undone, plus slider mis-settings."""
    nominal = 2.0 * NOMINAL_ATTENUATION_DB_CM_MHZ * probe.frequency_mhz * scan.depth_mm / 10.0
    knots = np.linspace(0.0, scan.depth_mm[-1], len(probe.tgc_error_db))
    return (nominal + np.interp(scan.depth_mm, knots, probe.tgc_error_db)).astype(np.float32)


def _envelope(rng, probe: _Probe, scan: _Scan, reflectivity: np.ndarray, gain_db: np.ndarray) -> np.ndarray:
    """Speckle: complex Gaussian scatterers through the PSF, plus noise, then |.| after TGC."""
    shape = reflectivity.shape
    amplitude = np.sqrt(0.5 * reflectivity * _power(gain_db))
    noise = 10 ** (-probe.snr_db / 20) / math.sqrt(2)  # receiver noise, before the receive filter
    # PSF in samples; below half a sample the speckle would be aliased white noise.
    sigma = (max(probe.sigma_axial_mm / scan.axial_step_mm, 0.5),
             max(probe.sigma_lateral_mm / scan.lateral_step_mm, 0.5))
    parts = []
    for _ in range(2):  # in-phase and quadrature
        field = rng.standard_normal(shape, dtype=np.float32) * amplitude
        field += noise * rng.standard_normal(shape, dtype=np.float32)
        parts.append(ndimage.gaussian_filter(field, sigma, mode="reflect", truncate=3.0))
    tgc = 10 ** (_tgc_db(probe, scan) / 20)
    return np.hypot(parts[0], parts[1]) * tgc[:, None]


def _log_compress(probe: _Probe, envelope: np.ndarray, tissue: np.ndarray) -> np.ndarray:
    """Decibels mapped linearly to gray, median tissue echo at the chosen gray level."""
    decibels = 20 * np.log10(envelope + 1e-12)
    reference = np.median(decibels[tissue]) if tissue.any() else np.median(decibels)
    gray = probe.tissue_gray + (decibels - reference) * (255.0 / probe.dynamic_range_db)
    # Scanners smooth the displayed image a little (speckle reduction, interpolation), which
    # softens the black cracks pure log compression draws at the envelope's zeros.
    return ndimage.gaussian_filter(gray, probe.display_smoothing_px)


def _to_display(scan: _Scan, beam_image: np.ndarray) -> np.ndarray:
    if scan.fov_beam_coords is None:
        return beam_image.astype(np.float32)
    display = np.zeros(scan.fov.shape, dtype=np.float32)
    display[scan.fov] = ndimage.map_coordinates(beam_image, scan.fov_beam_coords, order=1, mode="nearest")
    return display


# ---------------------------------------------------------------------------------------------
# Entry points


def _as_hw(size: int | tuple[int, int]) -> tuple[int, int]:
    h, w = (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))
    if min(h, w) < 32:
        raise ValueError(f"phantom size must be at least 32x32 pixels, got {h}x{w}")
    return h, w


def _lesion_kinds(rng: np.random.Generator, kind: str, n_lesions: int) -> list[str]:
    if kind not in KINDS:
        raise ValueError(f"unknown lesion kind {kind!r}; choose one of {', '.join(KINDS)}")
    if n_lesions < 0:
        raise ValueError(f"n_lesions must be >= 0, got {n_lesions}")
    weights = _MIXED_WEIGHTS.get(kind, _MIXED_WEIGHTS["mixed"])  # drawn for every kind: one random stream
    drawn = [str(k) for k in rng.choice(LESION_KINDS, size=n_lesions, p=weights)]
    return drawn if kind in _MIXED_WEIGHTS else [kind] * n_lesions


def make_phantom(
    seed: int,
    size: int | tuple[int, int] = 256,
    kind: str = "hypoechoic",
    n_lesions: int = 1,
    *,
    geometry: str = "random",
    homogeneous: bool = False,
    lesion_scale: float = 1.0,
) -> Phantom:
    """Simulate one B-mode image; the same arguments always give the same phantom.

    `size` is HxW (an int for square). `kind`: "hypoechoic" (solid, casts a shadow),
    "hyperechoic", "cyst" (anechoic, posterior enhancement), "complex" (a near-isoechoic solid
    wall around an anechoic part; the mask is the whole lesion), "wrapping" (near-isoechoic tissue
    carved around a round neighbour that lies partly inside its box and is not labelled), "halo" (solid,
    near-isoechoic, outlined only by a thin dark halo or a bright capsule; the mask holds the rim), "mixed"
    (drawn per lesion among the first three), "mixed-complex" (the first four) or "mixed-wrapping"
    (the first three and wrapping).
    `n_lesions` may be 0 (a normal image, empty mask). `geometry`: "linear" (rectangular,
    high frequency), "sector" (curvilinear fan, black outside) or "random" (35% sector).
    `homogeneous=True` gives a calibration-style phantom: uniform background without layers,
    texture or focal zone, and exactly compensated attenuation, e.g. to check speckle statistics.
    `lesion_scale` multiplies the lesions' size (at 1, a lone lesion's diameter is 16-40 % of the image's
    smaller side; at 2, up to 80 %, an object that fills its image as a cropped nodule does).
    """
    if not 0.1 <= lesion_scale <= 2.5:
        raise ValueError(f"lesion_scale must lie in [0.1, 2.5], got {lesion_scale}")
    if geometry not in GEOMETRIES:
        raise ValueError(f"unknown geometry {geometry!r}; choose one of {', '.join(GEOMETRIES)}")
    h, w = _as_hw(size)
    rng = np.random.default_rng(seed)
    kinds = _lesion_kinds(rng, kind, n_lesions)
    probe = _draw_probe(rng, geometry, homogeneous)
    scan = _linear_scan(probe, h, w) if probe.geometry == "linear" else _sector_scan(rng, probe, h, w)
    lesions = _place_lesions(rng, kinds, scan, probe, lesion_scale)
    labels = _label_beam_space(lesions, scan)
    reflectivity = _reflectivity(rng, scan, labels, lesions, homogeneous)
    envelope = _envelope(rng, probe, scan, reflectivity, _round_trip_db(probe, scan, labels, lesions))
    gray = _to_display(scan, _log_compress(probe, envelope, labels == 0))
    lesion_masks = _display_masks(lesions, scan.fov)
    image = np.where(scan.fov, np.clip(np.rint(gray), 0, 255), 0).astype(np.uint8)
    return Phantom(
        image=image, mask=lesion_masks.any(axis=0), lesion_masks=lesion_masks,
        envelope=_to_display(scan, envelope), fov=scan.fov, lesions=tuple(lesions),
        geometry=probe.geometry, frequency_mhz=probe.frequency_mhz, depth_mm=probe.depth_mm,
        pixel_spacing_mm=scan.pixel_mm, attenuation_db_cm_mhz=probe.attenuation_db_cm_mhz,
        dynamic_range_db=probe.dynamic_range_db, seed=seed,
    )


def phantom_seed(dataset_seed: int, index: int) -> int:
    """Seed of phantom `index` in a dataset: independent streams, reproducible one by one."""
    return int(np.random.SeedSequence([dataset_seed, index]).generate_state(1)[0])


def _png_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def write_phantom_dataset(
    out_dir: str | Path,
    n: int,
    seed: int = 0,
    size: int | tuple[int, int] = 256,
    *,
    kind: str = "mixed",
    n_lesions: int = 1,
    geometry: str = "random",
    lesion_scale: float = 1.0,
) -> Path:
    """Write `n` phantoms as a dataset folder and return it.

    Layout as every dataset of the project: `images/<stem>.png` (8-bit gray) and
    `masks/<stem>.png` (0/255), stems `phantom_0000`, ...; plus `meta.csv`, one row per stem:
    `kind`, `n_lesions`, `geometry` and `seed` regenerate it exactly with
    `make_phantom(seed, size, kind, n_lesions, geometry=geometry, lesion_scale=lesion_scale)`; `lesion_kinds` and
    `pixel_spacing_mm` describe it.
    Every file is written to a temporary name and renamed, so a crash leaves no torn file.
    """
    out = Path(out_dir)
    rows = ["stem,kind,n_lesions,geometry,seed,lesion_scale,lesion_kinds,pixel_spacing_mm"]
    for index in range(n):
        seed_i = phantom_seed(seed, index)
        phantom = make_phantom(seed_i, size, kind, n_lesions, geometry=geometry, lesion_scale=lesion_scale)
        stem = f"phantom_{index:04d}"
        atomic_write_bytes(out / "images" / f"{stem}.png", _png_bytes(phantom.image))
        atomic_write_bytes(out / "masks" / f"{stem}.png", _png_bytes(phantom.mask.astype(np.uint8) * 255))
        lesion_kinds = "+".join(lesion.kind for lesion in phantom.lesions) or "none"
        rows.append(f"{stem},{kind},{n_lesions},{phantom.geometry},{seed_i},{lesion_scale:g},{lesion_kinds},"
                    f"{phantom.pixel_spacing_mm:.4f}")
    atomic_write_text(out / "meta.csv", "\n".join(rows) + "\n")
    return out
