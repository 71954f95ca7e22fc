"""Data sets by name, checked as they are read.

Every loader returns a :class:`Dataset` of float32 rows ``x`` of shape ``[N, D]`` with values in
``[0, 1]`` for image data, and refuses what it cannot trust (wrong shape, values out of range,
NaN, a train/test dimension mismatch) with an :class:`~elbolab.errors.InputError` that names the
file and the problem. Nothing is ever unpickled.

Splits: every data set has ``"train"``, ``"valid"``, ``"test"`` and ``"train+valid"``.

File-based data sets (``binarized-mnist``, ``mnist``, ``fashion-mnist``, ``frey-faces``) are read
in their published formats from ``data_dir`` or its sub-folder named in :data:`SUBFOLDERS`; when a
file is missing, the error says which file, where it was looked for and where to get it.
"""

from __future__ import annotations

__all__ = ["BINARIZE", "DATASETS", "DataConfig", "Dataset", "binarization_for", "check_data", "load_dataset"]

import gzip
import io
import zlib
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor

from elbolab.config import dataclass_from_dict
from elbolab.data.synthetic import LinearGaussian
from elbolab.errors import InputError, closest_names

SPLITS = ("train", "valid", "test", "train+valid")
BINARIZE = (None, "threshold", "dynamic", "auto")
# The likelihoods for which "auto" binarizes grayscale images: those whose support is {0, 1}.
BINARY_LIKELIHOODS = ("bernoulli",)


@dataclass(frozen=True)
class Dataset:
    """One split of a data set.

    Attributes:
        name: the registry name, e.g. ``"digits"``.
        x: float32 tensor ``[N, D]``.
        y: int64 labels ``[N]``, or ``None``.
        image_shape: ``(height, width)`` when the rows are images, else ``None``.
        kind: ``"binary"`` (values in {0, 1}, or probabilities resampled per batch when
            ``dynamic_binarization``) or ``"continuous"``.
        dynamic_binarization: resample ``x ~ Bernoulli(x)`` every time a batch is drawn.
        truth: the generating model with exact log p(x), for synthetic data; else ``None``.
    """

    name: str
    x: Tensor
    y: Tensor | None
    image_shape: tuple[int, int] | None
    kind: Literal["binary", "continuous"]
    dynamic_binarization: bool = False
    truth: LinearGaussian | None = None

    @property
    def num_points(self) -> int:
        return self.x.shape[0]

    @property
    def x_dim(self) -> int:
        return self.x.shape[1]

    def fixed_binarization(self, seed: int = 0) -> Dataset:
        """One Bernoulli draw of a dynamically binarized set, fixed by ``seed`` (for evaluation)."""
        if not self.dynamic_binarization:
            return self
        g = torch.Generator().manual_seed(seed)
        x = torch.bernoulli(self.x, generator=g)
        return Dataset(self.name, x, self.y, self.image_shape, "binary", False, self.truth)


