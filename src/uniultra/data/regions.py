"""Unsupervised region pseudo-masks for ultrasound images (UnSAM-style).

Why: the labelled sets only ever prompt the model on lesions, so it learns "segment the dark blob"
rather than "segment what the prompt points at". A foundation stage trains on arbitrary regions
(bright or dark, small or large) found without labels: SLIC superpixels on a despeckled image,
merged greedily on a region adjacency graph by mean intensity. Snapshots of the merge at several
intensity thresholds give the granularity levels, from parts of organs to whole structures.

Maps are computed at a fixed working resolution: the cost then does not depend on the scanner's
pixel count, and a training loop rescales the sampled mask to its own input size anyway.
"""

from __future__ import annotations

import os
import zipfile
from collections.abc import Iterator, Mapping
from pathlib import Path

import numpy as np
from PIL import Image
from scipy import ndimage as ndi
from skimage import graph, segmentation

from uniultra.atomic import atomic_write
from uniultra.data.image_io import IMAGE_EXTENSIONS, read_image, to_rgb_float

# Merge thresholds in grey levels (0-255) of the despeckled image: one label map per threshold.
DEFAULT_LEVELS: tuple[float, ...] = (6.0, 12.0, 20.0, 32.0)

MEDIAN_SIZE = 5  # speckle grains are ~2-4 px at 256 px working size; a 5x5 median removes them, keeps edges
SMOOTH_SIGMA = 1.0  # the median leaves flat plateaus with jagged borders; a light blur lets SLIC snap to edges
N_SUPERPIXELS = 400  # ~160 px each at 256x256: small enough to trace a 1% lesion's outline
COMPACTNESS = 0.08  # image in [0, 1]: low enough that superpixel borders follow intensity edges
OPEN_RADIUS = 2  # removes one- and two-pixel spurs left by superpixel borders
MIN_AREA = 0.005  # fractions of the image; smaller are speckle, larger are background
MAX_AREA = 0.5
MAX_BLACK = 0.5  # a region with more of its area exactly 0 lies outside the ultrasound fan
MAX_REGIONS = 255  # uint8 label maps


def region_label_maps(image: np.ndarray, *, work_size: int = 256, levels: tuple[float, ...] = DEFAULT_LEVELS
                      ) -> np.ndarray:
    """Region label maps of one image: (len(levels), h, w) uint8, 0 = no region, 1..K = regions.

    (h, w) is the image's size scaled so that its longer side is `work_size`.
    """
    gray = _gray_uint8(image)
    small, black = _resize(gray, work_size)
    smooth = _despeckle(small)
    superpixels = segmentation.slic(smooth, n_segments=N_SUPERPIXELS, compactness=COMPACTNESS,
                                    channel_axis=None, start_label=0)
    merges = _merge_order(superpixels, smooth)
    maps = [_clean_regions(_merged_labels(superpixels, merges, t / 255.0), black) for t in levels]
    return np.stack(maps) if maps else np.zeros((0, *small.shape), np.uint8)


def sample_region(maps: np.ndarray, rng: np.random.Generator) -> np.ndarray | None:
    """A random region of `maps` as a bool mask (h, w): a level with regions, then one of its regions."""
    counts = maps.reshape(len(maps), -1).max(axis=1)
    usable = np.flatnonzero(counts)
    if usable.size == 0:
        return None
    level = int(rng.choice(usable))
    present = np.unique(maps[level])
    label = rng.choice(present[present > 0])
    return maps[level] == label


def _gray_uint8(image: np.ndarray) -> np.ndarray:
    if image.ndim == 2 and image.dtype == np.uint8:
        return image
    rgb = to_rgb_float(image)
    return np.round(rgb @ np.array([0.299, 0.587, 0.114], np.float32) * 255).astype(np.uint8)


def _resize(gray: np.ndarray, work_size: int) -> tuple[np.ndarray, np.ndarray]:
    """The image at working size as float in [0, 1], and the fraction of each pixel that was exactly 0."""
    h, w = gray.shape
    scale = work_size / max(h, w)
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    small = np.asarray(Image.fromarray(gray).resize(size, Image.BILINEAR), np.float32) / 255.0
    black = Image.fromarray((gray == 0).astype(np.float32)).resize(size, Image.BOX)
    return small, np.asarray(black)


def _despeckle(image: np.ndarray) -> np.ndarray:
    return ndi.gaussian_filter(ndi.median_filter(image, MEDIAN_SIZE), SMOOTH_SIGMA)


