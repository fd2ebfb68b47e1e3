"""Quality measures that need no download.

- `frechet_distance` / `feature_fd`: the Frechet distance between Gaussians fitted to features (the FID formula of
  Heusel et al., 2017), here in the feature space of the zoo's `FeatureNet` instead of Inception-v3.
- `token_nll`: mean negative log-likelihood per image token under a `specdec.models.gpt.GPT` (conditional, no CFG):
  how plausible samples are to the target, the standard "does a lossy rule leave the target's distribution" check.
- `token_histogram_tvd`: total variation distance between the unigram token histograms of two token sets.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

# fewer generated images: the Frechet distance's seed noise exceeds the differences between decoding methods, so
# the demo and the bench report none (zoo: sd 1.5 at 512 images, several times that at 16)
FD_MIN_IMAGES = 200


def _as_2d_float64(x: Tensor | np.ndarray, name: str) -> np.ndarray:
    a = x.detach().cpu().double().numpy() if isinstance(x, Tensor) else np.asarray(x, dtype=np.float64)
    if a.ndim != 2:
        raise ValueError(f"{name} must be [N, F], got shape {a.shape}")
    if len(a) < 2:
        raise ValueError(f"{name} needs at least 2 rows to estimate a covariance, got {len(a)}")
    if not np.isfinite(a).all():
        raise ValueError(f"{name} contains non-finite values")
    return a


def _psd_sqrt(s: np.ndarray) -> np.ndarray:
    """Symmetric square root of a symmetric PSD matrix (negative rounding eigenvalues clipped to 0)."""
    w, v = np.linalg.eigh(s)
    return (v * np.sqrt(np.clip(w, 0, None))) @ v.T


def frechet_distance(feats_a: Tensor | np.ndarray, feats_b: Tensor | np.ndarray) -> float:
    """||mu_a - mu_b||^2 + tr(S_a + S_b - 2 (S_a S_b)^(1/2)) for features feats_a [N, F], feats_b [M, F].

    Computed in float64. tr((S_a S_b)^(1/2)) is taken as the sum of square roots of the eigenvalues of the symmetric
    PSD matrix S_a^(1/2) S_b S_a^(1/2) (same eigenvalues as S_a S_b), which avoids the non-symmetric `sqrtm` of the
    reference FID code, its complex round-off and its failures on singular covariances (N < F). Returns a float
    >= 0 (clipped at 0 against rounding). The estimate is biased upwards for small N: compare values at equal N.
    """
    a, b = _as_2d_float64(feats_a, "feats_a"), _as_2d_float64(feats_b, "feats_b")
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"feature widths differ: {a.shape[1]} vs {b.shape[1]}")
    mu_a, mu_b = a.mean(0), b.mean(0)
    s_a, s_b = np.atleast_2d(np.cov(a, rowvar=False)), np.atleast_2d(np.cov(b, rowvar=False))
    root_a = _psd_sqrt(s_a)
    middle = root_a @ s_b @ root_a
    eig = np.linalg.eigvalsh((middle + middle.T) / 2)
    tr_covmean = np.sqrt(np.clip(eig, 0, None)).sum()
    diff = mu_a - mu_b
    value = float(diff @ diff + np.trace(s_a) + np.trace(s_b) - 2 * tr_covmean)
    return max(value, 0.0)


@torch.no_grad()
def extract_features(images: Tensor, feature_net, batch_size: int = 256) -> Tensor:
    """images [N, 3, 48, 48] in [-1, 1] -> features [N, F] from `feature_net.features`, in batches."""
    device = next(feature_net.parameters()).device
    out = [feature_net.features(images[i:i + batch_size].to(device)).float().cpu()
           for i in range(0, len(images), batch_size)]
    return torch.cat(out)


def feature_fd(images_a: Tensor, images_b: Tensor, feature_net, batch_size: int = 256) -> float:
    """Frechet distance between images_a [N, 3, 48, 48] and images_b [M, 3, 48, 48] (both in [-1, 1]) in the
    penultimate feature space of `feature_net` (the zoo's `FeatureNet`)."""
    return frechet_distance(extract_features(images_a, feature_net, batch_size),
                            extract_features(images_b, feature_net, batch_size))


@torch.no_grad()
def token_nll(model, tokens: Tensor, classes: Tensor, batch_size: int = 128) -> Tensor:
    """Mean NLL per token (nats) of each row under a class-conditional `GPT`, without CFG.

    tokens [B, T] image-token ids (or [B, h, w], flattened in raster order), classes [B] class ids.
    Returns float [B]. Uniform guessing gives log(V) (6.24 nats for V = 512).
    """
    tokens = tokens.reshape(tokens.shape[0], -1).long()
    classes = torch.as_tensor(classes, dtype=torch.long).reshape(-1)
    if classes.shape[0] != tokens.shape[0]:
        raise ValueError(f"classes [{classes.shape[0]}] must match tokens rows [{tokens.shape[0]}]")
    device = next(model.parameters()).device
    out = []
    for i in range(0, len(tokens), batch_size):
        t, c = tokens[i:i + batch_size].to(device), classes[i:i + batch_size].to(device)
        logits = model.forward_train(t, c).float()                       # [b, T, V]
        nll = F.cross_entropy(logits.transpose(1, 2), t, reduction="none")   # [b, T]
        out.append(nll.mean(1).cpu())
    return torch.cat(out) if out else torch.empty(0)


def token_histogram_tvd(tokens_a: Tensor, tokens_b: Tensor, vocab: int) -> float:
    """Total variation distance in [0, 1] between the unigram histograms of tokens_a [...] and tokens_b [...]
    (any shapes, ids in [0, vocab))."""
    ha = torch.bincount(tokens_a.reshape(-1).long(), minlength=vocab).double()
    hb = torch.bincount(tokens_b.reshape(-1).long(), minlength=vocab).double()
    if len(ha) > vocab or len(hb) > vocab:
        raise ValueError(f"token ids must lie in [0, {vocab})")
    if ha.sum() == 0 or hb.sum() == 0:
        raise ValueError("both token sets must be non-empty")
    return float(0.5 * (ha / ha.sum() - hb / hb.sum()).abs().sum())


def mal_standard_error(forwards: Tensor, committed: int) -> float | None:
    """The standard error of a batch's mean accepted length (MAL) from its images' spread: forwards [n] target
    forwards of each image (`SpecStats.forwards_per_row`), each image committing `committed` tokens. The batch's MAL
    is the ratio n c / sum f_b, with delta-method standard error sqrt(sum_b (c - MAL f_b)^2 / (n (n - 1))) / mean(f).
    None for fewer than 2 images (one image has no spread)."""
    n = forwards.numel()
    if n < 2:
        return None
    f = forwards.double()
    mal = n * committed / float(f.sum())
    return float(((committed - mal * f).pow(2).sum() / (n * (n - 1))).sqrt() / f.mean())
