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


def image_grid(rows: list[Tensor], labels: list[str], path: Path, scale: float = 1.0,
               columns: list[str] | None = None) -> Path:
    """One row of images per method (rows[i]: [B, 3, H, W] in [-1, 1]), method names on the left, column names
    (e.g. the class of each column) on top; margins sized to the labels."""
    plt = _plt()
    n_rows, n_cols = len(rows), max(r.shape[0] for r in rows)
    label_w = 0.062 * max((len(s) for s in labels), default=0) + 0.15  # inches the longest name takes at 7 pt
    cell = 1.0 * scale
    top = 0.3 if columns else 0.05
    fig, axes = plt.subplots(n_rows, n_cols, figsize=(label_w + n_cols * cell + 0.1, n_rows * cell + top + 0.05),
                             squeeze=False)
    for i, (imgs, label) in enumerate(zip(rows, labels)):
        pix = to_uint8(imgs)
        for j in range(n_cols):
            ax = axes[i][j]
            ax.axis("off")
            if j < pix.shape[0]:
                ax.imshow(pix[j].numpy(), interpolation="nearest")
            if i == 0 and columns and j < len(columns):
                ax.set_title(columns[j], fontsize=6, pad=2)
        axes[i][0].text(-0.06, 0.5, label, transform=axes[i][0].transAxes, ha="right", va="center", fontsize=7)
    width, height = fig.get_size_inches()
    fig.subplots_adjust(left=label_w / width, right=1 - 0.05 / width, bottom=0.05 / height,
                        top=1 - top / height, wspace=0.04, hspace=0.04)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)


def acceptance_heatmaps(maps: list[Tensor], labels: list[str], path: Path) -> Path:
    """Per-position share of tokens committed from drafts, one panel per method (maps[i]: [H, W] in [0, 1]).
    Titles are wrapped so that neighbours never collide; a caption says what a cell is."""
    import textwrap

    plt = _plt()
    n = max(1, len(maps))
    fig, axes = plt.subplots(1, n, figsize=(2.2 * n + 0.9, 3.0), squeeze=False)
    for ax, m, label in zip(axes[0], maps, labels):
        im = ax.imshow(m.numpy(), vmin=0, vmax=1, cmap="viridis")
        ax.set_title("\n".join(textwrap.wrap(label, 22)), fontsize=7)
        ax.axis("off")
    if maps:
        fig.colorbar(im, ax=axes[0].tolist(), shrink=0.75, label="share accepted from a draft")
    caption = ("cell = one token position of the image grid (raster order); colour = share of the generated images "
               "whose token there was a draft the rule accepted")
    fig.text(0.01, 0.02, "\n".join(textwrap.wrap(caption, int(30 * n + 25))), fontsize=6)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)
