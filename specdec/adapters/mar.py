"""Adapter for MAR (Li et al., "Autoregressive Image Generation without Vector Quantization", arXiv 2406.11838):
continuous tokens, a masked AR backbone and a diffusion head, exposed as the hooks speculative decoding needs.

Shapes: B images, L = seq_len tokens, D = token dim (16), n predicted positions, S = head steps, M states per
position, C = backbone width. R = model rows: B, or 2B with CFG ([B conditional rows; B `fake_latent` rows], the
official layout). Step s of a head chain goes from respaced time t = S-1-s to t-1; a token is the chain's last mean.

    state = mar.prepare(cond, cfg_scale, generator, order="random" | "raster" | order [B, L])
    z = mar.condition(state, positions, visible=None)          # one backbone pass (CFG rows included) -> [R, n, C]
    out = mar.head_chain(z, x_T, noises, temperature, cfg_k)   # tokens [B, n, D], means / logvars / states [B,n,S,D]
    mean, logvar = mar.head_transition(z, x_t, t, cfg_k)       # x_t [B, n, M, D] at steps t: one batched call
    mar.write(state, positions, tokens)                        # token write-back; they become visible
    images = mar.decode(state.tokens)                          # [B, 3, H, W] in [-1, 1] (a VAE attached)

`sample` is the target-only baseline through these hooks with the official `sample_tokens` semantics (order, mask
schedule, CFG schedule and their quirks: `specdec.models.mar.sampling`); given the same weights, order and noises
it returns the official loop's tokens up to float32 rounding (compared against the public code on CPU). A drafter
and a target that both call `condition` / `head_*` with the same cfg_k get identical CFG doubling and guidance.
`variance="small"` / "large" replaces the learned variance by the schedule's fixed one (two heads then share each
step's covariance). `clip_x0=c` clamps the head's predicted x0 to [-c, c] in every chain and transition (None, the
default, is the official unclipped sampler; see `specdec.models.mar.diffloss`).
`timing` counts backbone and head seconds (CUDA-synchronised when time_sync).
"""
from __future__ import annotations

import math
import time
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import Tensor

from specdec.adapters.base import check_class_ids
from specdec.models.mar import (MAR, KLVAE, VARIANCES, MARConfig, VAEConfig, cfg_schedule, make_order,
                                mask_schedule, mar_from_file, ranks, vae_from_file)


@dataclass
class MARState:
    """tokens [B, L, D] (zeros where unknown), mask BoolTensor [B, L] (True = still unknown), order LongTensor
    [B, L] (order[b, i] = the position generated i-th), rank [B, L] (its inverse), class_rows [R, E]."""

    tokens: Tensor
    mask: Tensor
    order: Tensor
    rank: Tensor
    class_rows: Tensor
    cfg_scale: float

    @property
    def batch(self) -> int:
        return self.tokens.shape[0]

    @property
    def cfg(self) -> bool:
        return self.class_rows.shape[0] == 2 * self.batch

    def double(self, x: Tensor) -> Tensor:
        """A per-image input [B, ...] -> the model rows [R, ...] (the unconditional twins get the same values)."""
        return torch.cat([x, x]) if self.cfg else x


@dataclass(frozen=True)
class HeadChain:
    """A head chain's result: tokens [B, n, D] (= means[:, :, -1]); means, logvars, states [B, n, S, D] (states[:, :,
    s] is x before step s, states[:, :, 0] = x_T); None when not recorded."""

    tokens: Tensor
    means: Tensor | None = None
    logvars: Tensor | None = None
    states: Tensor | None = None


@dataclass(frozen=True)
class MARNoise:
    """All randomness of a generation, per position: x_T [B, L, D], steps [B, L, S, D] (steps[..., S-1, :] unused)."""

    x_T: Tensor
    steps: Tensor

    def at(self, positions: Tensor) -> tuple[Tensor, Tensor]:
        """positions [B, n] -> (x_T [B, n, D], steps [B, n, S, D])."""
        d, s = self.x_T.shape[-1], self.steps.shape[2]
        return (self.x_T.gather(1, positions[..., None].expand(-1, -1, d)),
                self.steps.gather(1, positions[..., None, None].expand(-1, -1, s, d)))


