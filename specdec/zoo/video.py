"""The embedded video default: short class-conditional clips of synthetic camera motion over the zoo's real photos.

A clip is `FRAMES` frames of `FRAME` x `FRAME` pixels. Its content is real (one of the image zoo's photos, at one of
its pyramid levels, from the train or the held-out strip) and its motion synthetic: a pan at a constant velocity
(whole pixels per frame, in x and y) or a zoom (the crop grows or shrinks linearly about a fixed centre, resampled
to `FRAME` pixels). Frames are tokenised by the image zoo's VQ tokenizer (convolutional, so a 24-pixel frame gives a
6 x 6 grid), and a clip is the raster over (frame, row, column): T = FRAMES * 6 * 6 tokens.

    bundle = specdec.zoo.video.load()
    bundle.target, bundle.drafter_model        # GPTAdapter with grid (F, h, w); decode() gives a filmstrip
    bundle.decode_frames(tokens)               # [B, F, 3, FRAME, FRAME]

Clips are deterministic: clip i of (split, seed) is always the same, so training resumes exactly.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from specdec.zoo.data import CLASS_NAMES, _region, photo_levels

FRAMES = 8
FRAME = 24
PAN_SPEEDS = (-3, -2, -1, 0, 1, 2, 3)     # pixels per frame, per axis
ZOOM_RANGE = (24, 40)                     # crop side in pixels at the start / end of a zoom (either direction)
ZOOM_SHARE = 0.3                          # share of clips that zoom (the rest pan)
MODEL_NAMES = ("video_target", "video_drafter")


def _clip(img: Tensor, split: str, draws: Tensor) -> Tensor:
    """One clip from one photo level. img [3, H, W]; draws [6] uniforms -> frames [FRAMES, 3, FRAME, FRAME]."""
    lo, hi = _region(img.shape[2], split)
    height = img.shape[1]
    if draws[0] < ZOOM_SHARE:
        small, large = ZOOM_RANGE
        sizes = torch.linspace(small, large, FRAMES)
        if draws[1] < 0.5:
            sizes = sizes.flip(0)
        cx = lo + large / 2 + float(draws[2]) * (hi - lo - large)
        cy = large / 2 + float(draws[3]) * (height - large)
        frames = []
        for s in sizes.tolist():
            x0, y0 = int(round(cx - s / 2)), int(round(cy - s / 2))
            side = int(round(s))
            crop = img[:, y0:y0 + side, x0:x0 + side]
            frames.append(F.interpolate(crop[None], size=(FRAME, FRAME), mode="bilinear", antialias=True,
                                        align_corners=False)[0])
        return torch.stack(frames).clamp(-1, 1)
    n = len(PAN_SPEEDS)
    vx = PAN_SPEEDS[min(int(draws[1] * n), n - 1)]
    vy = PAN_SPEEDS[min(int(draws[4] * n), n - 1)]
    span_x, span_y = abs(vx) * (FRAMES - 1), abs(vy) * (FRAMES - 1)
    x_start = lo + int(draws[2] * (hi - lo - FRAME - span_x + 1)) + (span_x if vx < 0 else 0)
    y_start = int(draws[3] * (height - FRAME - span_y + 1)) + (span_y if vy < 0 else 0)
    frames = [img[:, y_start + vy * f: y_start + vy * f + FRAME, x_start + vx * f: x_start + vx * f + FRAME]
              for f in range(FRAMES)]
    return torch.stack(frames)


def sample_clips(split: str, classes: Tensor, generator: torch.Generator) -> Tensor:
    """Random clips of the given classes: classes LongTensor [B] -> frames [B, FRAMES, 3, FRAME, FRAME] in [-1, 1].
    Level, motion, position and a horizontal flip come from `generator` only."""
    out = torch.empty(len(classes), FRAMES, 3, FRAME, FRAME)
    draws = torch.rand(len(classes), 7, generator=generator)
    for i, c in enumerate(classes.tolist()):
        levels = photo_levels(CLASS_NAMES[c])
        img = levels[min(int(draws[i, 5] * len(levels)), len(levels) - 1)]
        clip = _clip(img, split, draws[i, :5])
        out[i] = clip.flip(-1) if draws[i, 6] < 0.5 else clip
    return out


def clip_batch(split: str, batch_size: int, seed: int, index: int = 0) -> tuple[Tensor, Tensor]:
    """Batch `index` of a seeded stream: (frames [B, FRAMES, 3, FRAME, FRAME], class ids [B])."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    g = torch.Generator().manual_seed(int(seed) * 1_000_003 + int(index) + 77)
    classes = torch.randint(len(CLASS_NAMES), (batch_size,), generator=g)
    return sample_clips(split, classes, g), classes


