"""The embedded continuous-token zoo: a small KL autoencoder on the zoo's photo crops (48 x 48 pixels -> 12 x 12
latents of 16 channels; the LDM-style KL autoencoder, Rombach et al. arXiv 2112.10752, as MAR uses one), and a
MAR-style target and drafter over its latents (Li et al., arXiv 2406.11838), all trained in this repository
(experiments/train_continuous_zoo.py) and shipped as safetensors with JSON cards like the discrete zoo.

    bundle = specdec.zoo.continuous.load()
    bundle.target, bundle.drafter                   # MARAdapter over the zoo MAR models, autoencoder attached
    g = torch.Generator().manual_seed(0)
    tokens = bundle.target.sample(torch.tensor([1, 1]), num_iter=bundle.num_iter, cfg=bundle.cfg_scale,
                                  generator=g)     # [B, 144, 16]
    images = bundle.target.decode(tokens)           # [B, 3, 48, 48] in [-1, 1]
    bundle.features, bundle.heldout_images(n)       # the image zoo's FeatureNet and real held-out crops, for FD

The autoencoder lives in `specdec.zoo.autoencoder` (re-exported here; a leaf module, so that the zoo's loader can
build it without an import cycle). Tokens are latents times `KLConfig.scale`, fitted from data at the end of the
autoencoder's training so that they have unit standard deviation (MAR's KL-16 uses 0.2325). Both heads were trained
with the eps loss only and sample with the schedule's FIXED variance (`bundle.variance`, the cards' head_variance),
so the target and the drafter share sigma_t at every head step: the condition for an exact speculative rule over
Gaussian transitions. Both also clamp the head's predicted x0 to [-c, c] (`bundle.clip_x0`, ADM's clip_denoised
with the tokens' range instead of [-1, 1]): unclipped, the cosine schedule's top step (abar_T ~ 2.4e-9) multiplies
the small heads' eps errors by ~630 in the first mean and the chains diverge (sampled tokens of std ~ 470 instead
of 1). c = 6 lies just above the largest |token| of held-out crops (~5.8), so it binds only where x0_hat is off the
data. The clamp keeps every transition Gaussian with the same variance, so the exact rule stays exact.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from specdec.zoo.autoencoder import KLAutoencoder, KLConfig, ae_loss, fit_scale, kl_divergence
from specdec.zoo.data import CLASS_NAMES

__all__ = ["ContinuousBundle", "KLAutoencoder", "KLConfig", "MODEL_NAMES", "ae_loss", "available", "fit_scale",
           "kl_divergence", "load", "step_macs"]

MODEL_NAMES = ("continuous_ae", "continuous_target", "continuous_drafter")
# sampling defaults of the zoo (recorded on the target's card at training time; these are the fallbacks)
DEFAULT_NUM_ITER = 16
DEFAULT_CFG = 3.0
DEFAULT_VARIANCE = "large"
DEFAULT_CLIP_X0 = 6.0      # the head's x0 clamp (tokens have unit std; held-out |token| <= ~5.8)


def step_macs(cfg, visible: int, predicted: int, guided: bool = False) -> dict[str, int]:
    """Multiply-accumulates of one MAR AR step of `cfg` (a MARConfig) per image, as `specdec.models.mar` computes
    it: the backbone pass with `visible` known tokens (the encoder sees buffer + visible slots, the decoder all
    buffer + L slots) and the head's whole chain (num_sampling_steps steps) for `predicted` tokens; guided doubles
    both (CFG rows). -> {"backbone", "head"}. Linear layers and attention products; norms and activations left out."""
    e, c, w, d = cfg.encoder_embed_dim, cfg.decoder_embed_dim, cfg.diffloss_w, cfg.token_dim
    n_enc, n_dec = cfg.buffer_size + visible, cfg.buffer_size + cfg.seq_len
    block = lambda dim, n: n * (4 + 2 * cfg.mlp_ratio) * dim * dim + 2 * n * n * dim
    backbone = (cfg.seq_len * d * e + cfg.encoder_depth * block(e, n_enc) + n_enc * e * c
                + cfg.decoder_depth * block(c, n_dec))
    per_step = d * w + cfg.diffloss_d * 5 * w * w + 2 * w * w + 2 * d * w        # input, res blocks, final layer
    head = predicted * (c * w + cfg.num_sampling_steps * per_step)              # + the condition embedding, once
    rows = 2 if guided else 1
    return {"backbone": int(rows * backbone), "head": int(rows * head)}


@dataclass(frozen=True)
class ContinuousBundle:
    """The embedded continuous-token models. target / drafter: MARAdapter (decode gives pixels through the
    autoencoder); features: the image zoo's FeatureNet (Frechet distance); num_iter / cfg_scale / variance /
    clip_x0: the zoo's sampling defaults (from the target's card)."""

    target: Any
    drafter: Any
    autoencoder: KLAutoencoder
    features: nn.Module
    classes: tuple[str, ...]
    cards: dict[str, dict[str, Any]]
    num_iter: int = DEFAULT_NUM_ITER
    cfg_scale: float = DEFAULT_CFG
    variance: str = DEFAULT_VARIANCE
    clip_x0: float | None = DEFAULT_CLIP_X0

    def class_id(self, name_or_id: str | int) -> int:
        """'coffee' or 1 -> 1; anything else raises ValueError listing the valid names."""
        from specdec.zoo import ZooBundle
        return ZooBundle.class_id(self, name_or_id)    # uses self.classes only

    def heldout_images(self, n: int, seed: int = 0, classes: Tensor | None = None) -> Tensor:
        """n real held-out crops [n, 3, 48, 48] in [-1, 1] (see `specdec.zoo.heldout_images`)."""
        from specdec.zoo import heldout_images
        return heldout_images(n, seed, classes)[0]


def available(directory: str | Path | None = None) -> bool:
    """Whether the weights folder ships the continuous models."""
    from specdec.zoo import weights_dir
    d = Path(directory) if directory is not None else weights_dir()
    return all((d / f"{name}.json").is_file() for name in MODEL_NAMES)


def load(device: str | torch.device = "cpu", directory: str | Path | None = None,
         dtype: str | torch.dtype | None = None) -> ContinuousBundle:
    """Load and verify (sha256) the continuous zoo. `directory` overrides the package's weights folder; the feature
    net comes from there when it holds one, else from the package (it belongs to the image zoo). dtype: what the
    target and drafter MAR compute their networks in (`specdec.precision`, default float32); their diffusion
    chains, densities and the autoencoder stay float32 (the head returns float32 whatever its weights' dtype)."""
    from specdec.adapters.mar import MARAdapter
    from specdec.zoo import ZooError, load_model
    directory = Path(directory) if directory is not None else None
    models, cards = {}, {}
    for name in MODEL_NAMES:
        models[name], cards[name] = load_model(name, directory, device, dtype if name != "continuous_ae" else None)
    own = directory is not None and (directory / "features.json").is_file()
    features, cards["features"] = load_model("features", directory if own else None, device)
    ae, sampling = models["continuous_ae"], cards["continuous_target"].get("sampling", {})
    variance = sampling.get("variance", DEFAULT_VARIANCE)
    clip_x0 = sampling.get("clip_x0", DEFAULT_CLIP_X0)
    adapters = {}
    for name in MODEL_NAMES[1:]:
        trained_on = cards[name].get("autoencoder_sha256")
        if trained_on != cards["continuous_ae"]["sha256"]:
            raise ZooError(f"{name} was trained on another autoencoder (sha256 {str(trained_on)[:12]}... != "
                           f"{cards['continuous_ae']['sha256'][:12]}...): the zoo files come from different "
                           f"trainings; retrain with experiments/train_continuous_zoo.py --force")
        if cards[name].get("head_variance", variance) != variance:
            raise ZooError(f"{name} was trained for head variance {cards[name].get('head_variance')!r}, the zoo "
                           f"samples with {variance!r}: retrain the drafter")
        adapters[name] = MARAdapter(models[name], ae, variance=variance, clip_x0=clip_x0)
    classes = tuple(cards["continuous_target"].get("data", {}).get("classes", CLASS_NAMES))
    return ContinuousBundle(target=adapters["continuous_target"], drafter=adapters["continuous_drafter"],
                            autoencoder=ae, features=features, classes=classes, cards=cards,
                            num_iter=int(sampling.get("num_iter", DEFAULT_NUM_ITER)),
                            cfg_scale=float(sampling.get("cfg", DEFAULT_CFG)), variance=variance,
                            clip_x0=clip_x0)
