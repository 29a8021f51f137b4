"""Synthetic ultrasound phantoms: exact masks, plausible physics, dataset files in the project format."""

from __future__ import annotations

import csv
import math

import numpy as np
import pytest
from PIL import Image
from scipy import ndimage

from uniultra.data.dataset import SegmentationDataset
from uniultra.data.phantom import make_phantom, write_phantom_dataset

# Mean over std of a Rayleigh amplitude: sqrt(pi / (4 - pi)).
RAYLEIGH_SNR = math.sqrt(math.pi / (4 - math.pi))


def _surroundings(phantom) -> np.ndarray:
    """A ring of tissue around the lesion, above its lowest row (below it lies its shadow)."""
    mask = phantom.mask
    ring = ndimage.binary_dilation(mask, iterations=8) & ~ndimage.binary_dilation(mask, iterations=3)
    ring[np.nonzero(mask.any(axis=1))[0].max() + 1:] = False
    return ring & phantom.fov


def _posterior_db(phantom) -> tuple[float, float]:
    """(measured, expected) echo change in dB below the lesion's middle columns vs beside them."""
    mask = phantom.mask
    rows, cols = np.nonzero(mask.any(axis=1))[0], np.nonzero(mask.any(axis=0))[0]
    first, last = cols.min(), cols.max()
    quarter = (last - first + 1) // 4
    middle = np.arange(first + quarter, last - quarter + 1)
    side = np.r_[np.arange(first - 4 - 2 * quarter, first - 4), np.arange(last + 5, last + 5 + 2 * quarter)]
    side = side[(side >= 0) & (side < mask.shape[1])]
    below = phantom.image[rows.max() + 4:].astype(np.float64)
    measured = (below[:, middle].mean() - below[:, side].mean()) * phantom.dynamic_range_db / 255
    # Round-trip extra attenuation through the lesion's mean thickness under those columns.
    lesion = phantom.lesions[0]
    thickness_cm = mask[:, middle].sum(axis=0).mean() * phantom.pixel_spacing_mm / 10
    extra = lesion.attenuation_db_cm_mhz - phantom.attenuation_db_cm_mhz
    return measured, -2 * extra * phantom.frequency_mhz * thickness_cm


def test_same_seed_same_phantom_and_different_seeds_differ():
    first, again, other = make_phantom(3), make_phantom(3), make_phantom(4)
    for name in ("image", "mask", "envelope", "fov"):
        np.testing.assert_array_equal(getattr(first, name), getattr(again, name))
    assert first.lesions == again.lesions
    assert not np.array_equal(first.image, other.image)
    # Naming the geometry that "random" drew gives the same phantom (same random stream).
    named = make_phantom(3, geometry=first.geometry)
    np.testing.assert_array_equal(named.image, first.image)


@pytest.mark.parametrize("geometry", ["linear", "sector"])
@pytest.mark.parametrize("size", [256, (200, 300), 64])
def test_shapes_dtypes_and_masks_inside_the_field_of_view(geometry, size):
    phantom = make_phantom(1, size, "mixed", n_lesions=2 if size != 64 else 1, geometry=geometry)
    shape = (size, size) if isinstance(size, int) else size
    assert phantom.geometry == geometry
    assert phantom.image.shape == phantom.mask.shape == phantom.envelope.shape == phantom.fov.shape == shape
    assert phantom.image.dtype == np.uint8 and phantom.mask.dtype == bool
    assert phantom.envelope.dtype == np.float32 and phantom.fov.dtype == bool
    assert phantom.lesion_masks.shape == (len(phantom.lesions), *shape)
    for lesion_mask in phantom.lesion_masks:
        assert lesion_mask.sum() > 20
    assert np.array_equal(phantom.lesion_masks.any(axis=0), phantom.mask)
    assert phantom.lesion_masks.sum(axis=0).max() == 1  # lesions never overlap
    assert not (phantom.mask & ~phantom.fov).any()
    assert not phantom.image[~phantom.fov].any()  # black outside the fan


