"""Unsupervised region pseudo-masks for ultrasound images (UnSAM-style).

Why: the labelled sets only ever prompt the model on lesions, so it learns "segment the dark blob"
rather than "segment what the prompt points at". A foundation stage trains on arbitrary regions,
bright or dark, small or large, found without labels: SLIC superpixels on a despeckled image,
merged greedily over their adjacency graph, weakest boundary first. Snapshots of that one merge
sequence at several thresholds are the granularity levels, from tissue patches to whole organs.

Merging by boundary contrast rather than by mean intensity (skimage's `rag_mean_color`): regions
in ultrasound are textured, and mean-intensity merging leaks through lesion and vessel outlines.
On 30 labelled images each of busi, ddti, tg3k, carotid and usgra_nerve, the best region's IoU
with the labelled object averages 0.55 here against 0.41 for mean-intensity merging.

Maps are computed at a fixed working resolution, so the cost does not depend on the scanner's
pixel count; a training loop rescales the sampled mask to its own input size anyway.
"""

from __future__ import annotations

import heapq
import os
import zipfile
from collections.abc import Iterator, Mapping
from pathlib import Path

import numpy as np
from PIL import Image
from scipy import ndimage as ndi
from skimage import filters, measure, morphology, segmentation

from uniultra.atomic import atomic_write
from uniultra.data.image_io import IMAGE_EXTENSIONS, read_image, to_rgb_float

# 1: mean-intensity merging (commit 8adc194; the universal-zoom runs of 2026-12-02 used it);
# 2: boundary-contrast merging.
METHOD_VERSION = 2
# Merge thresholds, one label map each, on the merge weight: the mean grey-level step (0-255) across
# the shared boundary, times (region size / superpixel size) ** SIZE_EXPONENT. Fine levels give
# tissue patches, the top ones a few large structures.
DEFAULT_LEVELS: tuple[float, ...] = (1.0, 2.0, 3.0, 4.0, 6.0, 8.0, 12.0, 16.0, 24.0)

# Parameters tuned for best IoU with the labelled objects of busi, ddti, tg3k, carotid and usgra_nerve.
MEDIAN_RADIUS = 3  # speckle grains are 2-4 px at 256 px working size: a 7 px median removes them but keeps edges
SMOOTH_SIGMA = 1.0  # the median leaves flat plateaus with jagged borders; a light blur lets SLIC snap to edges
N_SUPERPIXELS = 400  # ~160 px each at 256x256: small enough to trace a 1% lesion's outline
COMPACTNESS = 0.08  # for an image in [0, 1]: low enough that superpixel borders follow intensity edges
EDGE_SIGMA = 3.0  # contrast across a boundary is measured on a smoother image: speckle makes each pixel step noisy
SIZE_EXPONENT = 0.4  # weight grows with region size, so fragments merge before large regions meet at a weak spot
OPEN_RADIUS = 2  # removes the one- and two-pixel spurs that superpixel borders leave
MIN_AREA = 0.005  # fractions of the image: smaller is speckle, larger is background
MAX_AREA = 0.5
MAX_BLACK = 0.5  # a region with more of its area exactly 0 lies in the black outside the ultrasound fan
MAX_REGIONS = 255  # uint8 label maps


def region_label_maps(image: np.ndarray, *, work_size: int = 256, levels: tuple[float, ...] = DEFAULT_LEVELS
                      ) -> np.ndarray:
    """Region label maps of one image: (len(levels), h, w) uint8, 0 = no region, 1..K = regions.

    (h, w) is the image's size scaled so that its longer side is `work_size`.
    """
    gray = _gray_uint8(image)
    small, black = _resize(gray, work_size)
    smooth = _despeckle(small)
    superpixels = segmentation.slic(smooth, n_segments=N_SUPERPIXELS, compactness=COMPACTNESS, channel_axis=None,
                                    start_label=0)
    merges = _merge_order(superpixels, ndi.gaussian_filter(smooth, EDGE_SIGMA))
    maps = [_clean_regions(_merged_labels(superpixels, merges, t / 255.0), black) for t in levels]
    return np.stack(maps) if maps else np.zeros((0, *small.shape), np.uint8)