def _merge_order(superpixels: np.ndarray, image: np.ndarray) -> list[tuple[float, int, int]]:
    """The greedy merge sequence (weight, src, dst) of skimage's hierarchical merging, up to any threshold.

    One run records every merge, so each level is a prefix of it rather than a new run. The graph is
    built here from pixel pairs because `rag_mean_color` visits every pixel in Python (~0.3 s).
    """
    n = int(superpixels.max()) + 1
    count = np.bincount(superpixels.ravel(), minlength=n).astype(np.float64)
    total = np.bincount(superpixels.ravel(), weights=image.ravel(), minlength=n)
    rag = graph.RAG()
    for i in range(n):
        rag.add_node(i, labels=[i], total=total[i], count=count[i], mean=total[i] / max(count[i], 1.0))
    for a, b in _adjacent_pairs(superpixels):
        rag.add_edge(int(a), int(b), weight=abs(rag.nodes[a]["mean"] - rag.nodes[b]["mean"]))
    merges: list[tuple[float, int, int]] = []

    def merge(g: graph.RAG, src: int, dst: int) -> None:
        merges.append((g[src][dst]["weight"], src, dst))
        node, other = g.nodes[dst], g.nodes[src]
        node["total"] += other["total"]
        node["count"] += other["count"]
        node["mean"] = node["total"] / node["count"]

    def weight(g: graph.RAG, src: int, dst: int, nbr: int) -> dict[str, float]:
        return {"weight": abs(g.nodes[dst]["mean"] - g.nodes[nbr]["mean"])}

    graph.merge_hierarchical(superpixels, rag, thresh=np.inf, rag_copy=False, in_place_merge=True,
                             merge_func=merge, weight_func=weight)
    return merges


def _adjacent_pairs(labels: np.ndarray) -> np.ndarray:
    pairs = np.concatenate([np.stack([labels[:, :-1].ravel(), labels[:, 1:].ravel()], axis=1),
                            np.stack([labels[:-1].ravel(), labels[1:].ravel()], axis=1)])
    pairs = pairs[pairs[:, 0] != pairs[:, 1]]
    return np.unique(np.sort(pairs, axis=1), axis=0)


def _merged_labels(superpixels: np.ndarray, merges: list[tuple[float, int, int]], thresh: float) -> np.ndarray:
    """The partition merge_hierarchical(thresh) gives: the merges before the first one at or above `thresh`."""
    parent = np.arange(int(superpixels.max()) + 1)
    for w, src, dst in merges:
        if w >= thresh:
            break
        parent[parent == parent[src]] = parent[dst]
    return parent[superpixels]


def _clean_regions(labels: np.ndarray, black: np.ndarray) -> np.ndarray:
    """Keep the usable regions of one partition, smoothed, as a uint8 label map."""
    area = labels.size
    footprint = _disk(OPEN_RADIUS)
    candidates: list[tuple[int, tuple[slice, slice], np.ndarray]] = []
    for label, box in enumerate(ndi.find_objects(labels + 1)):
        if box is None:
            continue
        box = _padded(box, labels.shape, OPEN_RADIUS + 1)
        mask = ndi.binary_opening(ndi.binary_fill_holes(labels[box] == label), footprint)
        parts, n = ndi.label(mask)
        for part in range(1, n + 1):
            piece = parts == part
            size = int(piece.sum())
            if MIN_AREA * area <= size <= MAX_AREA * area and black[box][piece].mean() <= MAX_BLACK:
                candidates.append((size, box, piece))
    # Painted largest first, so a region nested in a filled hole of a larger one stays visible on top of it.
    candidates.sort(key=lambda c: -c[0])
    out = np.zeros(labels.shape, np.uint8)
    for i, (_, box, piece) in enumerate(candidates[:MAX_REGIONS]):
        out[box][piece] = i + 1
    return out


def _padded(box: tuple[slice, ...], shape: tuple[int, ...], pad: int) -> tuple[slice, slice]:
    return tuple(slice(max(s.start - pad, 0), min(s.stop + pad, n)) for s, n in zip(box, shape, strict=True))


def _disk(radius: int) -> np.ndarray:
    yy, xx = np.mgrid[-radius:radius + 1, -radius:radius + 1]
    return yy**2 + xx**2 <= radius**2 + radius  # the "+ radius" rounds the disk like skimage's default


# ---------------------------------------------------------------------------------------------- dataset cache


def regions_cache_path(cache_dir: str | os.PathLike, dataset: str) -> Path:
    return Path(cache_dir) / f"{dataset}_regions.npz"


def cache_dataset_regions(images_dir: str | os.PathLike, cache_dir: str | os.PathLike, dataset: str | None = None,
                          *, work_size: int = 256, levels: tuple[float, ...] = DEFAULT_LEVELS) -> Path:
    """Compute the label maps of every image in `images_dir` into `<cache_dir>/<dataset>_regions.npz`.

    Keys are the image stems. Maps are streamed into the archive, so a 1000-image set needs ~1 MB of
    memory rather than ~250 MB, and the file appears under its name only once complete.
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
            for path in tqdm(paths, desc=f"regions {dataset}", unit="img", leave=False):
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

    def __iter__(self) -> Iterator[str]:
        return iter(self._archive().files)

    def __len__(self) -> int:
        return len(self._archive().files)


def load_dataset_regions(cache_dir: str | os.PathLike, dataset: str) -> RegionCache:
    path = regions_cache_path(cache_dir, dataset)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no region cache; compute it with cache_dataset_regions")
    return RegionCache(path)