@dataclass
class DataConfig:
    """Which data set to load; the ``[data]`` section of a run's config.

    Attributes:
        name: a key of :data:`DATASETS`.
        data_dir: directory holding the files, for data sets read from files.
        binarize: ``None``, ``"threshold"`` (x > 0.5, fixed), ``"dynamic"`` (resampled per batch),
            or ``"auto"``: dynamic for grayscale images under a Bernoulli likelihood, none otherwise
            (:func:`binarization_for`). A run's config records what ``"auto"`` became.
        train_split: ``"train"`` (validated on ``"valid"`` each epoch) or ``"train+valid"``.
    """

    name: str = "digits"
    data_dir: str | None = None
    binarize: str | None = "auto"
    train_split: str = "train"

    def __post_init__(self) -> None:
        if self.name not in DATASETS:
            raise InputError(f"unknown data set {self.name!r}; {closest_names(self.name, DATASETS)}")
        if self.binarize not in BINARIZE:
            raise InputError(
                f"binarize must be one of none, threshold, dynamic, auto; got {self.binarize!r}"
            )
        if self.train_split not in ("train", "train+valid"):
            raise InputError(f"train_split must be train or train+valid, got {self.train_split!r}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any], source: str = "config") -> DataConfig:
        return dataclass_from_dict(cls, values, source)

    def load(self, split: str = "train") -> Dataset:
        """The split, binarized as ``binarize`` says (``"auto"``: as for a Bernoulli likelihood)."""
        binarize = binarization_for(self.name, "bernoulli") if self.binarize == "auto" else self.binarize
        return load_dataset(self.name, split, data_dir=self.data_dir, binarize=binarize)

    def for_likelihood(self, likelihood: str) -> DataConfig:
        """This section with ``binarize="auto"`` replaced by what it means under ``likelihood``."""
        if self.binarize != "auto":
            return self
        return replace(self, binarize=binarization_for(self.name, likelihood))


def binarization_for(name: str, likelihood: str) -> str | None:
    """What ``binarize="auto"`` means: ``"dynamic"`` for a grayscale image data set under a likelihood
    on {0, 1}, else ``None``.

    Dynamic binarization (resampling x ~ Bernoulli(x) at every batch, Salakhutdinov & Murray 2008)
    rather than a threshold: it is the usual protocol of the VAE literature on grayscale MNIST,
    and it does not overfit one draw of the pixels. Data already binary, real-valued data and
    likelihoods of gray levels (continuous Bernoulli, Gaussian) are left as they are.
    """
    grayscale = name in DATASETS and not DATASETS[name][1] and name not in REAL_VALUED
    return "dynamic" if grayscale and likelihood in BINARY_LIKELIHOODS else None


def check_data(x: np.ndarray | Tensor, source: str, *, low: float = 0.0, high: float = 1.0) -> None:
    """Refuse a data matrix that is not 2-D, not finite, or outside ``[low, high]``."""
    x = torch.as_tensor(x)
    if x.ndim != 2 or x.shape[0] == 0 or x.shape[1] == 0:
        raise InputError(f"{source}: expected a non-empty [N, D] matrix, got shape {tuple(x.shape)}")
    if not torch.isfinite(x).all():
        raise InputError(f"{source}: contains NaN or infinite values")
    if x.min() < low or x.max() > high:
        raise InputError(
            f"{source}: values must lie in [{low}, {high}], found [{x.min():.4g}, {x.max():.4g}]"
        )


def _split_indices(n: int, seed: int, valid: int, test: int) -> dict[str, np.ndarray]:
    """A fixed permutation cut into train / valid / test (for data sets with no canonical split)."""
    order = np.random.default_rng(seed).permutation(n)
    splits = {"test": order[:test], "valid": order[test : test + valid], "train": order[test + valid :]}
    splits["train+valid"] = np.concatenate([splits["train"], splits["valid"]])
    return splits


def _load_digits(split: str, data_dir: Path | None) -> tuple[np.ndarray, np.ndarray, tuple[int, int]]:
    """scikit-learn's 8x8 digits (1,797 images, values 0-16) scaled to [0, 1]; split fixed by seed 0."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    x = bunch.data.astype(np.float32) / 16.0
    index = _split_indices(len(x), seed=0, valid=180, test=360)[split]
    return x[index], bunch.target[index], (8, 8)


SYNTHETIC_SIZES = {"train": 2000, "valid": 500, "test": 1000}


def synthetic_linear_gaussian(split: str) -> Dataset:
    """Data drawn from :meth:`LinearGaussian.random` (D=16, k=4, seed 0); ``truth`` is that model."""
    model = LinearGaussian.random(x_dim=16, z_dim=4, noise_scale=0.5, seed=0)
    parts = []
    for offset, part in enumerate(("train", "valid", "test")):
        if part in split.split("+"):
            g = torch.Generator().manual_seed(1000 + offset)
            parts.append(model.sample(SYNTHETIC_SIZES[part], generator=g))
    return Dataset("synthetic-linear-gaussian", torch.cat(parts), None, None, "continuous", truth=model)


# --- data sets read from files -------------------------------------------------------------------

# Where each file-based data set comes from, for the messages of "file not found" errors.
SOURCES = {
    "binarized-mnist": (
        "binarized-mnist needs binarized_mnist_train.amat, binarized_mnist_valid.amat and "
        "binarized_mnist_test.amat (plain or .gz): the 'static binarized MNIST' of Larochelle & "
        "Murray (2011), distributed as the binarized_mnist_*.amat files, e.g. from "
        "http://www.cs.toronto.edu/~larocheh/public/datasets/binarized_mnist/"
    ),
    "mnist": (
        "mnist needs train-images-idx3-ubyte, train-labels-idx1-ubyte, t10k-images-idx3-ubyte and "
        "t10k-labels-idx1-ubyte (plain or .gz): the IDX files from Yann LeCun's MNIST page, "
        "http://yann.lecun.com/exdb/mnist/"
    ),
    "fashion-mnist": (
        "fashion-mnist needs train-images-idx3-ubyte, train-labels-idx1-ubyte, "
        "t10k-images-idx3-ubyte and t10k-labels-idx1-ubyte (plain or .gz): install them with "
        "`apt-get install dataset-fashion-mnist` (Debian/Ubuntu, into "
        "/usr/share/datasets/fashion-mnist) or take the IDX files of Zalando's repository, "
        "https://github.com/zalandoresearch/fashion-mnist"
    ),
    "frey-faces": (
        "frey-faces needs frey_rawface.mat, from Sam Roweis' data page, "
        "https://cs.nyu.edu/~roweis/data.html"
    ),
}

# A sub-folder of data_dir that is searched too, so that one --data-dir holding a folder per data
# set (as ../shared/data does) serves every data set.
SUBFOLDERS = {
    "binarized-mnist": "binarized_mnist",
    "mnist": "mnist",
    "fashion-mnist": "fashion-mnist",
    "frey-faces": "frey_faces",
}

# Debian's dataset-fashion-mnist package installs the IDX files here; used when data_dir lacks them.
DEBIAN_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")


def _search_dirs(name: str, data_dir: Path | None, fallback: Path | None = None) -> list[Path]:
    """The directories to look in for ``name``'s files: ``data_dir``, its sub-folder, ``fallback``.

    Refuses a ``data_dir`` that does not exist, and a missing ``data_dir`` unless ``fallback``
    (a system-wide install) exists: a silent fallback would hide a mistyped path.
    """
    dirs = []
    if data_dir is not None:
        if not data_dir.is_dir():
            raise InputError(f"{name}: data directory {data_dir} does not exist; {SOURCES[name]}")
        dirs += [data_dir, data_dir / SUBFOLDERS[name]]
    if fallback is not None and fallback.is_dir():
        dirs.append(fallback)
    if not dirs:
        raise InputError(
            f"{name} is read from files: give their directory with --data-dir (data_dir=...); "
            f"{SOURCES[name]}"
        )
    return dirs


def _find_file(name: str, filename: str, dirs: list[Path]) -> Path:
    """``filename`` or ``filename.gz`` in the first of ``dirs`` that has one (plain preferred)."""
    for directory in dirs:
        for candidate in (directory / filename, directory / f"{filename}.gz"):
            if candidate.is_file():
                return candidate
    searched = ", ".join(str(d) for d in dirs)
    raise InputError(
        f"{name}: {filename} (or {filename}.gz) not found in {searched}; {SOURCES[name]}"
    )


def _read_bytes(path: Path) -> bytes:
    """The contents of ``path``, gunzipped when its name ends in ``.gz``."""
    try:
        raw = path.read_bytes()
        return gzip.decompress(raw) if path.suffix == ".gz" else raw
    except (gzip.BadGzipFile, EOFError, zlib.error) as error:
        message = f"{path}: not a readable gzip file (truncated or corrupt): {error}"
        raise InputError(message) from None
    except OSError as error:
        raise InputError(f"{path}: cannot be read: {error}") from None


BINARIZED_MNIST_PIXELS = 784

# Byte classes of an .amat file of 0/1 values: anything else is refused.
_OTHER, _SPACE, _DIGIT = 0, 1, 2
_AMAT_BYTE_CLASS = np.zeros(256, dtype=np.uint8)
_AMAT_BYTE_CLASS[[ord(" "), ord("\t"), ord("\r"), ord("\n")]] = _SPACE
_AMAT_BYTE_CLASS[[ord("0"), ord("1")]] = _DIGIT


def _amat_value_error(raw: bytes, position: int, path: Path) -> InputError:
    """An error naming the value that holds byte ``position`` of ``raw``, and its line (1-based)."""
    line = raw.count(b"\n", 0, position) + 1
    start = max(raw.rfind(b" ", 0, position), raw.rfind(b"\n", 0, position)) + 1
    value = raw[start : start + 20].split()[0].decode("latin-1")
    return InputError(f"{path}, line {line}: found {value!r}; values must be 0 or 1")


def _parse_amat(raw: bytes, path: Path) -> np.ndarray:
    """Rows of 784 space-separated 0/1 values as a uint8 matrix ``[N, 784]``.

    Works on the bytes with numpy instead of parsing numbers (np.loadtxt takes about a minute on
    the 50,000-line training file; this takes well under a second). Because only the characters
    0, 1 and white space are allowed, every value is one character, and a run of two characters
    ("10", "11") is a value other than 0 or 1. Blank lines are skipped, as np.loadtxt does.
    """
    data = np.frombuffer(raw, dtype=np.uint8)
    byte_class = _AMAT_BYTE_CLASS[data]
    digit = byte_class == _DIGIT
    for bad in (byte_class == _OTHER, digit[1:] & digit[:-1]):
        positions = np.flatnonzero(bad)
        if positions.size:
            raise _amat_value_error(raw, int(positions[0]), path)
    line_starts = np.concatenate([[0], np.flatnonzero(data == ord("\n")) + 1])
    line_starts = line_starts[line_starts < len(data)]
    if line_starts.size == 0:
        raise InputError(f"{path}: the file is empty")
    counts = np.add.reduceat(digit, line_starts, dtype=np.int64)
    wrong = np.flatnonzero((counts != 0) & (counts != BINARIZED_MNIST_PIXELS))
    if wrong.size:
        line = wrong[0]
        raise InputError(
            f"{path}, line {line + 1}: {counts[line]} values, expected {BINARIZED_MNIST_PIXELS} "
            "(a 28x28 image per line)"
        )
    if not counts.any():
        raise InputError(f"{path}: the file holds no images")
    # Every non-blank line has exactly 784 one-character values, so the values in file order
    # reshape into the rows.
    return (data[digit] - ord("0")).reshape(-1, BINARIZED_MNIST_PIXELS)


def _load_binarized_mnist(
    split: str, data_dir: Path | None
) -> tuple[np.ndarray, None, tuple[int, int]]:
    """Larochelle & Murray's fixed binarization of MNIST: 50,000 / 10,000 / 10,000, no labels.

    The number of lines is not checked against the published sizes, so that a subset in the same
    format loads too.
    """
    dirs = _search_dirs("binarized-mnist", data_dir)
    parts = []
    for part in split.split("+"):
        path = _find_file("binarized-mnist", f"binarized_mnist_{part}.amat", dirs)
        parts.append(_parse_amat(_read_bytes(path), path))
    return np.concatenate(parts).astype(np.float32), None, (28, 28)


IDX_IMAGES_MAGIC = 2051  # 0x00000803: unsigned bytes, 3 dimensions
IDX_LABELS_MAGIC = 2049  # 0x00000801: unsigned bytes, 1 dimension
IDX_KINDS = {IDX_IMAGES_MAGIC: "an IDX images file", IDX_LABELS_MAGIC: "an IDX labels file"}


def _read_idx(path: Path, magic: int) -> np.ndarray:
    """An IDX file of unsigned bytes (LeCun's MNIST format), checked against its header.

    The header is a big-endian magic number whose last byte is the number of dimensions, then one
    big-endian uint32 per dimension; the data are the bytes that follow, row-major.
    """
    raw = _read_bytes(path)
    if len(raw) < 4:
        raise InputError(f"{path}: truncated IDX file ({len(raw)} bytes, not even a header)")
    found = int.from_bytes(raw[:4], "big")
    if found != magic:
        what = f" ({IDX_KINDS[found]})" if found in IDX_KINDS else ""
        raise InputError(
            f"{path}: magic number {found}{what}, expected {magic} ({IDX_KINDS[magic]}); "
            "not the right IDX file"
        )
    ndim = raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise InputError(f"{path}: truncated IDX file (the header needs {header} bytes)")
    shape = tuple(int(d) for d in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    size = int(np.prod(shape))
    if len(raw) - header != size:
        raise InputError(
            f"{path}: the header announces shape {shape} ({size} bytes) but the file holds "
            f"{len(raw) - header} bytes of data ("
            + ("truncated" if len(raw) - header < size else "trailing bytes")
            + ")"
        )
    return np.frombuffer(raw, dtype=np.uint8, count=size, offset=header).reshape(shape)


def _read_idx_pair(name: str, prefix: str, dirs: list[Path]) -> tuple[np.ndarray, np.ndarray]:
    """The images ``[N, rows, cols]`` and labels ``[N]`` of ``prefix`` ("train" or "t10k")."""
    images_path = _find_file(name, f"{prefix}-images-idx3-ubyte", dirs)
    labels_path = _find_file(name, f"{prefix}-labels-idx1-ubyte", dirs)
    images = _read_idx(images_path, IDX_IMAGES_MAGIC)
    labels = _read_idx(labels_path, IDX_LABELS_MAGIC)
    if len(images) != len(labels):
        raise InputError(
            f"{images_path} holds {len(images)} images but {labels_path} holds {len(labels)} labels"
        )
    if len(images) == 0:
        raise InputError(f"{images_path}: holds no images")
    return images, labels


# The conventional MNIST validation set: the last 10,000 of the 60,000 training images.
IDX_VALID = 10_000


def _load_idx_dataset(
    name: str, split: str, dirs: list[Path]
) -> tuple[np.ndarray, np.ndarray, tuple[int, int]]:
    """An IDX data set: train/valid from the training files (valid = the last 10,000), test = t10k.

    The image size comes from the header, so any IDX images file is read as it is.
    """
    if split == "test":
        images, labels = _read_idx_pair(name, "t10k", dirs)
    else:
        images, labels = _read_idx_pair(name, "train", dirs)
        if len(images) <= IDX_VALID:
            raise InputError(
                f"{name}: the training file holds {len(images)} images; the train/valid split "
                f"needs more than {IDX_VALID} (the last {IDX_VALID} are the validation set)"
            )
        cut = len(images) - IDX_VALID
        index = {"train": slice(None, cut), "valid": slice(cut, None), "train+valid": slice(None)}
        images, labels = images[index[split]], labels[index[split]]
    x = images.reshape(len(images), -1).astype(np.float32) / 255.0
    return x, labels.astype(np.int64), (images.shape[1], images.shape[2])


def _load_mnist(
    split: str, data_dir: Path | None
) -> tuple[np.ndarray, np.ndarray, tuple[int, int]]:
    """Grayscale MNIST from LeCun's IDX files, scaled to [0, 1]: 50,000 / 10,000 / 10,000."""
    return _load_idx_dataset("mnist", split, _search_dirs("mnist", data_dir))


def _load_fashion_mnist(
    split: str, data_dir: Path | None
) -> tuple[np.ndarray, np.ndarray, tuple[int, int]]:
    """Fashion-MNIST's IDX files scaled to [0, 1]; also looked for where Debian installs them."""
    dirs = _search_dirs("fashion-mnist", data_dir, fallback=DEBIAN_FASHION_MNIST)
    return _load_idx_dataset("fashion-mnist", split, dirs)


FREY_SHAPE = (28, 20)  # height, width
FREY_VALID, FREY_TEST = 200, 400


def _load_frey_faces(split: str, data_dir: Path | None) -> tuple[np.ndarray, None, tuple[int, int]]:
    """Frey Faces: 1,965 grayscale faces of 28x20, scaled to [0, 1]; split fixed by seed 0.

    ``frey_rawface.mat`` stores one image per column of ``ff`` (560 x 1965), each column the
    image's pixels row by row, so the rows of ``ff.T`` are row-major 28x20 images.
    """
    from scipy.io import loadmat

    path = _find_file("frey-faces", "frey_rawface.mat", _search_dirs("frey-faces", data_dir))
    try:
        # loadmat builds arrays and never unpickles; a gzipped copy is gunzipped in memory.
        contents = loadmat(io.BytesIO(_read_bytes(path)), variable_names=["ff"])
    except InputError:
        raise
    except Exception as error:  # scipy's parser fails on corrupt bytes in many ways (IndexError, struct.error, ...)
        reason = f"{type(error).__name__}: {error}".splitlines()[0]
        raise InputError(f"{path}: not a readable MATLAB v5 file, truncated or corrupted ({reason})") from None
    ff = contents.get("ff")
    pixels = FREY_SHAPE[0] * FREY_SHAPE[1]
    if not isinstance(ff, np.ndarray) or ff.ndim != 2 or ff.shape[0] != pixels:
        found = f"shape {ff.shape}" if isinstance(ff, np.ndarray) else "no variable 'ff'"
        raise InputError(f"{path}: expected a variable 'ff' of shape ({pixels}, N), found {found}")
    if ff.dtype.kind not in "uif" or not np.isfinite(ff).all() or ff.min() < 0 or ff.max() > 255:
        raise InputError(f"{path}: 'ff' must hold pixel values 0-255, found dtype {ff.dtype}")
    n = ff.shape[1]
    if n <= FREY_VALID + FREY_TEST:
        raise InputError(f"{path}: 'ff' holds {n} images; the split needs more than 600")
    index = _split_indices(n, seed=0, valid=FREY_VALID, test=FREY_TEST)[split]
    return ff.T[index].astype(np.float32) / 255.0, None, FREY_SHAPE


# name -> loader(split, data_dir) returning (x as float in [0, 1], labels or None, image shape),
# and whether the images are already binary.
Loader = Callable[[str, Path | None], tuple[np.ndarray, np.ndarray | None, tuple[int, int]]]
DATASETS: dict[str, tuple[Loader | None, bool]] = {
    "digits": (_load_digits, False),
    "binarized-mnist": (_load_binarized_mnist, True),
    "mnist": (_load_mnist, False),
    "fashion-mnist": (_load_fashion_mnist, False),
    "frey-faces": (_load_frey_faces, False),
    "synthetic-linear-gaussian": (None, False),
}


# Data sets whose values are not gray levels in [0, 1]: never binarized by "auto".
REAL_VALUED = ("synthetic-linear-gaussian",)


def load_dataset(
    name: str,
    split: str = "train",
    data_dir: str | Path | None = None,
    binarize: str | None = None,
) -> Dataset:
    """Load one split of a data set by name.

    Arguments:
        name: a key of :data:`DATASETS`: ``digits``, ``binarized-mnist``, ``mnist``,
            ``fashion-mnist``, ``frey-faces``, ``synthetic-linear-gaussian``.
        split: ``"train"``, ``"valid"``, ``"test"`` or ``"train+valid"``.
        data_dir: directory holding the data set's files (not needed for ``digits`` and
            ``synthetic-linear-gaussian``).
        binarize: ``None`` keeps grayscale values; ``"threshold"`` sets ``x = (x > 0.5)``;
            ``"dynamic"`` keeps probabilities and makes :func:`~elbolab.inference.fit` resample
            ``x ~ Bernoulli(x)`` for every batch.

    Returns:
        A :class:`Dataset`.

    Example:
        >>> data = load_dataset("digits", "train", binarize="dynamic")
        >>> data.x.shape, data.kind
        (torch.Size([1257, 64]), 'binary')
    """
    if name not in DATASETS:
        raise InputError(f"unknown data set {name!r}; {closest_names(name, DATASETS)}")
    if split not in SPLITS:
        raise InputError(f"unknown split {split!r} for {name}; {closest_names(split, SPLITS)}")
    if binarize not in BINARIZE[:3]:
        raise InputError(f"binarize must be one of none, threshold, dynamic; got {binarize!r}")
    if name == "synthetic-linear-gaussian":
        if binarize is not None:
            raise InputError("synthetic-linear-gaussian is real-valued and cannot be binarized")
        return synthetic_linear_gaussian(split)

    loader, is_binary = DATASETS[name]
    x, y, image_shape = loader(split, Path(data_dir).expanduser() if data_dir else None)
    x = torch.as_tensor(np.ascontiguousarray(x), dtype=torch.float32)
    check_data(x, f"{name} ({split})")
    kind = "binary" if is_binary else "continuous"
    dynamic = False
    if binarize == "threshold":
        x, kind = (x > 0.5).float(), "binary"
    elif binarize == "dynamic" and not is_binary:
        kind, dynamic = "binary", True
    labels = torch.as_tensor(y, dtype=torch.int64) if y is not None else None
    return Dataset(name, x, labels, image_shape, kind, dynamic)
