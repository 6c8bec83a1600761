"""Image and feature metrics of the evaluation (docs/design.md §5): SSIM, PSNR, cosine similarity,
Fréchet distance, accuracies and seeded bootstrap intervals.

Images are float tensors [N, 3, H, W] in [0, 1]; features are [N, D] arrays or tensors.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F


def gaussian_window(size: int = 11, sigma: float = 1.5) -> torch.Tensor:
    """Normalised 2-D gaussian [size, size] (Wang et al. 2004: 11 × 11, σ = 1.5)."""
    coords = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-(coords**2) / (2 * sigma**2))
    g = g / g.sum()
    return torch.outer(g, g)


def _blur_matrix(size: int, g: torch.Tensor) -> torch.Tensor:
    """[size - k + 1, size] band matrix: row i holds the 1-D window ``g`` at columns i … i + k - 1."""
    out = size - g.numel() + 1
    rows = torch.arange(out)[:, None]
    cols = rows + torch.arange(g.numel())[None, :]
    return torch.zeros(out, size, dtype=g.dtype).index_put_((rows.expand_as(cols), cols), g.expand(out, -1))


def ssim(x: torch.Tensor, y: torch.Tensor, data_range: float = 1.0, window: int = 11,
         sigma: float = 1.5, k1: float = 0.01, k2: float = 0.03) -> torch.Tensor:
    """Per-image SSIM [N] with a gaussian window, averaged over channels and valid positions.

    Statistics use the population (not sample) covariance, as in the original definition. The
    gaussian is separable, so the valid-region blur of all five moments is two matrix products
    with band matrices (``B_h · M · B_wᵀ``): 7× faster on a CPU than single-channel convolutions.
    Images smaller than the window use a window of their own size.
    """
    if x.shape != y.shape or x.dim() != 4:
        raise ValueError(f"ssim needs two [N, C, H, W] tensors of one shape, got {tuple(x.shape)} and {tuple(y.shape)}")
    window = min(window, x.shape[-1], x.shape[-2])
    h, w = x.shape[-2:]
    x, y = x.float(), y.float()
    g = gaussian_window(window, sigma).sum(dim=0).float()  # the 1-D factor
    moments = torch.stack([x, y, x * x, y * y, x * y], dim=1)  # [N, 5, C, H, W]
    blurred = _blur_matrix(h, g).to(x.device) @ moments @ _blur_matrix(w, g).to(x.device).T
    mu_x, mu_y, xx, yy, xy = blurred.unbind(dim=1)
    var_x, var_y, cov_xy = xx - mu_x**2, yy - mu_y**2, xy - mu_x * mu_y
    c1, c2 = (k1 * data_range) ** 2, (k2 * data_range) ** 2
    ssim_map = ((2 * mu_x * mu_y + c1) * (2 * cov_xy + c2)) / ((mu_x**2 + mu_y**2 + c1) * (var_x + var_y + c2))
    return ssim_map.mean(dim=(1, 2, 3))


def psnr(x: torch.Tensor, y: torch.Tensor, data_range: float = 1.0, max_db: float = 100.0) -> torch.Tensor:
    """Per-image PSNR [N] in dB; identical images give ``max_db`` instead of infinity."""
    mse = ((x.double() - y.double()) ** 2).mean(dim=tuple(range(1, x.dim())))
    floor = data_range**2 / 10 ** (max_db / 10)
    return (10 * torch.log10(data_range**2 / mse.clamp_min(floor))).float()


def cosine_similarity(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Row-wise cosine similarity of two [N, D] tensors → [N]."""
    return (F.normalize(a.float(), dim=-1) * F.normalize(b.float(), dim=-1)).sum(-1)


def _sqrt_psd(matrix: np.ndarray) -> np.ndarray:
    values, vectors = np.linalg.eigh(matrix)
    return (vectors * np.sqrt(np.clip(values, 0.0, None))) @ vectors.T