def sample_region(maps: np.ndarray, rng: np.random.Generator) -> np.ndarray | None:
    """A random region of `maps` as a bool mask (h, w): a level with regions, then one of its regions.

    Uniform over levels first, so the many small regions of fine levels do not crowd out the few
    large regions of coarse ones.
    """
    levels = np.flatnonzero(maps.any(axis=(1, 2)))
    if levels.size == 0:
        return None
    level = maps[rng.choice(levels)]
    labels = np.flatnonzero(np.bincount(level.ravel())[1:]) + 1
    return level == rng.choice(labels)


def grow_region(region: np.ndarray, pixels: float) -> np.ndarray:
    """`region` (bool) with every pixel within `pixels` (Euclidean) of it added; a negative `pixels` shrinks
    it instead, removing every pixel within -`pixels` of the outside; 0 returns it unchanged."""
    if pixels == 0 or not region.any():
        return region
    if pixels > 0:
        return ndi.distance_transform_edt(~region) <= pixels
    # The distance of an inside pixel to the outside is at least 1, so shrinking by d keeps those beyond d.
    return ndi.distance_transform_edt(region) > -pixels


def regions_holding(maps: np.ndarray, points: np.ndarray, image_hw: tuple[int, int],
                    avoid: np.ndarray | None = None) -> list[np.ndarray]:
    """The distinct regions of `maps` (levels, h, w) that hold one of `points` (x, y in image pixels) and
    none of `avoid`, fine to coarse, as bool masks of the image's size `image_hw`."""
    levels, h, w = maps.shape

    def cells(xy: np.ndarray | None) -> list[tuple[int, int]]:
        xy = np.zeros((0, 2)) if xy is None else np.asarray(xy, dtype=float).reshape(-1, 2)
        return [(min(max(int(y * h / image_hw[0]), 0), h - 1), min(max(int(x * w / image_hw[1]), 0), w - 1))
                for x, y in xy]

    inside, outside = cells(points), cells(avoid)
    found, seen = [], []
    for level in maps:
        for label in dict.fromkeys(int(level[c]) for c in inside) if inside else ():
            small = level == label
            if label == 0 or any(small[c] for c in outside) or any(np.array_equal(small, s) for s in seen):
                continue
            seen.append(small)
            full = Image.fromarray(small.astype(np.uint8) * 255).resize((image_hw[1], image_hw[0]), Image.NEAREST)
            found.append(np.asarray(full) > 0)
    return found


def _gray_uint8(image: np.ndarray) -> np.ndarray:
    if image.ndim == 2 and image.dtype == np.uint8:
        return image
    rgb = to_rgb_float(image)
    return np.round(rgb @ np.array([0.299, 0.587, 0.114], np.float32) * 255).astype(np.uint8)


def _resize(gray: np.ndarray, work_size: int) -> tuple[np.ndarray, np.ndarray]:
    """The image at working size, and the fraction of each of its pixels that was exactly 0."""
    h, w = gray.shape
    scale = work_size / max(h, w)
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    small = np.array(Image.fromarray(gray).resize(size, Image.BILINEAR))  # writable: skimage.filters.rank needs it
    black = Image.fromarray((gray == 0).astype(np.float32)).resize(size, Image.BOX)
    return small, np.asarray(black)


def _despeckle(image: np.ndarray) -> np.ndarray:
    """uint8 in, float32 in [0, 1] out; skimage's histogram median on uint8 is ~3x faster than scipy's."""
    median = filters.rank.median(image, morphology.disk(MEDIAN_RADIUS))
    return ndi.gaussian_filter(median.astype(np.float32) / 255.0, SMOOTH_SIGMA)


def _merge_order(superpixels: np.ndarray, image: np.ndarray) -> list[tuple[float, int, int]]:
    """The greedy merge sequence (weight, src, dst), run to a single region; each level is a prefix of it.

    The weakest shared boundary merges first. Ultrasound regions are textured, so region means
    drift while the boundaries between tissues stay visible; boundary contrast finds lesion and
    vessel outlines that mean-intensity merging leaks through. The size factor merges small
    fragments before large regions, so large regions do not swallow everything at one weak spot.
    This is skimage.graph.merge_hierarchical's algorithm on plain lists: its networkx graph costs
    ~60 ms for 400 nodes and `rag_mean_color` visits every pixel in Python (~0.3 s).
    """
    n = int(superpixels.max()) + 1
    size = np.bincount(superpixels.ravel(), minlength=n).astype(float).tolist()
    edges: list[dict[int, list[float]]] = [{} for _ in range(n)]
    for i, j, length, total in zip(*_boundaries(superpixels, image), strict=True):
        edges[i][j] = edges[j][i] = [length, total]
    unit = superpixels.size / n

    def weight(i: int, j: int) -> float:
        length, total = edges[i][j]
        return total / length * (2 * size[i] * size[j] / (size[i] + size[j]) / unit) ** SIZE_EXPONENT

    version = [0] * n  # bumped on every merge, -1 once absorbed: heap entries with old versions are stale
    heap = [(weight(i, j), i, j, 0, 0) for i in range(n) for j in edges[i] if i < j]
    heapq.heapify(heap)
    merges: list[tuple[float, int, int]] = []
    while heap:
        w, i, j, vi, vj = heapq.heappop(heap)
        if version[i] != vi or version[j] != vj:
            continue
        merges.append((w, i, j))
        _absorb(edges, i, j)
        size[j] += size[i]
        version[i], version[j] = -1, version[j] + 1
        for k in edges[j]:
            heapq.heappush(heap, (weight(j, k), j, k, version[j], version[k]))
    return merges


