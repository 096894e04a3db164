"""The data spec: one TOML file naming a labeled image set (or a preprocessed npz), its
preprocessing and its calibration/evaluation split, shared by every pass and benchmark.

    [data]
    images = "imagenet_val/images"   # a folder of images (relative paths: against the TOML's folder)
    labels = "imagenet_val/labels.txt"  # "FILE LABEL" lines, FILE relative to `images`;
                                     # omitted: one subfolder per class, sorted by name = label order
                                     # (no subfolders at all: loose images, unlabeled)
    # npz = "calib.npz"              # instead of images: array x (N, ...) already preprocessed,
                                     # optional integer y (N,); no [preprocess] then
    label_offset = 1                 # added to every label (e.g. 1001-class models); default 0
    [preprocess]                     # see `Preprocess` for the math and the defaults
    resize_short = 256
    center_crop = 224
    scale = 0.00784313725490196
    shift = -1.0
    layout = "NCHW"
    [split]
    seed = 0                         # default 0
    calib = 300                      # default 0
    eval = 500                       # default: every item after the calibration ones

`DataSpec.load` validates everything that can be checked without decoding images (including
that every image of the calib and eval splits opens); images are decoded lazily, one batch at a
time, by `Dataset.batches`. Every problem raises
`DataSpecError` with a one-line message naming the file (and TOML key or item).
"""

from __future__ import annotations

import math
import tomllib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, fields
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from hqpc.errors import HqpcError

__all__ = ["DataSpecError", "Preprocess", "DataSpec", "Dataset", "IMAGE_SUFFIXES"]

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm"})
"""Suffixes (lower case) of the files counted as images when a folder is scanned."""

_LAYOUTS = ("NCHW", "NHWC")
_SPLITS = ("calib", "eval")
_NPZ_ARRAYS = ("x", "y")


class DataSpecError(HqpcError, ValueError):
    """A data spec, or one of the files it names, is invalid.

    Invariant: the message is a single line naming the file (and TOML key or item) and the problem.
    """

    def __init__(self, message: str) -> None:
        super().__init__(" ".join(str(message).splitlines()))


# --- value checks: raise ValueError("key: problem"); callers prefix file and section ----------


def _int(value: Any, key: str, minimum: int | None = None) -> int:
    """`value` as an int (bools rejected), at least `minimum` when given."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{key}: expected an integer, got {value!r}")
    if minimum is not None and value < minimum:
        raise ValueError(f"{key}: must be >= {minimum}, got {value}")
    return value


def _float(value: Any, key: str) -> float:
    """`value` as a finite float (ints accepted, bools rejected)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{key}: expected a finite number, got {value!r}")
    return float(value)


def _sequence(value: Any, key: str, length: int, item: Callable[[Any, str], Any]) -> tuple:
    """`value` (list or tuple of exactly `length` entries) as a tuple, each entry checked by `item`."""
    if not isinstance(value, (list, tuple)) or len(value) != length:
        raise ValueError(f"{key}: expected a list of {length} values, got {value!r}")
    return tuple(item(v, key) for v in value)