def encode_clips(tokenizer, frames: Tensor) -> Tensor:
    """frames [B, F, 3, FRAME, FRAME] -> clip tokens LongTensor [B, F * h * w] (raster over frame, row, column)."""
    B, Fr = frames.shape[:2]
    return tokenizer.encode_grid(frames.flatten(0, 1)).view(B, -1)


def decode_clips(tokenizer, tokens: Tensor, frames: int = FRAMES) -> Tensor:
    """clip tokens [B, F * h * w] -> frames [B, F, 3, 4h, 4w] in [-1, 1]."""
    B = tokens.shape[0]
    side = int(round((tokens.shape[1] // frames) ** 0.5))
    if frames * side * side != tokens.shape[1]:
        raise ValueError(f"clip tokens [B, {tokens.shape[1]}] are not {frames} square frames")
    x = tokenizer.decode_grid(tokens.reshape(B * frames, side, side))
    return x.view(B, frames, *x.shape[1:])


def filmstrip(frames: Tensor) -> Tensor:
    """frames [B, F, 3, H, W] -> one image per clip [B, 3, H, F * W] (frames side by side)."""
    B, Fr, C, H, W = frames.shape
    return frames.permute(0, 2, 3, 1, 4).reshape(B, C, H, Fr * W)


def strip_to_frames(strips: Tensor, frames: int = FRAMES) -> Tensor:
    """filmstrips [B, 3, H, F * W] -> frames [B, F, 3, H, W] (the inverse of `filmstrip`)."""
    B, C, H, FW = strips.shape
    if FW % frames:
        raise ValueError(f"a filmstrip of width {FW} does not hold {frames} frames")
    return strips.reshape(B, C, H, frames, FW // frames).permute(0, 3, 1, 2, 4)


class VideoFeatures(nn.Module):
    """Clip features for the Frechet distance and the router's scorer, from the image zoo's feature net: each frame
    is upsampled to the net's 48-pixel input. features: filmstrips [N, 3, FRAME, F * FRAME] -> the mean over frames
    of the per-frame features [N, D]; forward: the same strips -> per-frame class logits [N, F, C]."""

    def __init__(self, net: nn.Module, frames: int = FRAMES, size: int = 48):
        super().__init__()
        self.net, self.frames, self.size = net, frames, size

    def _frames(self, strips: Tensor) -> Tensor:
        x = strip_to_frames(strips, self.frames).flatten(0, 1)                    # [N*F, 3, H, W]
        return F.interpolate(x, size=(self.size, self.size), mode="bilinear", align_corners=False)

    def features(self, strips: Tensor) -> Tensor:
        f = self.net.features(self._frames(strips))
        return f.view(strips.shape[0], self.frames, -1).mean(1)

    def forward(self, strips: Tensor) -> Tensor:
        return self.net(self._frames(strips)).view(strips.shape[0], self.frames, -1)


@dataclass(frozen=True)
class VideoDataDescription:
    """What a video zoo card records about its data."""
    classes: tuple[str, ...] = tuple(CLASS_NAMES)
    frames: int = FRAMES
    frame: int = FRAME
    pan_speeds: tuple[int, ...] = PAN_SPEEDS
    zoom_range: tuple[int, int] = ZOOM_RANGE
    zoom_share: float = ZOOM_SHARE
    motion: str = "pan at a constant integer velocity per axis, or a linear zoom in/out about a fixed centre"
    content: str = "the image zoo's photos (train strip for training, held-out strip for evaluation), random level"
    augment: str = "horizontal flip p=0.5"


@dataclass(frozen=True)
class VideoBundle:
    """The embedded video models. target / drafter_model: GPTAdapter over grid (FRAMES, h, w)."""
    target: Any
    drafter_model: Any
    tokenizer: nn.Module
    features: nn.Module             # VideoFeatures over the image zoo's feature net (filmstrips in)
    classes: tuple[str, ...]
    target_gpt: nn.Module
    drafter_gpt: nn.Module
    cards: dict
    frames: int = FRAMES

    def class_id(self, name: Any) -> int:
        if isinstance(name, str) and name in self.classes:
            return self.classes.index(name)
        if isinstance(name, int) and not isinstance(name, bool) and 0 <= name < len(self.classes):
            return name
        raise ValueError(f"unknown zoo class {name!r}; valid classes: "
                         + ", ".join(f"{i}={n}" for i, n in enumerate(self.classes)))

    def decode_frames(self, tokens: Tensor) -> Tensor:
        """clip tokens [B, T] -> frames [B, F, 3, FRAME, FRAME] in [-1, 1]."""
        return decode_clips(self.tokenizer, tokens, self.frames)

    def heldout_clips(self, n: int, seed: int = 0, classes: Tensor | None = None) -> Tensor:
        """n real held-out clips [n, F, 3, FRAME, FRAME]; classes [n] (default: cycling 0, 1, 2, ...)."""
        if classes is None:
            classes = torch.arange(n) % len(self.classes)
        g = torch.Generator().manual_seed(int(seed) + 991)
        return sample_clips("heldout", classes.cpu(), g)

    def heldout_images(self, n: int, seed: int = 0, classes: Tensor | None = None) -> Tensor:
        """Filmstrips of n held-out clips [n, 3, FRAME, F * FRAME] (what `target.decode` returns for samples)."""
        return filmstrip(self.heldout_clips(n, seed, classes))


def available(directory: Path | None = None) -> bool:
    """Whether the weights folder ships the video models."""
    from specdec.zoo import weights_dir
    d = Path(directory) if directory is not None else weights_dir()
    return all((d / f"{name}.json").is_file() for name in MODEL_NAMES)


def load(device: str | torch.device = "cpu", directory: str | Path | None = None,
         dtype: str | torch.dtype | None = None) -> VideoBundle:
    """Load and verify the video zoo (and the image zoo's tokenizer and feature net it builds on); dtype: what the
    target and drafter compute in (`specdec.precision`, default float32)."""
    from specdec.adapters.gpt import GPTAdapter
    from specdec.zoo import ZooError, load_model
    directory = Path(directory) if directory is not None else None
    models, cards = {}, {}
    for name in ("vq", "features") + MODEL_NAMES:
        models[name], cards[name] = load_model(name, directory, device, dtype if name in MODEL_NAMES else None)
    tok = models["vq"]
    side = FRAME // 4
    grid = (FRAMES, side, side)
    for name in MODEL_NAMES:
        if models[name].cfg.vocab_size != tok.config.codebook_size:
            raise ZooError(f"{name} vocabulary {models[name].cfg.vocab_size} != tokenizer codebook "
                           f"{tok.config.codebook_size}: the zoo files come from different trainings; retrain")

    def decode(tokens: Tensor) -> Tensor:
        return filmstrip(decode_clips(tok, tokens, FRAMES))

    adapters = {name: GPTAdapter(models[name], grid=grid, codebook=tok.codebook.detach(), decode=decode)
                for name in MODEL_NAMES}
    classes = tuple(cards["video_target"].get("data", {}).get("classes", CLASS_NAMES))
    return VideoBundle(target=adapters["video_target"], drafter_model=adapters["video_drafter"], tokenizer=tok,
                       features=VideoFeatures(models["features"]), classes=classes, target_gpt=models["video_target"],
                       drafter_gpt=models["video_drafter"], cards=cards)