def _absorb(edges: list[dict[int, list[float]]], i: int, j: int) -> None:
    """Move region i's boundaries to region j, adding up the boundaries they shared with a third region."""
    for k, (length, total) in edges[i].items():
        del edges[k][i]
        if k == j:
            continue
        shared = edges[j].get(k)
        merged = [length + shared[0], total + shared[1]] if shared else [length, total]
        edges[j][k] = edges[k][j] = merged
    edges[i] = {}


def _boundaries(labels: np.ndarray, image: np.ndarray) -> tuple[list[int], list[int], list[float], list[float]]:
    """Adjacent label pairs (i < j), their boundary length in pixel pairs and summed contrast across it."""
    a = np.concatenate([labels[:, :-1].ravel(), labels[:-1].ravel()])
    b = np.concatenate([labels[:, 1:].ravel(), labels[1:].ravel()])
    step = np.concatenate([np.abs(np.diff(image, axis=1)).ravel(), np.abs(np.diff(image, axis=0)).ravel()])
    cross = a != b
    n = int(labels.max()) + 1
    keys, inverse = np.unique(np.minimum(a, b)[cross].astype(np.int64) * n + np.maximum(a, b)[cross],
                              return_inverse=True)
    length = np.bincount(inverse).astype(float)
    total = np.bincount(inverse, weights=step[cross])
    return (keys // n).tolist(), (keys % n).tolist(), length.tolist(), total.tolist()


def _merged_labels(superpixels: np.ndarray, merges: list[tuple[float, int, int]], thresh: float) -> np.ndarray:
    """The partition merge_hierarchical(thresh) would give: every merge before the first one at or above `thresh`."""
    parent = np.arange(int(superpixels.max()) + 1)
    for w, src, dst in merges:
        if w >= thresh:
            break
        parent[src] = dst
    while not np.array_equal(parent[parent], parent):  # pointer jumping: each pass halves every path to its root
        parent = parent[parent]
    return parent[superpixels]


def _clean_regions(labels: np.ndarray, black: np.ndarray) -> np.ndarray:
    """Keep the usable regions of one partition, smoothed, as a uint8 label map.

    Works on the whole map at once (a per-region loop of scipy calls costs ~1 ms a region, and
    there are ~300 an image). In a partition every hole of a region is another region, so filling
    holes only matters for what the filters below drop: those pixels go to the region enclosing them.
    """
    opened = _open_labels(labels, OPEN_RADIUS)
    pieces = measure.label(opened + 1, background=0, connectivity=1)  # opening may split a region in two
    size = np.bincount(pieces.ravel())
    blackness = np.bincount(pieces.ravel(), weights=black.ravel()) / np.maximum(size, 1)
    usable = (size >= MIN_AREA * labels.size) & (size <= MAX_AREA * labels.size) & (blackness <= MAX_BLACK)
    usable[0] = False
    keep = np.flatnonzero(usable)
    keep = keep[np.argsort(-size[keep], kind="stable")][:MAX_REGIONS]
    relabel = np.zeros(len(size), np.uint8)
    relabel[keep] = np.arange(1, len(keep) + 1)
    return _fill_holes(relabel[pieces])


def _open_labels(labels: np.ndarray, radius: int) -> np.ndarray:
    """Morphological opening of every region of a partition with a disk; removed pixels become -1.

    Edge padding keeps regions that touch the image border from being eroded by it.
    """
    h, w = labels.shape
    offsets = np.argwhere(morphology.disk(radius))
    padded = np.pad(labels, radius, mode="edge")
    inside = np.ones(labels.shape, bool)
    for dy, dx in offsets:
        inside &= padded[dy:dy + h, dx:dx + w] == labels
    eroded = np.pad(np.where(inside, labels, -1), radius, constant_values=-1)
    kept = np.zeros(labels.shape, bool)
    for dy, dx in offsets:
        kept |= eroded[dy:dy + h, dx:dx + w] == labels
    return np.where(kept, labels, -1)


def _fill_holes(regions: np.ndarray) -> np.ndarray:
    """Give each enclosed patch of 0 (not touching the border, bordering one region only) to that region."""
    holes, n = ndi.label(regions == 0)
    if n == 0:
        return regions
    hole = np.concatenate([holes[:, :-1].ravel(), holes[:-1].ravel(), holes[:, 1:].ravel(), holes[1:].ravel()])
    region = np.concatenate([regions[:, 1:].ravel(), regions[1:].ravel(),
                             regions[:, :-1].ravel(), regions[:-1].ravel()])
    touching = (hole > 0) & (region > 0)
    pairs = np.unique(hole[touching].astype(np.int64) * 256 + region[touching])
    hole_ids, first, count = np.unique(pairs // 256, return_index=True, return_counts=True)
    owner = np.zeros(n + 1, np.uint8)
    owner[hole_ids[count == 1]] = pairs[first[count == 1]] % 256
    owner[np.concatenate([holes[0], holes[-1], holes[:, 0], holes[:, -1]])] = 0
    return np.where(holes > 0, owner[holes], regions)


# ---------------------------------------------------------------------------------------------- dataset cache


def regions_cache_path(cache_dir: str | os.PathLike, dataset: str) -> Path:
    # The method's version is in the name: maps of an older method are never mistaken for current ones.
    return Path(cache_dir) / f"{dataset}_regions-v{METHOD_VERSION}.npz"


def cache_dataset_regions(images_dir: str | os.PathLike, cache_dir: str | os.PathLike, dataset: str | None = None,
                          *, work_size: int = 256, levels: tuple[float, ...] = DEFAULT_LEVELS,
                          progress: bool = True) -> Path:
    """Compute the label maps of every image in `images_dir` into `<cache_dir>/<dataset>_regions.npz`
    (a progress bar unless `progress` is False: `--no-progress` logs stay readable).

    Keys are the image stems. Maps are streamed into the archive (9 levels at 256 px are ~0.5 MB an
    image before compression), and the file appears under its name only once complete.
    """
    from tqdm import tqdm

    images_dir = Path(images_dir)
    dataset = dataset or images_dir.parent.name
    paths = sorted(p for p in images_dir.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS)
    stems = [p.stem for p in paths]
    if len(set(stems)) != len(stems):
        raise ValueError(f"{images_dir}: several images share a stem, the cache could not tell them apart")

    def write(tmp: str) -> None:
        with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_DEFLATED) as archive:
            for path in tqdm(paths, desc=f"regions {dataset}", unit="img", leave=False, disable=not progress):
                maps = region_label_maps(read_image(path), work_size=work_size, levels=levels)
                with archive.open(f"{path.stem}.npy", "w") as f:
                    np.lib.format.write_array(f, maps)

    return atomic_write(regions_cache_path(cache_dir, dataset), write)


class RegionCache(Mapping[str, np.ndarray]):
    """Read-only stem -> label maps of one cached dataset, decompressed on access.

    The archive is reopened in each process: a zip handle inherited by forked DataLoader workers
    shares its file offset with the parent, and concurrent reads then return corrupt data.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self._pid: int | None = None
        self._npz: np.lib.npyio.NpzFile | None = None

    def _archive(self) -> np.lib.npyio.NpzFile:
        if self._npz is None or self._pid != os.getpid():
            self._npz, self._pid = np.load(self.path), os.getpid()
        return self._npz

    def __getitem__(self, stem: str) -> np.ndarray:
        return self._archive()[stem]

    def __contains__(self, stem: object) -> bool:  # Mapping's default would decompress the maps to find out
        return stem in self._archive().files

    def __iter__(self) -> Iterator[str]:
        return iter(self._archive().files)

    def __len__(self) -> int:
        return len(self._archive().files)


def load_dataset_regions(cache_dir: str | os.PathLike, dataset: str) -> RegionCache:
    path = regions_cache_path(cache_dir, dataset)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no region cache; compute it with cache_dataset_regions")
    return RegionCache(path)
