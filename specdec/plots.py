"""Figures shared by the demo, the benchmark report and experiments (matplotlib, headless)."""
from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def to_uint8(images: Tensor) -> Tensor:
    """[B, 3, H, W] in [-1, 1] -> uint8 [B, H, W, 3]."""
    return ((images.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu()


def image_strip(images: Tensor, path: Path) -> Path:
    """images [N, 3, H, W] in [-1, 1] side by side in one PNG of [H, N * W] pixels (no axes, no labels)."""
    plt = _plt()
    strip = torch.cat(list(to_uint8(images)), dim=1).numpy()       # [N, H, W, 3] -> [H, N * W, 3]
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    plt.imsave(path, strip)
    return Path(path)


def image_grid(rows: list[Tensor], labels: list[str], path: Path, scale: float = 1.0) -> Path:
    """One row of images per method (rows[i]: [B, 3, H, W] in [-1, 1]), labelled on the left."""
    plt = _plt()
    n_rows, n_cols = len(rows), max(r.shape[0] for r in rows)
    fig, axes = plt.subplots(n_rows, n_cols, figsize=(scale * n_cols * 1.1 + 2.2, scale * n_rows * 1.1),
                             squeeze=False)
    for i, (imgs, label) in enumerate(zip(rows, labels)):
        pix = to_uint8(imgs)
        for j in range(n_cols):
            ax = axes[i][j]
            ax.axis("off")
            if j < pix.shape[0]:
                ax.imshow(pix[j].numpy(), interpolation="nearest")
        axes[i][0].text(-0.1, 0.5, label, transform=axes[i][0].transAxes, ha="right", va="center", fontsize=7)
    fig.subplots_adjust(left=0.25, wspace=0.05, hspace=0.05)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)


def acceptance_heatmaps(maps: list[Tensor], labels: list[str], path: Path) -> Path:
    """Per-position share of tokens committed from drafts, one panel per method (maps[i]: [H, W] in [0, 1])."""
    plt = _plt()
    n = max(1, len(maps))
    fig, axes = plt.subplots(1, n, figsize=(2.6 * n, 2.8), squeeze=False)
    for ax, m, label in zip(axes[0], maps, labels):
        im = ax.imshow(m.numpy(), vmin=0, vmax=1, cmap="viridis")
        ax.set_title(label, fontsize=7)
        ax.axis("off")
    if maps:
        fig.colorbar(im, ax=axes[0].tolist(), shrink=0.8, label="accepted from draft")
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)
