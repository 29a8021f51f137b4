"""Unsupervised region pseudo-masks (uniultra.data.regions) on synthetic speckle images."""

import numpy as np
import pytest
from PIL import Image
from scipy import ndimage as ndi

from uniultra.data import regions
from uniultra.data.regions import (
    DEFAULT_LEVELS,
    METHOD_VERSION,
    cache_dataset_regions,
    grow_region,
    load_dataset_regions,
    region_label_maps,
    sample_region,
)

H, W = 224, 256  # longer side = the default work_size, so maps and ground truth share pixels


def _speckle(level: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """B-mode speckle: a Rayleigh envelope with grains (|low-passed complex Gaussian|), log-compressed for display.

    `level` is each tissue's mean grey level. Log compression over a 60 dB dynamic range gives the
    local std/mean of ~0.2 that real images show at 256 px (0.14-0.21 on busi, ddti, tg3k, nerve);
    the raw linear envelope would be 0.5, far noisier than any scanner's display.
    """
    def lowpass() -> np.ndarray:
        return ndi.gaussian_filter(rng.normal(size=level.shape), 1.0)

    envelope = np.abs(lowpass() + 1j * lowpass())  # Rayleigh distributed
    decibels = 20 * np.log10(envelope / np.sqrt(np.mean(envelope**2)))
    # 1..255: a 0 would mean "outside the ultrasound fan"
    return np.clip(level + decibels * 255 / 60, 1, 255).astype(np.uint8)


def _yx(h: int = H, w: int = W) -> tuple[np.ndarray, np.ndarray]:
    return np.mgrid[0:h, 0:w].astype(float)


def _phantom() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    yy, xx = _yx()
    disc = (yy - 80) ** 2 + (xx - 70) ** 2 <= 32**2
    ellipse = ((yy - 140) / 30) ** 2 + ((xx - 175) / 50) ** 2 <= 1
    level = np.full((H, W), 120.0)
    level[disc] = 50.0
    level[ellipse] = 190.0
    return _speckle(level, np.random.default_rng(0)), disc, ellipse


@pytest.fixture(scope="module")
def phantom_maps():
    image, disc, ellipse = _phantom()
    return region_label_maps(image), disc, ellipse


def _best_iou(maps: np.ndarray, target: np.ndarray) -> float:
    best = 0.0
    for level in maps:
        for label in np.unique(level)[1:]:
            region = level == label
            best = max(best, (region & target).sum() / (region | target).sum())
    return best


def test_finds_dark_disc_and_bright_ellipse(phantom_maps):
    maps, disc, ellipse = phantom_maps
    assert _best_iou(maps, disc) > 0.8
    assert _best_iou(maps, ellipse) > 0.8


def test_label_map_contract(phantom_maps):
    maps, _, _ = phantom_maps
    assert maps.dtype == np.uint8 and maps.shape == (len(DEFAULT_LEVELS), H, W)
    for level in maps:
        labels = np.unique(level)
        n = int(labels.max())
        assert n >= 1 and set(labels.tolist()) <= set(range(n + 1))
        # every kept region is at least the minimum area (hole filling only grows regions)
        assert np.bincount(level.ravel())[1:].min() >= regions.MIN_AREA * level.size


def test_any_size_rgb_and_custom_levels():
    rgb = np.repeat(_phantom()[0][:, :, None], 3, axis=2)
    big = np.asarray(Image.fromarray(rgb).resize((400, 350)))
    maps = region_label_maps(big, work_size=128, levels=(2.0, 8.0))
    assert maps.dtype == np.uint8 and maps.shape == (2, 112, 128)
    assert maps.any()


def test_coarser_levels_have_fewer_regions(phantom_maps):
    maps, _, _ = phantom_maps
    counts = [len(np.unique(level)) - 1 for level in maps]
    assert counts[0] > counts[-1]


def test_sample_region_returns_regions_of_the_maps(phantom_maps):
    maps, _, _ = phantom_maps
    rng = np.random.default_rng(1)
    for _ in range(30):
        mask = sample_region(maps, rng)
        assert mask is not None and mask.dtype == bool and mask.shape == maps.shape[1:]
        assert any(_is_one_region(level, mask) for level in maps)


def _is_one_region(level: np.ndarray, mask: np.ndarray) -> bool:
    labels = np.unique(level[mask])
    return labels.size == 1 and labels[0] > 0 and np.array_equal(level == labels[0], mask)


def test_sample_region_is_uniform_over_levels_then_regions():
    maps = np.zeros((3, 10, 10), np.uint8)
    maps[0, :5] = 1  # one region on level 0, nine on level 1, level 2 empty
    maps[1] = np.arange(10)[:, None] % 10
    rng = np.random.default_rng(2)
    picks = [sample_region(maps, rng) for _ in range(2000)]
    level0 = np.mean([np.array_equal(m, maps[0] == 1) for m in picks])
    assert 0.45 < level0 < 0.55  # 1/2, not 1/10


def test_grow_region_adds_every_pixel_within_the_distance():
    region = np.zeros((21, 21), bool)
    region[10, 10] = True
    grown = grow_region(region, 3.0)
    yy, xx = np.mgrid[:21, :21]
    assert np.array_equal(grown, np.hypot(yy - 10, xx - 10) <= 3.0)
    assert grow_region(region, 0.0) is region
    assert not grow_region(np.zeros((5, 5), bool), 2.0).any()


def test_grow_region_shrinks_by_a_negative_distance():
    yy, xx = np.mgrid[:41, :41]
    disc = np.hypot(yy - 20, xx - 20) <= 10
    assert np.array_equal(grow_region(disc, -1.0), disc & ~grow_region(~disc, 1.0))  # the border ring goes
    shrunk = grow_region(disc, -4.0)
    assert shrunk[20, 26] and not shrunk[20, 27]  # the outside starts at 11: 5 and 4 px away
    assert not grow_region(disc, -11.0).any()


def test_sample_region_none_without_regions():
    assert sample_region(np.zeros((4, 16, 16), np.uint8), np.random.default_rng(0)) is None
    assert sample_region(np.zeros((0, 16, 16), np.uint8), np.random.default_rng(0)) is None


def _fan_image() -> tuple[np.ndarray, np.ndarray]:
    """A sector scan: speckled tissue with a dark and a bright blob inside, exactly 0 outside the fan.

    The fan reaches the bottom edge, so the black outside is two wedges of ~20% each: small enough
    to pass the size filter, so only the fan filter can drop them.
    """
    yy, xx = _yx()
    angle = np.degrees(np.arctan2(xx - W / 2, yy + 20))
    fan = np.abs(angle) <= 38
    level = np.full((H, W), 120.0)
    level[(yy - 150) ** 2 + (xx - 110) ** 2 <= 25**2] = 50.0
    level[(yy - 90) ** 2 + (xx - 150) ** 2 <= 20**2] = 200.0
    image = np.where(fan, _speckle(level, np.random.default_rng(3)), 0).astype(np.uint8)
    return image, ~fan


def _most_black_fraction(maps: np.ndarray, outside: np.ndarray) -> float:
    return max(outside[level == label].mean() for level in maps for label in np.unique(level)[1:])


def test_no_region_lies_mostly_outside_the_fan():
    image, outside = _fan_image()
    maps = region_label_maps(image)
    assert maps.any()
    assert _most_black_fraction(maps, outside) <= regions.MAX_BLACK


def test_fan_test_detects_unfiltered_background(monkeypatch):
    """Without the fan filter the black wedges come back as regions: the test above can fail."""
    monkeypatch.setattr(regions, "MAX_BLACK", 1.0)
    image, outside = _fan_image()
    assert _most_black_fraction(region_label_maps(image), outside) > 0.9


def test_dataset_cache_round_trip(tmp_path):
    images = tmp_path / "toy" / "images"
    images.mkdir(parents=True)
    phantom = _phantom()[0]
    Image.fromarray(phantom).save(images / "a.png")
    Image.fromarray(phantom[:, ::-1].copy()).save(images / "b.png")
    path = cache_dataset_regions(images, tmp_path / "cache", levels=(3.0, 12.0))
    assert path == tmp_path / "cache" / f"toy_regions-v{METHOD_VERSION}.npz"
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temporary file left
    cache = load_dataset_regions(tmp_path / "cache", "toy")
    assert sorted(cache) == ["a", "b"] and len(cache) == 2
    assert "a" in cache and "c" not in cache
    np.testing.assert_array_equal(cache["a"], region_label_maps(phantom, levels=(3.0, 12.0)))
    with pytest.raises(FileNotFoundError):
        load_dataset_regions(tmp_path / "cache", "other")


def test_region_cache_progress_bar_can_be_silenced(tmp_path, capsys):
    """`--no-progress` logs of a zoomed training must not fill with one bar line per image."""
    images = tmp_path / "toy" / "images"
    images.mkdir(parents=True)
    Image.fromarray(_phantom()[0]).save(images / "a.png")
    cache_dataset_regions(images, tmp_path / "quiet", levels=(3.0,), progress=False)
    assert "regions toy" not in capsys.readouterr().err
    cache_dataset_regions(images, tmp_path / "loud", levels=(3.0,), progress=True)
    assert "regions toy" in capsys.readouterr().err