# --- preprocessing -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Preprocess:
    """How one image becomes a float32 array. In order:

    1. convert to RGB; x is each channel's 0..255 value;
    2. resize, PIL bilinear, at most one of: `size` = [H, W] exactly, or `resize_short` = S so the
       short side becomes S and the long side int(S * long / short) (torchvision's rule);
    3. `center_crop` = C: keep the C x C window at top = round((H - C) / 2),
       left = round((W - C) / 2) (torchvision's rule); the image must be at least C x C;
    4. x' = x * scale + shift (defaults: scale 1/255, shift 0), then
       x'' = (x' - mean[c]) / std[c] per channel c (defaults 0 and 1), all in float32;
    5. channels first (CHW) for layout "NCHW" (default), last (HWC) for "NHWC".

    Construction validates and normalizes (lists become tuples); a ValueError message starts
    with the offending key.
    """

    resize_short: int | None = None
    center_crop: int | None = None
    size: tuple[int, int] | None = None
    scale: float = 1.0 / 255.0
    shift: float = 0.0
    mean: tuple[float, float, float] = (0.0, 0.0, 0.0)
    std: tuple[float, float, float] = (1.0, 1.0, 1.0)
    layout: str = "NCHW"

    def __post_init__(self) -> None:
        def put(name: str, value: Any) -> None:
            object.__setattr__(self, name, value)

        for name in ("resize_short", "center_crop"):
            if getattr(self, name) is not None:
                _int(getattr(self, name), name, minimum=1)
        if self.size is not None:
            put("size", _sequence(self.size, "size", 2, lambda v, k: _int(v, k, minimum=1)))
        put("scale", _float(self.scale, "scale"))
        put("shift", _float(self.shift, "shift"))
        put("mean", _sequence(self.mean, "mean", 3, _float))
        put("std", _sequence(self.std, "std", 3, _float))
        if 0.0 in self.std:
            raise ValueError(f"std: must be non-zero, got {list(self.std)}")
        if self.layout not in _LAYOUTS:
            raise ValueError(f"layout: expected one of {', '.join(_LAYOUTS)}, got {self.layout!r}")
        if self.size is not None and self.resize_short is not None:
            raise ValueError("size: give either size or resize_short, not both")
        if self.resize_short and self.center_crop and self.center_crop > self.resize_short:
            raise ValueError(f"center_crop: {self.center_crop} exceeds resize_short {self.resize_short}")

    def apply(self, img: Image.Image) -> np.ndarray:
        """The preprocessed image: float32, (3, H, W) for NCHW or (H, W, 3) for NHWC."""
        img = self._center_crop(self._resize(img.convert("RGB")))
        x = np.asarray(img, dtype=np.float32) * np.float32(self.scale) + np.float32(self.shift)
        x = (x - np.asarray(self.mean, np.float32)) / np.asarray(self.std, np.float32)
        return np.ascontiguousarray(x.transpose(2, 0, 1)) if self.layout == "NCHW" else x

    def _resize(self, img: Image.Image) -> Image.Image:
        """Step 2: bilinear resize to `size`, or short side to `resize_short`; else unchanged."""
        width, height = img.size
        if self.size is not None:
            target = (self.size[1], self.size[0])
        elif self.resize_short is not None:
            short, long = sorted((width, height))
            new_long = int(self.resize_short * long / short)
            target = (self.resize_short, new_long) if width <= height else (new_long, self.resize_short)
        else:
            return img
        return img.resize(target, Image.BILINEAR)

    def _center_crop(self, img: Image.Image) -> Image.Image:
        """Step 3: the centred `center_crop` square, offsets rounded as torchvision does."""
        if self.center_crop is None:
            return img
        crop, (width, height) = self.center_crop, img.size
        if crop > width or crop > height:
            raise ValueError(f"center_crop: {crop} exceeds the {width}x{height} image")
        top, left = int(round((height - crop) / 2.0)), int(round((width - crop) / 2.0))
        return img.crop((left, top, left + crop, top + crop))


# --- the spec ----------------------------------------------------------------------------------


_SECTION_KEYS: dict[str, tuple[str, ...]] = {
    "data": ("images", "labels", "npz", "label_offset"),
    "preprocess": tuple(f.name for f in fields(Preprocess)),
    "split": ("seed", "calib", "eval"),
}