def gaussian_stats(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and population covariance of [N, D] features."""
    features = np.asarray(features, dtype=np.float64)
    mean = features.mean(axis=0)
    centred = features - mean
    return mean, centred.T @ centred / max(len(features), 1)


def mixture_stats(parts: list[tuple[np.ndarray, np.ndarray]], weights: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and covariance of a weighted mixture of gaussians given as (mean, cov) pairs."""
    weights = np.asarray(weights, dtype=np.float64)
    weights = weights / weights.sum()
    mean = sum(w * m for w, (m, _) in zip(weights, parts))
    second = sum(w * (c + np.outer(m, m)) for w, (m, c) in zip(weights, parts))
    return mean, second - np.outer(mean, mean)


class FrechetReference:
    """Fréchet distance to one fixed gaussian, with its square root computed once.

    Tr sqrt(S_r S_g) = Σ sqrt(eig(S_r^½ S_g S_r^½)): a symmetric PSD eigenproblem, so no
    complex parts and no iterative matrix square root.
    """

    def __init__(self, mean: np.ndarray, cov: np.ndarray):
        self.mean = np.asarray(mean, dtype=np.float64)
        self.cov = np.asarray(cov, dtype=np.float64)
        self._cov_sqrt = _sqrt_psd(self.cov)
        self._trace = float(np.trace(self.cov))

    def distance(self, mean: np.ndarray, cov: np.ndarray) -> float:
        inner = self._cov_sqrt @ cov @ self._cov_sqrt
        eig = np.clip(np.linalg.eigvalsh((inner + inner.T) / 2), 0.0, None)
        diff = self.mean - mean
        value = diff @ diff + self._trace + np.trace(cov) - 2.0 * np.sqrt(eig).sum()
        return float(max(value, 0.0))

    def distance_to_features(self, features: np.ndarray) -> float:
        return self.distance(*gaussian_stats(features))


def frechet_distance(mean_a: np.ndarray, cov_a: np.ndarray, mean_b: np.ndarray, cov_b: np.ndarray) -> float:
    """‖μa − μb‖² + Tr(Σa + Σb − 2 (Σa Σb)^½)."""
    return FrechetReference(mean_a, cov_a).distance(np.asarray(mean_b, np.float64), np.asarray(cov_b, np.float64))


def bootstrap_ci(values: np.ndarray, resamples: int = 1000, seed: int = 0, level: float = 0.95,
                 statistic=None, recentre: bool = False) -> tuple[float, float, float]:
    """(statistic, low, high): percentile bootstrap interval over rows, seeded.

    ``statistic`` maps a resampled array to a float (default: the mean, vectorised). ``recentre``
    shifts the bootstrap distribution onto the point value first: for statistics that resampling
    itself biases (a resample repeats rows, which inflates a Fréchet distance).
    """
    values = np.asarray(values, dtype=np.float64)
    n = len(values)
    if n == 0:
        return float("nan"), float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    index = rng.integers(0, n, size=(resamples, n))
    if statistic is None:
        point = float(values.mean())
        stats = values[index].mean(axis=1)
    else:
        point = float(statistic(values))
        stats = np.array([statistic(values[i]) for i in index])
    if recentre:
        stats = stats - (stats.mean() - point)
    tail = (1.0 - level) / 2 * 100
    low, high = np.percentile(stats, [tail, 100 - tail])
    return point, float(low), float(high)


def accuracy(predicted: np.ndarray, expected: np.ndarray) -> float:
    predicted, expected = np.asarray(predicted), np.asarray(expected)
    if predicted.shape != expected.shape:
        raise ValueError(f"accuracy: {predicted.shape} predictions vs {expected.shape} labels")
    return float((predicted == expected).mean()) if len(predicted) else float("nan")


# --- per-window scores of generated images ---------------------------------------------------------

def _unit_float(images_uint8: np.ndarray) -> torch.Tensor:
    """[N, S, S, 3] uint8 → [N, 3, S, S] float in [0, 1]."""
    return torch.from_numpy(np.ascontiguousarray(images_uint8)).permute(0, 3, 1, 2).float() / 255.0


def _rowwise_cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return cosine_similarity(torch.as_tensor(a), torch.as_tensor(b)).numpy()


class WindowScorer:
    """Scores one image per test window against its history, reference and truth (docs/design.md §5).

    ``evaluator`` is the trained evaluation CNN (``Evaluator.predict``); ``pretrained`` maps a name
    ("clip", "dino") to an encoder with ``features(images_uint8)``, scored on similarities only.
    """

    def __init__(self, evaluator, item_images: np.ndarray, items, pretrained: dict | None = None,
                 needed_items: np.ndarray | None = None):
        self.evaluator = evaluator
        self.item_images = item_images
        self.item_style = items["style"].to_numpy()
        self.item_emoji = items["emoji_key"].to_numpy()
        self.real = evaluator.predict(item_images)
        self.style_gaussians = {s: gaussian_stats(self.real["features"][self.item_style == s])
                                for s in np.unique(self.item_style)}
        self.pretrained = dict(pretrained or {})
        needed = np.arange(len(item_images)) if needed_items is None else np.unique(needed_items)
        self._pretrained_row = np.full(len(item_images), -1, dtype=np.int64)
        self._pretrained_row[needed] = np.arange(len(needed))
        self.pretrained_items = {name: enc.features(item_images[needed]) for name, enc in self.pretrained.items()}

    def score(self, images: np.ndarray, windows, reference_col: str, truth_col: str,
              history_cols: list[str]) -> tuple[dict[str, np.ndarray], np.ndarray]:
        """→ (per-window score columns, evaluator features of ``images`` [W, D])."""
        pred = self.evaluator.predict(images)
        feats = pred["features"]
        history = windows[history_cols].to_numpy(np.int64)
        reference = windows[reference_col].to_numpy(np.int64)
        truth = windows[truth_col].to_numpy(np.int64)
        w, h = history.shape
        expected_style = self.evaluator.style_index(windows["preferred_style"].to_numpy())
        expected_content = self.evaluator.content_index(self.item_emoji[reference])
        real_feats = self.real["features"]
        gen = _unit_float(images)
        hist_ssim = ssim(gen.repeat_interleave(h, dim=0), _unit_float(self.item_images[history.ravel()]))
        truth_pixels = _unit_float(self.item_images[truth])
        scores = {
            "style_correct": (pred["style"] == expected_style).astype(np.float64),
            "history_similarity": _rowwise_cosine(np.repeat(feats, h, axis=0), real_feats[history.ravel()])
            .reshape(w, h).mean(axis=1),
            "history_ssim": hist_ssim.reshape(w, h).mean(dim=1).numpy(),
            "content_correct": (pred["content"] == expected_content).astype(np.float64),
            "content_top5_correct": (pred["content_top5"] == expected_content[:, None]).any(axis=1).astype(np.float64),
            "reference_similarity": _rowwise_cosine(feats, real_feats[reference]),
            "gt_similarity": _rowwise_cosine(feats, real_feats[truth]),
            "gt_ssim": ssim(gen, truth_pixels).numpy(),
            "gt_psnr": psnr(gen, truth_pixels).numpy(),
        }
        for name, encoder in self.pretrained.items():
            item_feats, row_of = self.pretrained_items[name], self._pretrained_row
            g = encoder.features(images)
            hist_feats = item_feats[row_of[history.ravel()]]
            scores[f"{name}_history_similarity"] = _rowwise_cosine(np.repeat(g, h, axis=0), hist_feats) \
                .reshape(w, h).mean(axis=1)
            scores[f"{name}_reference_similarity"] = _rowwise_cosine(g, item_feats[row_of[reference]])
            scores[f"{name}_gt_similarity"] = _rowwise_cosine(g, item_feats[row_of[truth]])
        scores["predicted_style"] = np.array(self.evaluator.styles)[pred["style"]]
        scores["predicted_emoji"] = np.array(self.evaluator.emoji_keys)[pred["content"]]
        return scores, feats

    def frechet_reference(self, preferred_styles) -> FrechetReference:
        """Real images of the windows' preferred styles, weighted by how many windows prefer each."""
        styles, counts = np.unique(np.asarray(preferred_styles), return_counts=True)
        parts = [self.style_gaussians[s] for s in styles]
        return FrechetReference(*mixture_stats(parts, counts))


def frechet_with_ci(reference: FrechetReference, features: np.ndarray, resamples: int, seed: int) -> tuple[float, float, float]:
    """Fréchet distance of ``features`` to ``reference`` with a bootstrap interval over windows,
    re-centred on the point value (the spread, without the upward shift that repeated rows cause)."""
    return bootstrap_ci(features, resamples, seed, statistic=reference.distance_to_features, recentre=True)
