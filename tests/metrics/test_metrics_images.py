"""The image judge: the Fréchet distance against closed forms, the classifier on held-out sklearn
digits, and the per-pixel baseline against the real images' marginals."""

import numpy as np
import pytest
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

from tformer.config import ConfigError
from tformer.metrics import ImageJudge, frechet_distance, per_pixel_baseline


@pytest.fixture(scope="module")
def digits():
    """(train_images, test_images, train_labels, test_labels); 8x8 uint8 images, 0..16 -> 0..255."""
    data = load_digits()
    images = np.round(data.images * 255 / 16).astype(np.uint8)
    return train_test_split(images, data.target, test_size=0.25, stratify=data.target, random_state=0)


@pytest.fixture(scope="module")
def judge(digits):
    train_x, _, train_y, _ = digits
    return ImageJudge(n_components=16).fit(train_x, train_y)


def fitted_moments_fd(a, b):
    """FD of the fitted Gaussians, computed independently of the library: Tr((S_a S_b)^(1/2)) as the
    sum of sqrt eigenvalues of S_a^(1/2) S_b S_a^(1/2), which has the same spectrum and is symmetric."""
    sigma_a, sigma_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    w, v = np.linalg.eigh(sigma_a)
    root_a = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    trace_root = np.sqrt(np.clip(np.linalg.eigvalsh(root_a @ sigma_b @ root_a), 0, None)).sum()
    diff = a.mean(0) - b.mean(0)
    return diff @ diff + np.trace(sigma_a) + np.trace(sigma_b) - 2 * trace_root


def test_frechet_distance_of_a_set_with_itself_is_zero():
    a = np.random.default_rng(0).normal(size=(500, 8))
    assert frechet_distance(a, a) == pytest.approx(0.0, abs=1e-8)


def test_frechet_distance_matches_closed_form_for_diagonal_gaussians():
    rng = np.random.default_rng(1)
    mu_a, mu_b = np.array([0.0, 1.0, -2.0, 0.5]), np.array([1.0, 1.0, 0.0, -0.5])
    var_a, var_b = np.array([1.0, 4.0, 0.25, 2.0]), np.array([2.0, 1.0, 0.25, 9.0])
    a = rng.normal(mu_a, np.sqrt(var_a), size=(20_000, 4))
    b = rng.normal(mu_b, np.sqrt(var_b), size=(20_000, 4))
    assert frechet_distance(a, b) == pytest.approx(fitted_moments_fd(a, b), rel=1e-6)
    # population closed form for diagonal Gaussians: ||mu_a - mu_b||^2 + sum (sigma_a - sigma_b)^2
    population = ((mu_a - mu_b) ** 2).sum() + ((np.sqrt(var_a) - np.sqrt(var_b)) ** 2).sum()
    assert frechet_distance(a, b) == pytest.approx(population, rel=0.03)


def test_frechet_distance_matches_fitted_moments_for_correlated_features():
    rng = np.random.default_rng(2)
    a = rng.normal(size=(300, 6)) @ rng.normal(size=(6, 6))
    b = rng.normal(size=(400, 6)) @ rng.normal(size=(6, 6)) + 0.3
    assert frechet_distance(a, b) == pytest.approx(fitted_moments_fd(a, b), rel=1e-6)


def test_frechet_distance_is_symmetric():
    rng = np.random.default_rng(3)
    a, b = rng.normal(size=(200, 5)), rng.gamma(2.0, size=(300, 5))
    assert frechet_distance(a, b) == pytest.approx(frechet_distance(b, a), rel=1e-9)


def test_frechet_distance_grows_with_a_shift_and_equals_its_squared_norm():
    a = np.random.default_rng(4).normal(size=(300, 5))
    direction = np.ones(5) / np.sqrt(5)
    distances = [frechet_distance(a, a + s * direction) for s in (0.5, 1.0, 2.0, 4.0)]
    assert distances == sorted(distances)
    # same covariance, so only the mean term remains
    assert distances == pytest.approx([0.25, 1.0, 4.0, 16.0], rel=1e-6)


def test_frechet_distance_handles_singular_covariances():
    a = np.random.default_rng(5).normal(size=(100, 4))
    a[:, 2] = 1.0  # a constant feature: both covariances singular
    distance = frechet_distance(a, a + [0.0, 0.0, 1.0, 0.0])
    assert np.isfinite(distance) and distance == pytest.approx(1.0, abs=1e-3)


@pytest.mark.parametrize("a, b, message", [
    (np.zeros((3, 4)), np.zeros((10, 4)), "needs at least 5"),
    (np.zeros((10, 4)), np.zeros((10, 3)), "features_b has 3"),
    (np.zeros(10), np.zeros(10), "2-D"),
    (np.full((10, 2), np.nan), np.zeros((10, 2)), "NaN"),
])
def test_frechet_distance_rejects_bad_features(a, b, message):
    with pytest.raises(ValueError, match=message):
        frechet_distance(a, b)


