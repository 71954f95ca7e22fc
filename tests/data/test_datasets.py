"""Tests of the data-set loaders: real files from ../shared/data, synthetic files, and every error."""

from __future__ import annotations

import gzip
import hashlib
from pathlib import Path

import numpy as np
import pytest
import scipy.io
import torch

from elbolab.data import DataConfig, load_dataset
from elbolab.data import datasets as datasets_module
from elbolab.errors import InputError

# The shared data sit beside the project's clone: /work/main/tests/data/ -> /work/shared/data.
SHARED_DATA = Path(__file__).resolve().parents[3] / "shared" / "data"

# README of shared/data: first 16 hex digits of sha256 of the uint8 arrays, row-major.
BINARIZED_MNIST_SHA256 = {
    "train": "43490d4d6ac90027",
    "valid": "069b4f0beb389b77",
    "test": "ca0294c3b8d984c7",
}
BINARIZED_MNIST_SIZES = {"train": 50_000, "valid": 10_000, "test": 10_000, "train+valid": 60_000}


@pytest.fixture(scope="module")
def shared_data() -> Path:
    """The shared data directory; tests that need it are skipped where it is absent."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"shared data directory {SHARED_DATA} not present")
    return SHARED_DATA


def _shared_subdir(shared_data: Path, name: str) -> Path:
    path = shared_data / name
    if not path.is_dir():
        pytest.skip(f"{path} not present")
    return path


@pytest.fixture(scope="module")
def binarized_mnist(shared_data: Path) -> dict:
    """All four splits, loaded once (the training file is the slow one)."""
    directory = _shared_subdir(shared_data, "binarized_mnist")
    return {
        split: load_dataset("binarized-mnist", split, data_dir=directory)
        for split in BINARIZED_MNIST_SIZES
    }


@pytest.fixture(scope="module")
def frey_ff(shared_data: Path) -> np.ndarray:
    """The raw ``ff`` matrix, read independently of the loader."""
    path = _shared_subdir(shared_data, "frey_faces") / "frey_rawface.mat"
    return scipy.io.loadmat(path)["ff"]


def _sha16(x: torch.Tensor) -> str:
    as_bytes = np.ascontiguousarray(x.numpy().astype(np.uint8)).tobytes()
    return hashlib.sha256(as_bytes).hexdigest()[:16]


def _sorted_rows(x: np.ndarray) -> list[bytes]:
    """The rows of an array as a sorted list, to compare two arrays as multisets of rows."""
    return sorted(row.tobytes() for row in np.ascontiguousarray(x))


# --- binarized MNIST (real files) ------------------------------------------------------------------


@pytest.mark.parametrize("split", list(BINARIZED_MNIST_SIZES))
def test_binarized_mnist_shapes_and_values(binarized_mnist: dict, split: str) -> None:
    data = binarized_mnist[split]
    assert data.x.shape == (BINARIZED_MNIST_SIZES[split], 784)
    assert data.x.dtype == torch.float32
    # (x == 0) | (x == 1) rather than unique(): sorting 39 million floats takes seconds.
    ones = data.x == 1
    assert bool((ones | (data.x == 0)).all())
    assert 0.05 < ones.float().mean() < 0.5  # both values occur, in MNIST-like proportions
    assert data.kind == "binary" and not data.dynamic_binarization
    assert data.y is None
    assert data.image_shape == (28, 28)


@pytest.mark.parametrize("split", list(BINARIZED_MNIST_SHA256))
def test_binarized_mnist_checksums(binarized_mnist: dict, split: str) -> None:
    assert _sha16(binarized_mnist[split].x) == BINARIZED_MNIST_SHA256[split]


def test_binarized_mnist_train_valid_is_train_then_valid(binarized_mnist: dict) -> None:
    expected = torch.cat([binarized_mnist["train"].x, binarized_mnist["valid"].x])
    assert torch.equal(binarized_mnist["train+valid"].x, expected)


def test_binarized_mnist_found_in_subfolder_of_data_dir(shared_data: Path) -> None:
    _shared_subdir(shared_data, "binarized_mnist")
    data = load_dataset("binarized-mnist", "test", data_dir=shared_data)
    assert _sha16(data.x) == BINARIZED_MNIST_SHA256["test"]


# --- binarized MNIST (synthetic .amat files) --------------------------------------------------------


def _amat_text(rows: np.ndarray) -> str:
    return "".join(" ".join(str(v) for v in row) + "\n" for row in rows)


def _write_amat_set(directory: Path, sizes=(3, 2, 2), gz: bool = False, seed: int = 0) -> dict:
    """Small binarized-MNIST files of random 0/1 rows; returns the arrays by split."""
    rng = np.random.default_rng(seed)
    arrays = {}
    for split, n in zip(("train", "valid", "test"), sizes, strict=True):
        arrays[split] = rng.integers(0, 2, size=(n, 784), dtype=np.uint8)
        path = directory / f"binarized_mnist_{split}.amat"
        text = _amat_text(arrays[split]).encode()
        if gz:
            (directory / f"{path.name}.gz").write_bytes(gzip.compress(text))
        else:
            path.write_bytes(text)
    return arrays


@pytest.mark.parametrize("gz", [False, True])
def test_amat_files_load_plain_or_gzipped(tmp_path: Path, gz: bool) -> None:
    arrays = _write_amat_set(tmp_path, gz=gz)
    for split in ("train", "valid", "test"):
        data = load_dataset("binarized-mnist", split, data_dir=tmp_path)
        assert np.array_equal(data.x.numpy(), arrays[split])
    both = load_dataset("binarized-mnist", "train+valid", data_dir=tmp_path)
    assert np.array_equal(both.x.numpy(), np.concatenate([arrays["train"], arrays["valid"]]))


def test_amat_plain_file_preferred_over_gz(tmp_path: Path) -> None:
    plain = _write_amat_set(tmp_path, gz=False, seed=0)
    _write_amat_set(tmp_path, gz=True, seed=1)
    data = load_dataset("binarized-mnist", "test", data_dir=tmp_path)
    assert np.array_equal(data.x.numpy(), plain["test"])


def test_amat_blank_lines_and_crlf_are_accepted(tmp_path: Path) -> None:
    arrays = _write_amat_set(tmp_path)
    text = _amat_text(arrays["test"]).replace("\n", "\r\n") + "\r\n\n"
    (tmp_path / "binarized_mnist_test.amat").write_text(text)
    data = load_dataset("binarized-mnist", "test", data_dir=tmp_path)
    assert np.array_equal(data.x.numpy(), arrays["test"])


@pytest.mark.parametrize(
    ("edit", "expected"),
    [
        (lambda rows: [rows[0], rows[1][:-2], rows[2]], "line 2: 783 values"),  # a value missing
        (lambda rows: [rows[0], rows[1], rows[2] + " 0"], "line 3: 785 values"),  # one too many
        (lambda rows: [rows[0], "2" + rows[1][1:], rows[2]], "line 2: found '2'"),
        (lambda rows: [rows[0], rows[1], "10" + rows[2][1:]], "line 3: found '10'"),
        (lambda rows: ["0.5" + rows[0][1:], rows[1], rows[2]], "line 1: found '0.5'"),
        (lambda rows: [rows[0], rows[1][:-1] + "-1", rows[2]], "line 2: found '-1'"),
    ],
    ids=["few-columns", "many-columns", "value-2", "value-10", "value-0.5", "value-minus-1"],
)
def test_amat_bad_content_is_refused(tmp_path: Path, edit, expected: str) -> None:
    arrays = _write_amat_set(tmp_path)
    rows = _amat_text(arrays["train"]).splitlines()
    (tmp_path / "binarized_mnist_train.amat").write_text("\n".join(edit(rows)) + "\n")
    with pytest.raises(InputError, match="binarized_mnist_train.amat") as error:
        load_dataset("binarized-mnist", "train", data_dir=tmp_path)
    assert expected in str(error.value)


def test_amat_empty_file_is_refused(tmp_path: Path) -> None:
    _write_amat_set(tmp_path)
    (tmp_path / "binarized_mnist_valid.amat").write_text("\n\n")
    with pytest.raises(InputError, match="binarized_mnist_valid.amat.*no images"):
        load_dataset("binarized-mnist", "valid", data_dir=tmp_path)


def test_amat_corrupt_gzip_is_refused(tmp_path: Path) -> None:
    _write_amat_set(tmp_path, gz=True)
    path = tmp_path / "binarized_mnist_test.amat.gz"
    path.write_bytes(path.read_bytes()[:100])  # truncated
    with pytest.raises(InputError, match="binarized_mnist_test.amat.gz.*gzip"):
        load_dataset("binarized-mnist", "test", data_dir=tmp_path)


# --- MNIST and Fashion-MNIST (synthetic IDX files) -------------------------------------------------

IDX_TRAIN, IDX_TEST, IDX_SHAPE = 60_000, 7, (2, 3)


def _idx_bytes(array: np.ndarray, magic: int) -> bytes:
    header = magic.to_bytes(4, "big") + b"".join(d.to_bytes(4, "big") for d in array.shape)
    return header + np.ascontiguousarray(array, dtype=np.uint8).tobytes()


def _write_idx(path: Path, array: np.ndarray, magic: int, gz: bool = False) -> Path:
    raw = _idx_bytes(array, magic)
    if gz:
        path = path.with_name(path.name + ".gz")
        raw = gzip.compress(raw)
    path.write_bytes(raw)
    return path


def _idx_images(n: int, offset: int = 0) -> np.ndarray:
    """``n`` images of 2x3 whose first two pixels encode the image's index (base 256)."""
    index = np.arange(offset, offset + n)
    images = np.zeros((n, *IDX_SHAPE), dtype=np.uint8)
    images[:, 0, 0] = index % 256
    images[:, 0, 1] = index // 256
    images[:, 1, 2] = 255
    return images


