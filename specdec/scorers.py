"""Block scorers for block-level routing (SDVG, Hu & Zhang, arXiv 2604.17397): decoded frames -> one score per
frame, higher is better (`specdec.protocols.BlockScorer`).

SDVG scores each frame with ImageReward (Xu et al., arXiv 2304.05977) against the prompt. Its weights (and CLIP's)
are a download, so here they are plug-ins: `load_scorer("module:callable")` or `load_scorer("file.py:callable")`
takes any callable (frames [B, F_b, 3, H, W] in [-1, 1], cond) -> [B, F_b], or a class built with the given
keyword arguments (e.g. a local weights path). The built-in `ClassScorer` needs no download: the probability of the
clip's class under the zoo's feature net (a classifier of 48 x 48 crops), a score in [0, 1].

Every scorer is checked where it is called: a result that is not a finite [B, F_b] tensor is an error naming it.
Here F_b is the number of frames the decoder returned for the block (a temporally upsampling video VAE returns
more pixel frames than the block has latent frames).
"""
from __future__ import annotations

from typing import Any, Callable

import torch
from torch import Tensor, nn

from specdec.adapters.base import check_class_ids
from specdec.registry import load_object

BUILTIN = ("class",)


def scorer_name(scorer: Any) -> str:
    """How errors and reports name a scorer: its `name` attribute, else its type or function name."""
    name = getattr(scorer, "name", None)
    return name if isinstance(name, str) else getattr(scorer, "__name__", type(scorer).__name__)


def check_scores(scores: Any, batch: int, frames: int, scorer: Any) -> Tensor:
    """A scorer's output must be a floating tensor [batch, frames] of finite values (one host sync); returns it,
    else ValueError naming the scorer."""
    who = f"scorer {scorer_name(scorer)!r}"
    if not isinstance(scores, Tensor) or not scores.dtype.is_floating_point:
        raise ValueError(f"{who} must return a floating tensor [B, F_b] = [{batch}, {frames}], got "
                         f"{type(scores).__name__} {getattr(scores, 'dtype', '')}")
    if tuple(scores.shape) != (batch, frames):
        raise ValueError(f"{who} returned shape {tuple(scores.shape)}; it must score every frame: "
                         f"[B, F_b] = [{batch}, {frames}]")
    if not bool(torch.isfinite(scores).all()):
        raise ValueError(f"{who} returned non-finite scores (NaN or inf) {scores.tolist()}; fix the scorer or the "
                         f"frames it was given")
    return scores


class ClassScorer(nn.Module):
    """Per-frame probability of the clip's class: softmax(features_net(frame))[cond[b]].

    features_net: a classifier images [N, 3, s, s] in [-1, 1] -> logits [N, C] (the zoo's `FeatureNet`);
    image_size: s, the size it takes (frames of another size are resized bilinearly, with antialiasing).
    cond: class ids LongTensor [B] in [0, C).
    """

    name = "class"

    def __init__(self, features_net: nn.Module, image_size: int = 48):
        super().__init__()
        if not callable(features_net):
            raise TypeError(f"features_net must be a module mapping images to class logits, got "
                            f"{type(features_net).__name__}")
        if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 1:
            raise ValueError(f"image_size must be a positive integer, got {image_size!r}")
        self.net = features_net
        self.image_size = image_size

    @torch.no_grad()
    def forward(self, frames: Tensor, cond: Tensor) -> Tensor:
        """frames [B, F_b, 3, H, W] in [-1, 1], cond [B] -> probabilities [B, F_b] in [0, 1]."""
        if not isinstance(frames, Tensor) or frames.dim() != 5 or frames.shape[2] != 3:
            raise ValueError(f"frames must be [B, F_b, 3, H, W], got "
                             f"{tuple(frames.shape) if isinstance(frames, Tensor) else type(frames).__name__}")
        B, Fb = frames.shape[:2]
        x = frames.reshape(B * Fb, *frames.shape[2:]).float()
        if tuple(x.shape[-2:]) != (self.image_size, self.image_size):
            x = nn.functional.interpolate(x, size=(self.image_size, self.image_size), mode="bilinear",
                                          align_corners=False, antialias=True)
        logits = self.net(x)
        cond = check_class_ids(cond, logits.shape[-1]).to(logits.device)
        probs = logits.float().softmax(-1).reshape(B, Fb, -1)
        return probs.gather(-1, cond[:, None, None].expand(B, Fb, 1))[..., 0]


class CheckedScorer:
    """Wraps a scorer so that every call checks its output (`check_scores`)."""

    def __init__(self, fn: Callable[[Tensor, Any], Tensor], name: str):
        self.fn = fn
        self.name = name

    def __call__(self, frames: Tensor, cond: Any) -> Tensor:
        return check_scores(self.fn(frames, cond), frames.shape[0], frames.shape[1], self)


def load_scorer(spec: str, features_net: nn.Module | None = None, **params) -> CheckedScorer:
    """"class" (ClassScorer over `features_net`, e.g. the zoo bundle's `.features`), or the user's own scorer as
    `module:attr` / `path/to/file.py:attr`: a callable (frames, cond) -> [B, F_b], or a class (or factory, when
    params are given) called with **params first. ValueError saying what is wrong."""
    if not isinstance(spec, str) or not spec:
        raise ValueError(f"a scorer must be named by a non-empty string, got {spec!r}")
    if spec == "class":
        if features_net is None:
            raise ValueError("the 'class' scorer needs features_net (a classifier such as the zoo's FeatureNet: "
                             "specdec.zoo.load().features)")
        return CheckedScorer(ClassScorer(features_net, **params), spec)
    if ":" not in spec:
        raise ValueError(f"unknown scorer {spec!r}; built-in scorers: {', '.join(BUILTIN)}, or your own callable as "
                         f"'module:callable' or 'path/to/file.py:callable'")
    obj = load_object("scorer", spec)
    if isinstance(obj, type) or params:
        obj = obj(**params)
    if not callable(obj):
        raise ValueError(f"scorer {spec!r}: {type(obj).__name__} is not callable as (frames, cond) -> [B, F_b]")
    return CheckedScorer(obj, spec)