def test_judge_recognises_held_out_real_digits(judge, digits):
    _, test_x, _, test_y = digits
    assert judge.recognition_rate(test_x, test_y) > 0.9
    assert judge.predict(test_x).shape == test_y.shape


def test_judge_treats_missing_channel_axis_as_one_channel(judge, digits):
    _, test_x, _, _ = digits
    np.testing.assert_array_equal(judge.predict(test_x), judge.predict(test_x[..., None]))
    np.testing.assert_allclose(judge.features(test_x), judge.features(test_x[..., None]))


def test_judge_features_and_score(judge, digits):
    train_x, test_x, _, test_y = digits
    assert judge.features(test_x).shape == (len(test_x), 16)
    score = judge.score(test_x, test_y, reference=train_x)
    assert score["n"] == len(test_x) and score["recognised"] > 0.9
    assert score["frechet"] == pytest.approx(judge.frechet_distance(train_x, test_x))


def test_per_pixel_baseline_shape_dtype_labels_and_seed(digits):
    train_x, _, train_y, _ = digits
    images, labels = per_pixel_baseline(train_x, train_y, n_per_class=7, seed=3)
    assert images.shape == (70, 8, 8) and images.dtype == np.uint8
    np.testing.assert_array_equal(labels, np.repeat(np.arange(10), 7))
    assert per_pixel_baseline(train_x[..., None], train_y, 7, seed=3)[0].shape == (70, 8, 8, 1)
    np.testing.assert_array_equal(images, per_pixel_baseline(train_x, train_y, 7, seed=3)[0])
    assert not np.array_equal(images, per_pixel_baseline(train_x, train_y, 7, seed=4)[0])


def test_per_pixel_baseline_matches_each_class_pixel_marginals(digits):
    train_x, _, train_y, _ = digits
    images, labels = per_pixel_baseline(train_x, train_y, n_per_class=4000, seed=0)
    levels = np.unique(train_x)  # the 17 grey levels of the digits
    for label in (0, 7):
        real, fake = train_x[train_y == label].reshape(-1, 64), images[labels == label].reshape(-1, 64)
        real_freq = (real[..., None] == levels).mean(0)  # (64 pixels, 17 levels)
        fake_freq = (fake[..., None] == levels).mean(0)
        assert np.isin(fake, levels).all()
        assert np.abs(real_freq - fake_freq).max() < 0.04  # ~5 standard errors at 4,000 samples


def test_per_pixel_baseline_is_judged_worse_than_real_images(judge, digits):
    train_x, test_x, train_y, test_y = digits
    images, labels = per_pixel_baseline(train_x, train_y, n_per_class=200, seed=0)
    # measured over seeds 0-4: baseline 0.968-0.975 against 0.993 real; FD ~0.20 against 0.037
    assert judge.recognition_rate(images, labels) < judge.recognition_rate(test_x, test_y) - 0.01
    assert judge.frechet_distance(test_x, images) > 3 * judge.frechet_distance(test_x, train_x)


def test_unfitted_judge_says_to_fit():
    with pytest.raises(ValueError, match="not fitted"):
        ImageJudge().predict(np.zeros((2, 8, 8), np.uint8))


@pytest.mark.parametrize("call, message", [
    (lambda j, x, y: j.predict(np.zeros((3, 28, 28), np.uint8)), r"\(28, 28, 1\).*fitted on \(8, 8, 1\)"),
    (lambda j, x, y: j.recognition_rate(x[:3], [0, 1, 12]), r"\[12\] are not among"),
    (lambda j, x, y: j.recognition_rate(x[:3], y[:2]), "one label per image"),
    (lambda j, x, y: j.frechet_distance(x[:10], x), "images_a has 10 samples.*at least 17"),
    (lambda j, x, y: j.predict(x.astype(np.float32)), "uint8"),
    (lambda j, x, y: j.predict(x[0]), r"\(N, H, W, C\)"),
])
def test_judge_rejects_bad_input(judge, digits, call, message):
    _, test_x, _, test_y = digits
    with pytest.raises(ValueError, match=message):
        call(judge, test_x, test_y)


def test_bad_settings_raise_config_errors(digits):
    train_x, _, train_y, _ = digits
    with pytest.raises(ConfigError, match="n_components"):
        ImageJudge(n_components=0)
    with pytest.raises(ConfigError, match="n_components=65"):
        ImageJudge(n_components=65).fit(train_x, train_y)
    with pytest.raises(ConfigError, match="n_per_class"):
        per_pixel_baseline(train_x, train_y, n_per_class=0)
    with pytest.raises(ValueError, match="at least 2 classes"):
        ImageJudge().fit(train_x[:5], np.zeros(5, int))