def _write_idx_set(directory: Path, gz: bool = False) -> dict:
    """Training (60,000 tiny images) and t10k files; returns the arrays by file prefix."""
    directory.mkdir(parents=True, exist_ok=True)
    arrays = {
        "train": (_idx_images(IDX_TRAIN), (np.arange(IDX_TRAIN) % 10).astype(np.uint8)),
        "t10k": (_idx_images(IDX_TEST, offset=1000), (np.arange(IDX_TEST) % 10).astype(np.uint8)),
    }
    for prefix, (images, labels) in arrays.items():
        _write_idx(directory / f"{prefix}-images-idx3-ubyte", images, 2051, gz)
        _write_idx(directory / f"{prefix}-labels-idx1-ubyte", labels, 2049, gz)
    return arrays


def _decoded_index(x: torch.Tensor) -> np.ndarray:
    pixels = np.rint(x.numpy() * 255).astype(np.int64)
    return pixels[:, 0] + 256 * pixels[:, 1]


@pytest.mark.parametrize("gz", [False, True], ids=["plain", "gz"])
@pytest.mark.parametrize("name", ["mnist", "fashion-mnist"])
def test_idx_files_load_with_canonical_splits(tmp_path: Path, name: str, gz: bool) -> None:
    arrays = _write_idx_set(tmp_path, gz=gz)
    expected_index = {
        "train": np.arange(50_000),
        "valid": np.arange(50_000, 60_000),
        "train+valid": np.arange(60_000),
        "test": np.arange(1000, 1000 + IDX_TEST),
    }
    for split, index in expected_index.items():
        data = load_dataset(name, split, data_dir=tmp_path)
        assert data.x.shape == (len(index), 6)
        assert data.image_shape == IDX_SHAPE
        assert data.kind == "continuous"
        assert np.array_equal(_decoded_index(data.x), index)
        labels = index % 10 if split != "test" else np.arange(IDX_TEST) % 10
        assert torch.equal(data.y, torch.as_tensor(labels))
        assert data.y.dtype == torch.int64
        assert float(data.x.min()) >= 0.0 and float(data.x.max()) == 1.0
    # Row-major pixels, scaled by 255.
    test = load_dataset(name, "test", data_dir=tmp_path)
    images = arrays["t10k"][0]
    assert torch.allclose(test.x, torch.as_tensor(images.reshape(IDX_TEST, -1) / 255.0).float())