def test_sector_fan_has_black_corners():
    phantom = make_phantom(2, 256, geometry="sector")
    assert not phantom.fov[0, 0] and not phantom.fov[-1, 0] and not phantom.fov[-1, -1]
    assert phantom.fov[phantom.fov.shape[0] // 2, phantom.fov.shape[1] // 2]
    assert 0.3 < phantom.fov.mean() < 0.9


def test_boxes_are_tight_inclusive_xyxy():
    phantom = make_phantom(5, 256, "mixed", n_lesions=3)
    assert phantom.boxes.shape == (3, 4)
    for (x0, y0, x1, y1), lesion_mask in zip(phantom.boxes, phantom.lesion_masks, strict=True):
        inside = np.zeros_like(lesion_mask)
        inside[y0:y1 + 1, x0:x1 + 1] = True
        assert not (lesion_mask & ~inside).any()
        assert lesion_mask[y0].any() and lesion_mask[y1].any()
        assert lesion_mask[:, x0].any() and lesion_mask[:, x1].any()


def test_masks_are_the_analytic_lesion_regions():
    # Area of the Fourier-perturbed ellipse: pi a b (1 + sum(a_k^2) / 2) (the harmonics have
    # zero mean). A mask thresholded from the image would miss it by far more than 3%.
    for seed in range(4):
        phantom = make_phantom(seed, 256, "mixed", n_lesions=2)
        for lesion, lesion_mask in zip(phantom.lesions, phantom.lesion_masks, strict=True):
            a, b = lesion.semi_axes_px
            area = math.pi * a * b * (1 + 0.5 * sum(amp**2 for _, amp, _ in lesion.harmonics))
            assert lesion_mask.sum() == pytest.approx(area, rel=0.03)
            y, x = np.nonzero(lesion_mask)
            assert lesion.contains(x.astype(float), y.astype(float)).all()


def test_normal_image_without_lesion():
    phantom = make_phantom(0, 128, n_lesions=0)
    assert not phantom.mask.any() and phantom.lesions == ()
    assert phantom.boxes.shape == (0, 4) and phantom.lesion_masks.shape == (0, 128, 128)


@pytest.mark.parametrize("geometry", ["linear", "sector"])
@pytest.mark.parametrize("seed", range(3))
def test_lesion_contrast_sign(geometry, seed):
    means = {}
    for kind in ("hypoechoic", "hyperechoic", "cyst"):
        phantom = make_phantom(seed, 256, kind, geometry=geometry)
        tissue = phantom.image[_surroundings(phantom)].mean()
        means[kind] = phantom.image[phantom.mask].mean() - tissue
    assert means["hypoechoic"] < -10
    assert means["hyperechoic"] > 10
    assert means["cyst"] < -40 and means["cyst"] < means["hypoechoic"]


@pytest.mark.parametrize("seed", range(3))
def test_a_complex_lesion_is_labelled_whole_around_its_dark_fluid(seed):
    phantom = make_phantom(seed, 256, "complex")
    (lesion,) = phantom.lesions
    assert lesion.kind == "complex" and lesion.core is not None
    y, x = np.nonzero(phantom.mask)
    fluid = lesion.core_contains(x.astype(np.float32), y.astype(np.float32))
    wall = ~fluid & ~lesion.rim_contains(x.astype(np.float32), y.astype(np.float32))
    assert 0.1 < fluid.mean() < 0.8  # the mask holds the fluid AND a solid wall around it
    # the fluid is anechoic; the wall is near the tissue's level, far brighter than the fluid
    tissue = phantom.image[_surroundings(phantom)].mean()
    assert phantom.image[y[fluid], x[fluid]].mean() < tissue - 30
    assert phantom.image[y[wall], x[wall]].mean() > phantom.image[y[fluid], x[fluid]].mean() + 15


@pytest.mark.parametrize("seed", range(12))
def test_a_halo_lesion_is_tissue_outlined_by_its_rim_only(seed):
    phantom = make_phantom(seed, 256, "halo")
    (lesion,) = phantom.lesions
    assert lesion.kind == "halo" and lesion.core is None and lesion.rim_db != 0 and lesion.neighbour is None
    y, x = np.nonzero(phantom.mask)
    rim = lesion.rim_contains(x.astype(np.float32), y.astype(np.float32))
    assert 0.05 < rim.mean() < 0.5  # the mask holds the rim AND the solid inside
    inside = phantom.image[y[~rim], x[~rim]].mean()
    assert abs(inside - phantom.image[_surroundings(phantom)].mean()) < 25  # about as echoic as the tissue
    # the rim is what shows the border: darker (a halo) or brighter (a capsule) than the inside
    assert np.sign(phantom.image[y[rim], x[rim]].mean() - inside) == np.sign(lesion.rim_db)


def test_mixed_draws_no_complex_lesion_and_mixed_complex_does():
    kinds = lambda kind: {l.kind for seed in range(30) for l in make_phantom(seed, 96, kind, 2).lesions}  # noqa: E731,E741
    assert not {"complex", "wrapping"} & kinds("mixed")
    assert {"complex", "cyst", "hypoechoic"} <= kinds("mixed-complex") and "wrapping" not in kinds("mixed-complex")
    assert {"wrapping", "cyst", "hypoechoic"} <= kinds("mixed-wrapping") and "complex" not in kinds("mixed-wrapping")


@pytest.mark.parametrize("seed", range(4))
def test_a_wrapping_lesion_is_carved_around_an_unlabelled_neighbour(seed):
    phantom = make_phantom(seed, 256, "wrapping")
    (lesion,) = phantom.lesions
    assert lesion.kind == "wrapping" and lesion.neighbour is not None
    yy, xx = np.mgrid[:256, :256].astype(np.float32)
    neighbour = lesion.neighbour_contains(xx, yy) & phantom.fov
    outline = lesion._outline_contains(xx, yy) & phantom.fov
    # the neighbour is not labelled, yet it lies inside the object's outline (so inside its box) in part
    assert not (phantom.mask & neighbour).any()
    assert (neighbour & outline).sum() > 0.05 * outline.sum()
    x0, y0, x1, y1 = phantom.boxes[0]
    in_box = neighbour[y0:y1 + 1, x0:x1 + 1].sum()
    assert in_box > 0.1 * phantom.mask.sum()
    # it has an echo of its own: darker than the tissue around (vessel, airway or muscle)
    core = neighbour & ~lesion.neighbour.rim_contains(xx - lesion.center_xy[0], yy - lesion.center_xy[1])
    assert phantom.image[core].mean() < phantom.image[_surroundings(phantom)].mean() - 5


@pytest.mark.parametrize("kind", ["hypoechoic", "cyst"])
def test_posterior_shadow_and_enhancement_follow_attenuation(kind):
    checked = 0
    for seed in range(6):
        measured, expected = _posterior_db(make_phantom(seed, 256, kind, geometry="linear"))
        if abs(expected) < 5:  # too thin a lesion for a clear effect above the speckle
            continue
        checked += 1
        assert (measured < 0) if kind == "hypoechoic" else (measured > 0)
        assert 0.5 * abs(expected) < abs(measured) < 1.6 * abs(expected)
    assert checked >= 3


@pytest.mark.parametrize("seed", range(3))
def test_homogeneous_speckle_envelope_is_rayleigh(seed):
    phantom = make_phantom(seed, 256, n_lesions=0, geometry="linear", homogeneous=True)
    envelope = phantom.envelope[64:192].astype(np.float64)
    assert envelope.mean() / envelope.std() == pytest.approx(RAYLEIGH_SNR, abs=0.08)


def test_invalid_arguments_are_refused():
    with pytest.raises(ValueError, match="kind"):
        make_phantom(0, kind="tumour")
    with pytest.raises(ValueError, match="geometry"):
        make_phantom(0, geometry="phased")
    with pytest.raises(ValueError, match="n_lesions"):
        make_phantom(0, n_lesions=-1)
    with pytest.raises(ValueError, match="32"):
        make_phantom(0, size=16)
    with pytest.raises(ValueError, match="fewer"):
        make_phantom(0, size=64, n_lesions=40)


def test_dataset_writer_files_metadata_and_loader(tmp_path):
    root = write_phantom_dataset(tmp_path / "phantoms", n=3, seed=7, size=(96, 128))
    stems = [f"phantom_{i:04d}" for i in range(3)]
    assert sorted(p.name for p in (root / "images").iterdir()) == [f"{s}.png" for s in stems]
    assert sorted(p.name for p in (root / "masks").iterdir()) == [f"{s}.png" for s in stems]
    with open(root / "meta.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert [row["stem"] for row in rows] == stems
    for row in rows:
        with Image.open(root / "images" / f"{row['stem']}.png") as image:
            assert image.mode == "L" and image.size == (128, 96)
            pixels = np.asarray(image)
        with Image.open(root / "masks" / f"{row['stem']}.png") as mask_file:
            mask = np.asarray(mask_file)
        assert set(np.unique(mask).tolist()) == {0, 255}
        # The seed in meta.csv regenerates the very same phantom.
        phantom = make_phantom(int(row["seed"]), (96, 128), row["kind"], int(row["n_lesions"]),
                               geometry=row["geometry"])
        np.testing.assert_array_equal(pixels, phantom.image)
        np.testing.assert_array_equal(mask > 0, phantom.mask)
    dataset = SegmentationDataset(root)
    assert len(dataset) == 3 and dataset[0]["mask"].shape == (96, 128)
    assert not [p for p in root.rglob("*") if p.name.startswith(".")]  # no temporary files left


def test_enlarged_lesions_fill_their_image_and_scale_one_changes_nothing():
    seeds = range(12)
    usual = [make_phantom(s, 128, "halo", 1, geometry="linear").mask.mean() for s in seeds]
    large = [make_phantom(s, 128, "halo", 1, geometry="linear", lesion_scale=2.5) for s in seeds]
    assert np.median([p.mask.mean() for p in large]) > 2 * np.median(usual)
    assert max(p.mask.mean() for p in large) > 0.3  # some fill a third of the image, as cropped nodules do
    same = make_phantom(5, 96, "mixed", 2, lesion_scale=1.0)
    np.testing.assert_array_equal(same.image, make_phantom(5, 96, "mixed", 2).image)
    with pytest.raises(ValueError, match="lesion_scale must lie in"):
        make_phantom(0, 64, lesion_scale=5.0)


def test_a_phantom_folder_written_before_a_spec_field_existed_is_still_recognised(tmp_path):
    import json

    from uniultra.engine.config import DataEntry, PhantomSpec
    from uniultra.engine.data import ensure_phantoms

    entry = DataEntry(name="ph", phantom=PhantomSpec(n=3, size=48))
    root = ensure_phantoms(entry, tmp_path)
    spec_file = root / "phantom.json"
    recorded = json.loads(spec_file.read_text())
    assert recorded["lesion_scale"] == 1.0 and "lesion_scale" in (root / "meta.csv").read_text().splitlines()[0]
    del recorded["lesion_scale"]  # as written before the field existed
    spec_file.write_text(json.dumps(recorded))
    assert ensure_phantoms(entry, tmp_path) == root
    other = DataEntry(name="ph", phantom=PhantomSpec(n=3, size=48, lesion_scale=2.0))
    with pytest.raises(ValueError, match="holds other phantoms"):
        ensure_phantoms(other, tmp_path)