@dataclass
class MARTimer:
    """Seconds and calls spent in backbone passes and head calls since the last reset()."""

    backbone_s: float = 0.0
    head_s: float = 0.0
    backbone_calls: int = 0
    head_calls: int = 0
    sync: bool = field(default=True, repr=False)

    def reset(self) -> None:
        self.backbone_s = self.head_s = 0.0
        self.backbone_calls = self.head_calls = 0

    @contextmanager
    def __call__(self, part: str, device: torch.device):
        sync = self.sync and device.type == "cuda"
        if sync:
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        yield
        if sync:
            torch.cuda.synchronize(device)
        setattr(self, f"{part}_s", getattr(self, f"{part}_s") + time.perf_counter() - t0)
        setattr(self, f"{part}_calls", getattr(self, f"{part}_calls") + 1)


def _check(x: Tensor, shape: tuple, name: str, fix: str) -> None:
    if not isinstance(x, Tensor) or tuple(x.shape) != tuple(shape):
        got = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
        raise ValueError(f"{name} must have shape {tuple(shape)}, got {got}; {fix}")


class MARAdapter:
    """The hooks of one MAR model (and its VAE, optional). causal: override the model's cfg.causal (None: keep it).
    variance: the head's default variance, "learned" (official), "small" or "large" (fixed schedule values).
    clip_x0: None (official) or c > 0, the head's x0 clamp; an attribute, not a per-call option, so that head_chain
    and head_transition always run the same sampler."""

    supports_cfg = True

    def __init__(self, model: MAR, vae: KLVAE | None = None, causal: bool | None = None,
                 variance: str = "learned", time_sync: bool = True, clip_x0: float | None = None):
        if variance not in VARIANCES:
            raise ValueError(f"variance must be one of {VARIANCES}, got {variance!r}")
        if clip_x0 is not None and not (isinstance(clip_x0, (int, float)) and math.isfinite(clip_x0) and clip_x0 > 0):
            raise ValueError(f"clip_x0 must be None (no clipping) or a finite number > 0, got {clip_x0!r}")
        cfg: MARConfig = model.cfg
        if vae is not None and (vae.cfg.stride != cfg.vae_stride or vae.cfg.embed_dim != cfg.vae_embed_dim):
            raise ValueError(f"the VAE (stride {vae.cfg.stride}, {vae.cfg.embed_dim} channels) does not match MAR "
                             f"(vae_stride {cfg.vae_stride}, vae_embed_dim {cfg.vae_embed_dim}); use the VAE the "
                             f"model was trained with")
        self.model = model.eval()
        self.vae = None if vae is None else vae.eval()
        self.causal = cfg.causal if causal is None else bool(causal)
        self.variance = variance
        self.clip_x0 = None if clip_x0 is None else float(clip_x0)
        self.num_tokens, self.grid, self.token_dim = cfg.seq_len, cfg.grid, cfg.token_dim
        self.num_steps = cfg.num_sampling_steps
        self.can_decode = vae is not None
        self.timing = MARTimer(sync=time_sync)

    @property
    def device(self) -> torch.device:
        return self.model.mask_token.device

    # ---- state ------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def prepare(self, cond: Tensor, cfg_scale: float = 1.0, generator: torch.Generator | None = None,
                order: str | Tensor = "random") -> MARState:
        """cond: class ids [B]. CFG rows are doubled iff cfg_scale != 1 (as upstream). order: "random" (drawn from
        `generator`), "raster", or an explicit generation order [B, L]."""
        labels = check_class_ids(cond, self.model.cfg.class_num).to(self.device)
        if not math.isfinite(float(cfg_scale)):
            raise ValueError(f"cfg_scale must be a finite number, got {cfg_scale}")
        b, length = labels.shape[0], self.num_tokens
        order = make_order(order, b, length, generator, self.device)
        return MARState(tokens=torch.zeros(b, length, self.token_dim, device=self.device),     # float32 always
                        mask=torch.ones(b, length, dtype=torch.bool, device=self.device), order=order,
                        rank=ranks(order), class_rows=self.model.class_rows(labels, float(cfg_scale) != 1.0),
                        cfg_scale=float(cfg_scale))

    def _positions(self, state: MARState, positions: Tensor) -> Tensor:
        if not isinstance(positions, Tensor) or positions.dim() != 2 or positions.shape[0] != state.batch \
                or positions.dtype != torch.long:
            raise TypeError(f"positions must be a LongTensor [B={state.batch}, n], got "
                            f"{getattr(positions, 'dtype', type(positions).__name__)} "
                            f"{tuple(getattr(positions, 'shape', ()))}")
        if positions.numel() and (positions.min() < 0 or positions.max() >= self.num_tokens):
            raise ValueError(f"positions must lie in [0, {self.num_tokens})")
        return positions

    @torch.no_grad()
    def write(self, state: MARState, positions: Tensor, tokens: Tensor) -> None:
        """Token write-back: tokens [B, n, D] at positions [B, n]; they become known (visible by default)."""
        positions = self._positions(state, positions)
        _check(tokens, (*positions.shape, self.token_dim), "tokens",
               f"pass one {self.token_dim}-dim token per position")
        state.tokens.scatter_(1, positions[..., None].expand_as(tokens), tokens.to(state.tokens.dtype))
        state.mask.scatter_(1, positions, False)

    # ---- one AR step ------------------------------------------------------------------------------------------
    @torch.no_grad()
    def condition(self, state: MARState, positions: Tensor, visible: Tensor | None = None) -> Tensor:
        """The backbone pass of one AR step: the condition z [R, n, C] of the tokens at positions [B, n], given the
        tokens where visible [B, L] (default: ~state.mask, every known token). CFG rows as in `MARState.double`.
        Causal adapters attend along state.order (see `specdec.models.mar.backbone`)."""
        positions = self._positions(state, positions)
        visible = ~state.mask if visible is None else visible
        _check(visible, (state.batch, self.num_tokens), "visible", "pass a BoolTensor [B, L] (True = visible)")
        if visible.dtype != torch.bool:
            raise TypeError(f"visible must be a BoolTensor, got {visible.dtype}")
        rank = state.double(state.rank) if self.causal else None
        with self.timing("backbone", self.device):
            return self.model.condition(state.double(state.tokens), state.double(visible), state.class_rows,
                                        state.double(positions), rank)

    def _flat_cond(self, z: Tensor, b: int, n: int, repeat: int = 1) -> Tensor:
        """z [R, n, C] -> head conditions [rows, W]: per (b, i[, m]) conditional rows, then the unconditional ones."""
        if z.dim() != 3 or z.shape[0] not in (b, 2 * b) or z.shape[1] != n:
            raise ValueError(f"z must be [B, n, C] or [2B, n, C] (CFG) with B={b}, n={n}; got {tuple(z.shape)}")
        c = self.model.diffloss.embed(z)
        if repeat > 1:
            c = c.repeat_interleave(repeat, dim=1)
        halves = c.chunk(2) if z.shape[0] == 2 * b else (c,)
        return torch.cat([h.reshape(h.shape[0] * h.shape[1], c.shape[-1]) for h in halves])   # n may be 0

    def _cfg_rows(self, cfg_k: Tensor | float, z: Tensor, b: int, per_row: int) -> Tensor | float:
        """cfg_k (float, or [B] per image) -> float or [B * per_row]; guidance needs the unconditional rows."""
        if isinstance(cfg_k, Tensor):
            _check(cfg_k, (b,), "cfg_k", "pass a float or one scale per image")
            k = cfg_k.to(self.device, torch.float32).repeat_interleave(per_row)
            needs = bool((k != 1).any())
        else:
            k, needs = float(cfg_k), float(cfg_k) != 1.0
        if needs and z.shape[0] == b:
            raise ValueError(f"cfg_k={cfg_k} guides, but z has no unconditional rows; prepare the state with "
                             f"cfg_scale != 1")
        return k

    def _variance(self, variance: str | None) -> str:
        variance = self.variance if variance is None else variance
        if variance not in VARIANCES:
            raise ValueError(f"variance must be one of {VARIANCES}, got {variance!r}")
        return variance

    @torch.no_grad()
    def head_chain(self, z: Tensor, x_T: Tensor, noises: Tensor, temperature: float = 1.0,
                   cfg_k: Tensor | float = 1.0, variance: str | None = None, record: bool = True) -> HeadChain:
        """The head's ancestral chain with injected randomness: x_T [B, n, D], noises [B, n, S, D] (noises[:, :, s]
        enters step s, scaled by temperature * sigma; noises[:, :, S-1] is unused: the last step is noiseless).
        cfg_k: the guidance of this AR step (float or [B]). -> HeadChain (tokens = means at t = 0)."""
        b, n = x_T.shape[:2] if isinstance(x_T, Tensor) and x_T.dim() == 3 else (-1, -1)
        _check(x_T, (b, n, self.token_dim), "x_T", f"pass [B, n, {self.token_dim}] starting states")
        _check(noises, (b, n, self.num_steps, self.token_dim), "noises",
               f"pass one {self.token_dim}-dim noise per position and head step (S={self.num_steps})")
        if not (math.isfinite(temperature) and temperature >= 0):
            raise ValueError(f"temperature must be a finite number >= 0, got {temperature}")
        d = self.token_dim
        with self.timing("head", self.device):
            c = self._flat_cond(z, b, n)
            k = self._cfg_rows(cfg_k, z, b, n)
            tokens, means, logvars, states = self.model.diffloss.chain(
                c, x_T.reshape(b * n, d).float(), noises.reshape(b * n, self.num_steps, d).float(), temperature,
                k, self._variance(variance), record, self.clip_x0)
        shape = (b, n, self.num_steps, d)
        if not record:
            return HeadChain(tokens.reshape(b, n, d))
        return HeadChain(tokens.reshape(b, n, d), means.reshape(shape), logvars.reshape(shape), states.reshape(shape))

    @torch.no_grad()
    def head_transition(self, z: Tensor, x_t: Tensor, t: Tensor, cfg_k: Tensor | float = 1.0,
                        variance: str | None = None) -> tuple[Tensor, Tensor]:
        """p(x_{t-1} | x_t) at many states in ONE head call: x_t [B, n, M, D] at respaced steps t (LongTensor [M],
        or [B, n, M]; step s of a chain is t = S-1-s) -> (mean, logvar) [B, n, M, D] each."""
        if not isinstance(x_t, Tensor) or x_t.dim() != 4 or x_t.shape[-1] != self.token_dim:
            raise ValueError(f"x_t must be [B, n, M, {self.token_dim}], got "
                             f"{tuple(getattr(x_t, 'shape', ()))}")
        b, n, m, d = x_t.shape
        if not isinstance(t, Tensor) or t.dtype != torch.long or tuple(t.shape) not in ((m,), (b, n, m)):
            raise ValueError(f"t must be a LongTensor [M={m}] or [B, n, M] of respaced steps")
        if t.numel() and (t.min() < 0 or t.max() >= self.num_steps):
            raise ValueError(f"t must lie in [0, {self.num_steps})")
        with self.timing("head", self.device):
            c = self._flat_cond(z, b, n, repeat=m)
            k = self._cfg_rows(cfg_k, z, b, n * m)
            x = x_t.reshape(b * n * m, d).float()
            mean, logvar = self.model.diffloss.transition(x, t.expand(b, n, m).reshape(-1), c, k,
                                                          self._variance(variance), self.clip_x0)
        return mean.reshape(b, n, m, d), logvar.reshape(b, n, m, d)

    @torch.no_grad()
    def head_frozen(self, ref_x: Tensor, ref_t: Tensor, ref_mean: Tensor, ref_logvar: Tensor, predict: str = "x0"):
        """The head with its prediction at earlier states held fixed, no network call (the frozen drafter,
        `drafters.frozen_head`): ref_x, ref_mean, ref_logvar [n, D] one transition this head made at each of n
        positions, at respaced steps ref_t LongTensor [n]. The prediction is read back once; -> transition(x [n, D],
        t LongTensor [n]) -> (mean, logvar) [n, D], with the same variance and x0 clamp as `head_transition`
        (see `DiffLoss.frozen`)."""
        f = lambda a: a.float()
        return self.model.diffloss.frozen(f(ref_x), ref_t, f(ref_mean), f(ref_logvar), predict, self._variance(None),
                                          self.clip_x0)

    # ---- randomness and schedules ---------------------------------------------------------------------------------
    def draw_noise(self, batch: int, generator: torch.Generator | None = None) -> MARNoise:
        """All the noise of `batch` generations, per position (x_T first, then the step noises)."""
        shape = (batch, self.num_tokens, self.token_dim)
        x_T = torch.randn(shape, generator=generator, device=self.device)
        steps = torch.randn(batch, self.num_tokens, self.num_steps, self.token_dim, generator=generator,
                            device=self.device)
        return MARNoise(x_T, steps)

    # ---- the baseline -----------------------------------------------------------------------------------------
    @torch.no_grad()
    def sample(self, cond: Tensor, num_iter: int = 64, cfg: float = 1.0, temperature: float = 1.0,
               generator: torch.Generator | None = None, noise: MARNoise | None = None,
               order: str | Tensor = "random", cfg_kind: str = "linear", variance: str | None = None) -> Tensor:
        """Target-only MAR (official `sample_tokens`): num_iter AR steps of the cosine mask schedule, guidance
        cfg_schedule(cfg, mask_len) per step, the head's chain per predicted token. Randomness: `noise` (per
        position), else drawn step by step from `generator` (after the order). -> tokens [B, L, D]."""
        schedule = mask_schedule(self.num_tokens, num_iter)
        cfg_schedule(cfg, 0, self.num_tokens, cfg_kind)           # validates the kind before any work
        state = self.prepare(cond, cfg, generator, order)
        if noise is not None:
            _check(noise.steps, (state.batch, self.num_tokens, self.num_steps, self.token_dim), "noise.steps",
                   "draw it with draw_noise(B)")
        for start, count, mask_len in zip(schedule.starts, schedule.counts, schedule.mask_lens):
            if count == 0:
                continue
            positions = state.order[:, start:start + count]
            z = self.condition(state, positions)
            if noise is None:
                x_T = torch.randn(state.batch, count, self.token_dim, generator=generator, device=self.device)
                steps = torch.randn(state.batch, count, self.num_steps, self.token_dim, generator=generator,
                                    device=self.device)
            else:
                x_T, steps = noise.at(positions)
            k = cfg_schedule(cfg, mask_len, self.num_tokens, cfg_kind) if state.cfg else 1.0
            out = self.head_chain(z, x_T, steps, temperature, k, variance, record=False)
            self.write(state, positions, out.tokens)
        return state.tokens

    # ---- pixels -----------------------------------------------------------------------------------------------
    @torch.no_grad()
    def decode(self, tokens: Tensor) -> Tensor | None:
        """tokens [B, L, D] -> pixels [B, 3, H, W] clamped to [-1, 1] (official: unpatchify, vae.decode(x / 0.2325));
        None without a VAE."""
        if self.vae is None:
            return None
        _check(tokens, (tokens.shape[0] if isinstance(tokens, Tensor) else -1, self.num_tokens, self.token_dim),
               "tokens", "decode whole images")
        latents = self.model.unpatchify(tokens).to(self.vae.post_quant_conv.weight.dtype)
        return self.vae.decode_tokens(latents).clamp(-1, 1)

    @torch.no_grad()
    def encode(self, images: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """images [B, 3, H, W] in [-1, 1] -> tokens [B, L, D] (posterior mean, or a sample with `generator`)."""
        if self.vae is None:
            raise ValueError("encode needs a VAE; build the adapter with vae=KLVAE(...)")
        return self.model.patchify(self.vae.encode_tokens(images, generator))


def from_checkpoint(size: str, path: str, vae_path: str | None = None, key: str = "model_ema", device=None,
                    trust_pickle: bool = False, **overrides) -> MARAdapter:
    """The released MAR `size` ("mar_base" / "mar_large" / "mar_huge") from its checkpoint-last.pth (EMA weights by
    default) and, with vae_path, the KL-16 VAE from kl16.ckpt. overrides: MARConfig fields (num_sampling_steps...)."""
    model = mar_from_file(size, path, key, trust_pickle, **overrides)
    vae = None if vae_path is None else vae_from_file(vae_path, VAEConfig(), trust_pickle)
    if device is not None:
        model = model.to(device)
        vae = None if vae is None else vae.to(device)
    return MARAdapter(model, vae)