def test_idx_found_in_subfolder_of_data_dir(tmp_path: Path) -> None:
    _write_idx_set(tmp_path / "mnist")
    assert load_dataset("mnist", "test", data_dir=tmp_path).num_points == IDX_TEST


def test_idx_threshold_binarization(tmp_path: Path) -> None:
    _write_idx_set(tmp_path)
    data = load_dataset("mnist", "test", data_dir=tmp_path, binarize="threshold")
    assert data.kind == "binary"
    assert set(data.x.unique().tolist()) <= {0.0, 1.0}


def test_fashion_mnist_falls_back_to_debian_directory(tmp_path: Path, monkeypatch) -> None:
    debian = tmp_path / "usr-share-datasets-fashion-mnist"
    _write_idx_set(debian, gz=True)
    monkeypatch.setattr(datasets_module, "DEBIAN_FASHION_MNIST", debian)
    assert load_dataset("fashion-mnist", "test").num_points == IDX_TEST
    # ... also when data_dir exists but lacks the files,
    empty = tmp_path / "empty"
    empty.mkdir()
    assert load_dataset("fashion-mnist", "test", data_dir=empty).num_points == IDX_TEST
    # ... but MNIST has no such fallback.
    with pytest.raises(InputError, match="--data-dir"):
        load_dataset("mnist", "test")