@dataclass(frozen=True, eq=False)
class DataSpec:
    """A validated data spec (build it with `DataSpec.load`).

    Invariants: `path` is the absolute TOML path; exactly one of `items` (absolute image paths, in
    labels-file or sorted-folder order) and `npz` is set; `labels` is None (unlabeled) or a
    read-only int64 array of the raw labels (before `label_offset`), one per item;
    calib >= 0, eval >= 0 and calib + eval <= number of items. `preprocess` is the default
    `Preprocess()` for npz data. Compared by identity (eq=False), as `labels` is an array.
    """

    path: Path
    items: tuple[Path, ...] | None
    labels: np.ndarray | None
    npz: Path | None
    preprocess: Preprocess
    seed: int
    calib: int
    eval: int
    label_offset: int

    @classmethod
    def load(cls, path: str | Path) -> DataSpec:
        """Read and validate the TOML at `path`; raises DataSpecError on any problem."""
        path = Path(path).resolve()
        doc = _read_toml(path)
        data = doc.get("data", {})
        preprocess = _read_preprocess(path, doc)
        items, labels, npz = _read_npz_source(path, data) if "npz" in data else _read_image_source(path, data)
        count = _item_count(items, npz)
        label_offset = _checked(path, "data", lambda: _int(data.get("label_offset", 0), "label_offset"))
        seed, calib, evaluate = _read_split(path, doc.get("split", {}), count)
        spec = cls(path, items, labels, npz, preprocess, seed, calib, evaluate, label_offset)
        spec._check_image_headers()
        return spec

    def _check_image_headers(self) -> None:
        """Every image the calib and eval splits use opens: its header names a format PIL reads.
        Cheap (no pixels are decoded); a broken file is reported before any pass runs, not when
        a late batch reaches it. Pixels that fail to decode still fail later, naming the file."""
        if self.items is None:
            return
        for index in sorted(np.concatenate([self.split(name).indices for name in _SPLITS])):
            file = self.items[index]
            try:
                with Image.open(file):
                    pass
            except (OSError, ValueError, Image.DecompressionBombError) as exc:
                raise self._unreadable(file, exc) from None

    @property
    def num_items(self) -> int:
        """Number of items: images, or rows of the npz x."""
        return _item_count(self.items, self.npz)

    @cached_property
    def sample_shape(self) -> tuple[int, ...]:
        """Shape of one preprocessed item, computed once (decodes the first image, or reads the
        npz header)."""
        if self.items is None:
            return _npz_x_header(self.npz)[0][1:]
        return self._load_image(self.items[0]).shape

    def split(self, name: str) -> Dataset:
        """The `calib` or `eval` part of a seeded shuffle of all items.

        order = np.random.default_rng(seed).permutation(num_items); calib is order[:calib], eval is
        order[calib:calib + eval]; so the two are disjoint and the same for the same spec.
        """
        if name not in _SPLITS:
            raise DataSpecError(f"{self.path}: unknown split {name!r}; expected one of {', '.join(_SPLITS)}")
        order = np.random.default_rng(self.seed).permutation(self.num_items)
        start, stop = (0, self.calib) if name == "calib" else (self.calib, self.calib + self.eval)
        return Dataset(self, name, order[start:stop])

    def _labels_at(self, indices: np.ndarray) -> np.ndarray | None:
        """int64 labels of the given items with `label_offset` added, or None when unlabeled."""
        return None if self.labels is None else self.labels[indices] + np.int64(self.label_offset)

    def _x_reader(self) -> Callable[[np.ndarray], np.ndarray]:
        """A function from item indices to their float32 preprocessed batch.

        For images it decodes only the requested items; for npz it holds x in memory for as long
        as the reader lives (npz data is already preprocessed and compact).
        """
        if self.items is None:
            x = _read_npz_array(self.npz, "x")
            return lambda indices: x[indices].astype(np.float32)
        return self._load_images

    def _load_images(self, indices: np.ndarray) -> np.ndarray:
        """Decode and preprocess the given items into one (len(indices), *sample_shape) array."""
        out = np.empty((len(indices), *self.sample_shape), dtype=np.float32)
        for row, index in enumerate(indices):
            file = self.items[index]
            x = self._load_image(file)
            if x.shape != out.shape[1:]:
                raise DataSpecError(
                    f"{file}: preprocesses to shape {x.shape}, but {self.items[0].name} gives "
                    f"{out.shape[1:]}; set [preprocess] center_crop or size in {self.path}"
                )
            out[row] = x
        return out

    def _load_image(self, file: Path) -> np.ndarray:
        """One preprocessed image; DataSpecError naming `file` when it cannot be read."""
        try:
            with Image.open(file) as img:
                return self.preprocess.apply(img)
        except (OSError, ValueError, Image.DecompressionBombError) as exc:
            raise self._unreadable(file, exc) from None

    def _unreadable(self, file: Path, exc: Exception) -> DataSpecError:
        return DataSpecError(f"{file}: cannot read image ({exc}) [data spec {self.path}]")


# --- loading helpers ---------------------------------------------------------------------------


def _checked(path: Path, section: str, check: Callable[[], Any]) -> Any:
    """Run `check`, turning its ValueError("key: problem") into DataSpecError naming file and section."""
    try:
        return check()
    except ValueError as exc:
        raise DataSpecError(f"{path}: [{section}] {exc}") from None