def test_fashion_mnist_without_data_dir_or_debian_package(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(datasets_module, "DEBIAN_FASHION_MNIST", tmp_path / "not-installed")
    with pytest.raises(InputError, match="--data-dir") as error:
        load_dataset("fashion-mnist", "train")
    assert "apt-get install dataset-fashion-mnist" in str(error.value)
    assert "zalandoresearch/fashion-mnist" in str(error.value)


def test_idx_truncated_file_is_refused(tmp_path: Path) -> None:
    _write_idx_set(tmp_path)
    path = tmp_path / "t10k-images-idx3-ubyte"
    path.write_bytes(path.read_bytes()[:-5])
    with pytest.raises(InputError, match="t10k-images-idx3-ubyte.*truncated"):
        load_dataset("mnist", "test", data_dir=tmp_path)


@pytest.mark.parametrize("length", [2, 10])
def test_idx_truncated_header_is_refused(tmp_path: Path, length: int) -> None:
    _write_idx_set(tmp_path)
    path = tmp_path / "t10k-images-idx3-ubyte"
    path.write_bytes(path.read_bytes()[:length])
    with pytest.raises(InputError, match="t10k-images-idx3-ubyte.*truncated"):
        load_dataset("mnist", "test", data_dir=tmp_path)


def test_idx_trailing_bytes_are_refused(tmp_path: Path) -> None:
    _write_idx_set(tmp_path)
    path = tmp_path / "t10k-labels-idx1-ubyte"
    path.write_bytes(path.read_bytes() + b"\0")
    with pytest.raises(InputError, match="t10k-labels-idx1-ubyte.*trailing"):
        load_dataset("mnist", "test", data_dir=tmp_path)


def test_idx_truncated_gzip_is_refused(tmp_path: Path) -> None:
    _write_idx_set(tmp_path, gz=True)
    path = tmp_path / "train-images-idx3-ubyte.gz"
    path.write_bytes(path.read_bytes()[:-20])
    with pytest.raises(InputError, match="train-images-idx3-ubyte.gz"):
        load_dataset("fashion-mnist", "train", data_dir=tmp_path)


def test_idx_bad_magic_number_is_refused(tmp_path: Path) -> None:
    arrays = _write_idx_set(tmp_path)
    # A labels file where the images should be.
    _write_idx(tmp_path / "t10k-images-idx3-ubyte", arrays["t10k"][1], 2049)
    with pytest.raises(InputError, match="t10k-images-idx3-ubyte.*magic number 2049"):
        load_dataset("mnist", "test", data_dir=tmp_path)
    (tmp_path / "t10k-images-idx3-ubyte").write_bytes(b"GIF89a" + bytes(100))
    with pytest.raises(InputError, match="t10k-images-idx3-ubyte.*magic number"):
        load_dataset("mnist", "test", data_dir=tmp_path)


def test_idx_count_mismatch_is_refused(tmp_path: Path) -> None:
    _write_idx_set(tmp_path)
    _write_idx(tmp_path / "t10k-labels-idx1-ubyte", np.zeros(IDX_TEST + 1, np.uint8), 2049)
    with pytest.raises(InputError, match="t10k-images-idx3-ubyte.*t10k-labels-idx1-ubyte"):
        load_dataset("mnist", "test", data_dir=tmp_path)


def test_idx_training_file_too_small_for_the_split(tmp_path: Path) -> None:
    _write_idx(tmp_path / "train-images-idx3-ubyte", _idx_images(100), 2051)
    _write_idx(tmp_path / "train-labels-idx1-ubyte", np.zeros(100, np.uint8), 2049)
    with pytest.raises(InputError, match="100 images"):
        load_dataset("mnist", "valid", data_dir=tmp_path)


# --- Frey Faces -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def frey(shared_data: Path) -> dict:
    directory = _shared_subdir(shared_data, "frey_faces")
    splits = ("train", "valid", "test", "train+valid")
    return {split: load_dataset("frey-faces", split, data_dir=directory) for split in splits}


def test_frey_faces_shapes_and_values(frey: dict) -> None:
    sizes = {split: data.num_points for split, data in frey.items()}
    assert sizes == {"train": 1365, "valid": 200, "test": 400, "train+valid": 1565}
    for data in frey.values():
        assert data.x_dim == 560
        assert data.image_shape == (28, 20)
        assert data.kind == "continuous" and data.y is None
        assert float(data.x.min()) >= 0.0 and float(data.x.max()) <= 1.0


def test_frey_faces_splits_partition_the_images(frey: dict, frey_ff: np.ndarray) -> None:
    parts = np.concatenate([frey[split].x.numpy() for split in ("train", "valid", "test")])
    assert len(parts) == frey_ff.shape[1] == 1965
    # Same multiset of images as the file: every image in exactly one split.
    as_bytes = np.rint(parts * 255).astype(np.uint8)
    assert _sorted_rows(as_bytes) == _sorted_rows(frey_ff.T)
    expected = torch.cat([frey["train"].x, frey["valid"].x])
    assert torch.equal(frey["train+valid"].x, expected)


def test_frey_faces_rows_are_the_columns_of_ff(frey: dict, frey_ff: np.ndarray) -> None:
    index = datasets_module._split_indices(1965, seed=0, valid=200, test=400)["test"]
    expected = torch.as_tensor(frey_ff[:, index].T / 255.0).float()
    assert torch.allclose(frey["test"].x, expected)


def test_frey_faces_images_are_row_major_28_high_20_wide(frey: dict) -> None:
    # A face seen from the front is left-right symmetric, not top-bottom: the mean face read as
    # 28 rows of 20 shows it; read the other way round (or column-major) it would not.
    mean = frey["train"].x.mean(0).numpy().reshape(frey["train"].image_shape)

    def correlation(a: np.ndarray, b: np.ndarray) -> float:
        return float(np.corrcoef(a.ravel(), b.ravel())[0, 1])

    left_right = correlation(mean, mean[:, ::-1])
    top_bottom = correlation(mean, mean[::-1, :])
    assert left_right > 0.6
    assert left_right > top_bottom + 0.4


def test_frey_faces_found_in_subfolder_of_data_dir(shared_data: Path) -> None:
    _shared_subdir(shared_data, "frey_faces")
    assert load_dataset("frey-faces", "valid", data_dir=shared_data).num_points == 200


def test_frey_mat_without_ff_is_refused(tmp_path: Path) -> None:
    scipy.io.savemat(tmp_path / "frey_rawface.mat", {"faces": np.zeros((560, 700), np.uint8)})
    with pytest.raises(InputError, match="frey_rawface.mat.*no variable 'ff'"):
        load_dataset("frey-faces", "train", data_dir=tmp_path)


def test_frey_mat_with_wrong_shape_is_refused(tmp_path: Path) -> None:
    scipy.io.savemat(tmp_path / "frey_rawface.mat", {"ff": np.zeros((700, 560), np.uint8)})
    with pytest.raises(InputError, match=r"frey_rawface.mat.*shape \(700, 560\)"):
        load_dataset("frey-faces", "train", data_dir=tmp_path)


def test_frey_mat_with_too_few_images_is_refused(tmp_path: Path) -> None:
    scipy.io.savemat(tmp_path / "frey_rawface.mat", {"ff": np.zeros((560, 600), np.uint8)})
    with pytest.raises(InputError, match="frey_rawface.mat.*600 images"):
        load_dataset("frey-faces", "train", data_dir=tmp_path)


def test_frey_mat_with_values_out_of_range_is_refused(tmp_path: Path) -> None:
    scipy.io.savemat(tmp_path / "frey_rawface.mat", {"ff": np.full((560, 700), 300.0)})
    with pytest.raises(InputError, match="frey_rawface.mat.*0-255"):
        load_dataset("frey-faces", "train", data_dir=tmp_path)


def test_frey_file_that_is_not_a_mat_file_is_refused(tmp_path: Path) -> None:
    (tmp_path / "frey_rawface.mat").write_bytes(b"not a MATLAB file\n" * 20)
    with pytest.raises(InputError, match="frey_rawface.mat"):
        load_dataset("frey-faces", "train", data_dir=tmp_path)


def test_frey_small_synthetic_file_loads(tmp_path: Path) -> None:
    ff = np.random.default_rng(0).integers(0, 256, size=(560, 700), dtype=np.uint8)
    scipy.io.savemat(tmp_path / "frey_rawface.mat", {"ff": ff})
    data = load_dataset("frey-faces", "train+valid", data_dir=tmp_path)
    assert data.num_points == 300
    index = datasets_module._split_indices(700, seed=0, valid=200, test=400)["train+valid"]
    assert torch.allclose(data.x, torch.as_tensor(ff[:, index].T / 255.0).float())


# --- errors common to the file-based data sets ------------------------------------------------------

FILE_BASED = {
    "binarized-mnist": ("binarized_mnist_train.amat", "Larochelle"),
    "mnist": ("train-images-idx3-ubyte", "LeCun"),
    "fashion-mnist": ("train-images-idx3-ubyte", "fashion-mnist"),
    "frey-faces": ("frey_rawface.mat", "Roweis"),
}


@pytest.mark.parametrize("name", list(FILE_BASED))
def test_missing_data_directory_is_refused(tmp_path: Path, name: str) -> None:
    missing = tmp_path / "no-such-directory"
    with pytest.raises(InputError, match="does not exist") as error:
        load_dataset(name, "train", data_dir=missing)
    assert str(missing) in str(error.value)


@pytest.mark.parametrize("name", list(FILE_BASED))
def test_missing_file_is_refused_with_where_to_get_it(
    tmp_path: Path, monkeypatch, name: str
) -> None:
    monkeypatch.setattr(datasets_module, "DEBIAN_FASHION_MNIST", tmp_path / "not-installed")
    filename, source = FILE_BASED[name]
    with pytest.raises(InputError) as error:
        load_dataset(name, "train", data_dir=tmp_path)
    message = str(error.value)
    assert f"{filename} (or {filename}.gz) not found" in message
    assert str(tmp_path) in message  # where it was looked for
    assert source in message  # where to get it


@pytest.mark.parametrize("name", list(FILE_BASED))
def test_no_data_directory_is_refused(tmp_path: Path, monkeypatch, name: str) -> None:
    monkeypatch.setattr(datasets_module, "DEBIAN_FASHION_MNIST", tmp_path / "not-installed")
    with pytest.raises(InputError, match="--data-dir") as error:
        load_dataset(name, "test")
    assert FILE_BASED[name][1] in str(error.value)


# --- digits -------------------------------------------------------------------------------------


def test_digits_splits() -> None:
    from sklearn.datasets import load_digits

    splits = {split: load_dataset("digits", split) for split in ("train", "valid", "test")}
    sizes = {split: data.num_points for split, data in splits.items()}
    assert sizes == {"train": 1257, "valid": 180, "test": 360}
    assert load_dataset("digits", "train+valid").num_points == 1437
    for data in splits.values():
        assert data.x_dim == 64 and data.image_shape == (8, 8) and data.kind == "continuous"
        assert float(data.x.min()) >= 0.0 and float(data.x.max()) <= 1.0
    # The splits partition the data set: images with their labels, as multisets.
    bunch = load_digits()
    full = np.column_stack([bunch.data / 16.0, bunch.target]).astype(np.float32)
    parts = np.concatenate(
        [np.column_stack([d.x.numpy(), d.y.numpy()]).astype(np.float32) for d in splits.values()]
    )
    assert _sorted_rows(parts) == _sorted_rows(full)


def test_digits_threshold_binarization() -> None:
    data = load_dataset("digits", "test", binarize="threshold")
    assert data.kind == "binary" and not data.dynamic_binarization
    assert set(data.x.unique().tolist()) == {0.0, 1.0}


def test_digits_dynamic_binarization() -> None:
    data = load_dataset("digits", "test", binarize="dynamic")
    assert data.kind == "binary" and data.dynamic_binarization
    assert len(data.x.unique()) > 2  # probabilities, kept grayscale
    fixed = data.fixed_binarization(0)
    assert not fixed.dynamic_binarization
    assert set(fixed.x.unique().tolist()) <= {0.0, 1.0}
    assert torch.equal(fixed.x, data.fixed_binarization(0).x)
    assert not torch.equal(fixed.x, data.fixed_binarization(1).x)


# --- synthetic linear-Gaussian ------------------------------------------------------------------


def test_synthetic_linear_gaussian_sizes_and_truth() -> None:
    sizes = {"train": 2000, "valid": 500, "test": 1000, "train+valid": 2500}
    for split, n in sizes.items():
        data = load_dataset("synthetic-linear-gaussian", split)
        assert data.x.shape == (n, 16) and data.truth is not None
    test = load_dataset("synthetic-linear-gaussian", "test")
    assert torch.isfinite(test.truth.log_likelihood(test.x)).all()
    train = load_dataset("synthetic-linear-gaussian", "train")
    assert not torch.equal(train.x[:1000], test.x)


def test_synthetic_linear_gaussian_matches_its_marginal() -> None:
    # The marginal variances reach ~35, so fixed tolerances (0.15 on a mean, 0.5 on a covariance)
    # would be within one standard error; compare in units of the standard error instead. 4.5 SE
    # over 152 statistics fails by chance with probability ~1e-3; data drawn without the noise
    # term are off by ~9 SE, with a wrong bias by ~190.
    data = load_dataset("synthetic-linear-gaussian", "train")
    marginal = data.truth.marginal()
    mean, cov = marginal.mean, marginal.covariance_matrix
    n = data.num_points
    variance = cov.diagonal()
    mean_z = (data.x.mean(0) - mean) / (variance / n).sqrt()
    cov_se = ((variance[:, None] * variance[None, :] + cov**2) / n).sqrt()
    cov_z = (torch.cov(data.x.T) - cov) / cov_se
    assert mean_z.abs().max() < 4.5
    assert cov_z.abs().max() < 4.5


def test_synthetic_linear_gaussian_cannot_be_binarized() -> None:
    with pytest.raises(InputError, match="binarized"):
        load_dataset("synthetic-linear-gaussian", "train", binarize="threshold")


# --- names --------------------------------------------------------------------------------------


def test_unknown_data_set_suggests_closest_name() -> None:
    with pytest.raises(InputError, match="did you mean 'binarized-mnist'"):
        load_dataset("binarised-mnist")
    with pytest.raises(InputError, match="did you mean 'frey-faces'"):
        DataConfig(name="frey_faces")


def test_unknown_split_suggests_closest_name() -> None:
    with pytest.raises(InputError, match="did you mean 'test'"):
        load_dataset("digits", "tests")


def test_unknown_binarize_is_refused() -> None:
    with pytest.raises(InputError, match="binarize"):
        load_dataset("digits", "train", binarize="stochastic")