def _read_toml(path: Path) -> dict[str, Any]:
    """The parsed TOML, with only known sections (tables) and keys."""
    if not path.is_file():
        raise DataSpecError(f"{path}: data spec not found")
    try:
        doc = tomllib.loads(path.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise DataSpecError(f"{path}: invalid TOML: {exc}") from None
    _reject_unknown(path, "top level", doc, tuple(_SECTION_KEYS))
    for section, keys in _SECTION_KEYS.items():
        table = doc.get(section, {})
        if not isinstance(table, dict):
            raise DataSpecError(f"{path}: [{section}] must be a table, got {table!r}")
        _reject_unknown(path, f"[{section}]", table, keys)
    return doc


def _reject_unknown(path: Path, where: str, table: dict[str, Any], allowed: Sequence[str]) -> None:
    """DataSpecError listing the allowed keys when `table` has any other key."""
    unknown = sorted(set(table) - set(allowed))
    if unknown:
        raise DataSpecError(
            f"{path}: {where}: unknown key {', '.join(map(repr, unknown))}; allowed: {', '.join(allowed)}"
        )


def _read_preprocess(path: Path, doc: dict[str, Any]) -> Preprocess:
    """The [preprocess] table as a Preprocess; npz data takes none (it is already preprocessed)."""
    if "preprocess" in doc and "npz" in doc.get("data", {}):
        raise DataSpecError(f"{path}: [preprocess] does not apply to [data] npz (x is already preprocessed)")
    return _checked(path, "preprocess", lambda: Preprocess(**doc.get("preprocess", {})))


def _path_value(path: Path, data: dict[str, Any], key: str) -> Path:
    """[data] `key` as an absolute path, resolved against the TOML's folder."""
    value = data[key]
    if not isinstance(value, str) or not value:
        raise DataSpecError(f"{path}: [data] {key}: expected a path string, got {value!r}")
    return (path.parent / value).resolve()


def _existing(path: Path, data: dict[str, Any], key: str, folder: bool) -> Path:
    """[data] `key` as a path that must exist as a folder (or a file)."""
    target = _path_value(path, data, key)
    if not (target.is_dir() if folder else target.is_file()):
        raise DataSpecError(f"{path}: [data] {key}: {'folder' if folder else 'file'} {target} not found")
    return target


def _is_image(file: Path) -> bool:
    """A visible file with an image suffix."""
    return file.suffix.lower() in IMAGE_SUFFIXES and not file.name.startswith(".") and file.is_file()


def _images_under(folder: Path) -> list[Path]:
    """All images below `folder` (recursively), sorted by path."""
    return sorted(p for p in folder.rglob("*") if _is_image(p))


def _read_image_source(path: Path, data: dict[str, Any]) -> tuple[tuple[Path, ...], np.ndarray | None, None]:
    """(items, raw labels or None, None) from [data] images and the optional labels file."""
    if "images" not in data:
        raise DataSpecError(f"{path}: [data]: missing key 'images' (a folder of images) or 'npz'")
    images = _existing(path, data, "images", folder=True)
    if "labels" in data:
        items, labels = _read_labels_file(_existing(path, data, "labels", folder=False), images)
    else:
        items, labels = _scan_class_folders(path, images)
    if not items:
        raise DataSpecError(f"{path}: [data] images: no images in {images}")
    return tuple(items), labels, None


def _read_labels_file(labels_file: Path, images: Path) -> tuple[list[Path], np.ndarray]:
    """Items and labels from "FILE LABEL" lines (blank and '#' lines skipped), FILE under `images`.

    Every listed file must exist and appear once, and every image under `images` must be listed.
    """
    try:
        lines = labels_file.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise DataSpecError(f"{labels_file}: cannot read labels ({exc})") from None
    items: list[Path] = []
    labels: list[int] = []
    items_seen: set[Path] = set()
    for lineno, line in enumerate(lines, start=1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        where = f"{labels_file}:{lineno}"
        name, label = _parse_label_line(where, line)
        file = images / name
        if not file.is_file():
            raise DataSpecError(f"{where}: listed image {file} not found")
        if file in items_seen:
            raise DataSpecError(f"{where}: {name} is listed more than once")
        items_seen.add(file)
        items.append(file)
        labels.append(label)
    _check_listing(labels_file, images, items)
    return items, _label_array(labels)


def _parse_label_line(where: str, line: str) -> tuple[str, int]:
    """(FILE, LABEL) from one "FILE LABEL" line; LABEL a non-negative integer."""
    parts = line.rsplit(None, 1)
    if len(parts) == 2 and parts[1].isdigit():
        return parts[0].strip(), int(parts[1])
    raise DataSpecError(f"{where}: expected 'FILE LABEL' with an integer LABEL >= 0, got {line.strip()!r}")


def _check_listing(labels_file: Path, images: Path, items: list[Path]) -> None:
    """Every image under `images` is listed in the labels file."""
    listed = set(items)
    unlisted = [p for p in _images_under(images) if p not in listed]
    if unlisted:
        names = ", ".join(str(p.relative_to(images)) for p in unlisted[:3])
        raise DataSpecError(
            f"{labels_file}: label count mismatch: {len(items)} labels but {len(items) + len(unlisted)} "
            f"images in {images} (unlisted: {names}{', ...' if len(unlisted) > 3 else ''})"
        )


def _scan_class_folders(path: Path, images: Path) -> tuple[list[Path], np.ndarray | None]:
    """Items and labels from one subfolder per class, label = index in name order (torchvision's
    ImageFolder). A folder with no subfolders gives its loose images, unlabeled."""
    subfolders = (d for d in images.iterdir() if d.is_dir() and not d.name.startswith("."))
    classes = sorted(subfolders, key=lambda d: d.name)
    loose = sorted(p for p in images.iterdir() if _is_image(p))
    if not classes:
        return loose, None
    if loose:
        raise DataSpecError(
            f"{path}: [data] images: {images} mixes class subfolders and loose images ({loose[0].name}); "
            "give a labels file or move them"
        )
    items: list[Path] = []
    labels: list[int] = []
    for label, folder in enumerate(classes):
        files = _images_under(folder)
        if not files:
            raise DataSpecError(f"{path}: [data] images: class folder {folder} holds no images")
        items += files
        labels += [label] * len(files)
    return items, _label_array(labels)


def _label_array(labels: Sequence[int] | np.ndarray) -> np.ndarray:
    """Labels as a read-only int64 array."""
    array = np.array(labels, dtype=np.int64)
    array.setflags(write=False)
    return array


def _read_npz_source(path: Path, data: dict[str, Any]) -> tuple[None, np.ndarray | None, Path]:
    """(None, raw labels or None, npz path) after checking the archive's arrays x and y."""
    for key in ("images", "labels"):
        if key in data:
            raise DataSpecError(f"{path}: [data] npz: give either npz or images (+ labels), not both ({key} set)")
    npz = _existing(path, data, "npz", folder=False)
    with _open_npz(npz) as archive:
        _reject_unknown(npz, "npz", {name: None for name in archive.files}, _NPZ_ARRAYS)
        if "x" not in archive.files:
            raise DataSpecError(f"{npz}: npz has no array 'x'")
        shape, dtype = _npy_header(archive, "x")
        if len(shape) < 2 or dtype.kind not in "fiu":
            raise DataSpecError(f"{npz}: x must be a numeric array (N, ...), ndim >= 2, got {dtype} {shape}")
        if "y" not in archive.files:
            return None, None, npz
        y = archive["y"]
    if y.shape != shape[:1] or y.dtype.kind not in "iu":
        raise DataSpecError(
            f"{npz}: y must be an integer array of shape ({shape[0]},) like x's rows, got {y.dtype} {y.shape}"
        )
    return None, _label_array(y), npz


def _open_npz(npz: Path) -> np.lib.npyio.NpzFile:
    """The opened npz archive (no pickles)."""
    try:
        archive = np.load(npz, allow_pickle=False)
    except (OSError, ValueError, EOFError) as exc:
        raise DataSpecError(f"{npz}: cannot read npz ({exc})") from None
    if not isinstance(archive, np.lib.npyio.NpzFile):
        raise DataSpecError(f"{npz}: not an npz archive (write it with numpy.savez)")
    return archive


def _npy_header(archive: np.lib.npyio.NpzFile, name: str) -> tuple[tuple[int, ...], np.dtype]:
    """(shape, dtype) of array `name` in an open npz archive, read from its header alone."""
    with archive.zip.open(f"{name}.npy") as member:
        version = np.lib.format.read_magic(member)
        fmt = np.lib.format
        read_header = fmt.read_array_header_1_0 if version == (1, 0) else fmt.read_array_header_2_0
        shape, _, dtype = read_header(member)
    return tuple(shape), dtype


def _npz_x_header(npz: Path) -> tuple[tuple[int, ...], np.dtype]:
    """(shape, dtype) of the npz array x, without loading the data."""
    with _open_npz(npz) as archive:
        return _npy_header(archive, "x")


def _item_count(items: tuple[Path, ...] | None, npz: Path | None) -> int:
    """Number of items: images, or rows of the npz x."""
    return len(items) if items is not None else _npz_x_header(npz)[0][0]


def _read_npz_array(npz: Path, name: str) -> np.ndarray:
    """The whole array `name` of the npz archive."""
    with _open_npz(npz) as archive:
        return archive[name]


def _read_split(path: Path, table: dict[str, Any], count: int) -> tuple[int, int, int]:
    """(seed, calib, eval) from [split]; eval defaults to every item after the calibration ones."""
    def value(key: str, default: int) -> int:
        return _checked(path, "split", lambda: _int(table.get(key, default), key, minimum=0))

    seed, calib = value("seed", 0), value("calib", 0)
    evaluate = value("eval", max(count - calib, 0))
    if calib + evaluate > count:
        raise DataSpecError(
            f"{path}: [split] calib + eval = {calib} + {evaluate} = {calib + evaluate} "
            f"exceeds the {count} items"
        )
    return seed, calib, evaluate


# --- one split ---------------------------------------------------------------------------------


def _dim_matches(model_dim: int | str | None, data_dim: int) -> bool:
    """A model dim matches when symbolic (str, None, or <= 0) or equal to the data dim."""
    return model_dim is None or isinstance(model_dim, str) or model_dim <= 0 or model_dim == data_dim


@dataclass(frozen=True, eq=False)
class Dataset:
    """One split of a DataSpec: `indices` into the spec's items, in shuffled order.

    Nothing is decoded until iterated, and nothing is cached: each pass re-reads the images.
    """

    spec: DataSpec
    name: str
    indices: np.ndarray

    def __len__(self) -> int:
        return len(self.indices)

    @property
    def sample_shape(self) -> tuple[int, ...]:
        """Shape of one preprocessed item (without the batch dim)."""
        return self.spec.sample_shape

    def batches(self, batch_size: int) -> Iterator[tuple[np.ndarray, np.ndarray | None]]:
        """Stream (x, y) batches in split order: x float32 (B, *sample_shape), y int64 (B,) with
        label_offset added, or None when unlabeled. B = batch_size except for a smaller last batch.
        Images are decoded one batch at a time, so memory is bounded by the batch."""
        _int(batch_size, "batch_size", minimum=1)  # checked now, not at the first next()
        return self._stream(batch_size)

    def _stream(self, batch_size: int) -> Iterator[tuple[np.ndarray, np.ndarray | None]]:
        read = self.spec._x_reader()
        for start in range(0, len(self), batch_size):
            indices = self.indices[start : start + batch_size]
            yield read(indices), self.spec._labels_at(indices)

    def arrays(self, limit: int | None = None) -> tuple[np.ndarray, np.ndarray | None]:
        """All items (or the first `limit`) as one (x, y) pair, as one batch from `batches`."""
        indices = self.indices if limit is None else self.indices[: _int(limit, "limit", minimum=0)]
        return self.spec._x_reader()(indices), self.spec._labels_at(indices)

    def check_input(self, input_shape: Sequence[int | str | None]) -> None:
        """DataSpecError unless the sample shape equals the model input's non-batch dims
        (input_shape[1:]); symbolic model dims (str, None, <= 0) match anything."""
        model_dims = list(input_shape)[1:]
        sample = self.sample_shape
        if len(model_dims) == len(sample) and all(map(_dim_matches, model_dims, sample)):
            return
        hint = f" (preprocess layout {self.spec.preprocess.layout})" if self.spec.items is not None else ""
        raise DataSpecError(
            f"{self.spec.path}: preprocessed sample shape {list(sample)}{hint} does not match "
            f"model input {list(input_shape)} (batch dim excluded)"
        )
