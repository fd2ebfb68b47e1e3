"""MAR's diffusion head, "DiffLoss" (Li et al., arXiv 2406.11838, section 3.2): a small AdaLN MLP that models one
continuous token given the backbone's condition z, sampled by a respaced DDPM (the IDDPM / ADM Gaussian diffusion,
Nichol & Dhariwal arXiv 2102.09672). Written for specdec; parameter names follow the public LTH14/mar code
(models/diffloss.py), so `diffloss.net.*` of the released checkpoints loads as is.

What is reproduced from the official head (the checkpoints were trained with it):
* Cosine betas over `diffusion_steps` = 1000 (alpha_bar(t) = cos((t + 0.008) / 1.008 * pi / 2) ** 2, beta <= 0.999),
  respaced to S steps the IDDPM way (`space_timesteps`, Python's round-half-even included); the respaced process
  has betas 1 - abar_i / abar_prev over the kept steps, and the MLP sees the ORIGINAL timestep of a kept step.
* The MLP predicts eps and a learned-range variance v in [-1, 1]:
  log sigma_t^2 = (v + 1) / 2 * log beta_t + (1 - v) / 2 * log posterior_var_t (posterior_var_0 := posterior_var_1,
  IDDPM's clipping). Mean = posterior mean at x0_hat = (x_t - sqrt(1 - abar_t) eps) / sqrt(abar_t), no clipping
  (official `clip_denoised=False`; `clip` below is an opt-in departure).
* Ancestral step x_{t-1} = mu + tau * sigma_t * eps_t (temperature tau on the noise only, x_T is N(0, I)
  untempered); the step at t = 0 adds no noise, so a token is the mean at t = 0 (which equals x0_hat there).
* CFG on eps only (official `forward_with_cfg`): the 2N condition rows are [cond; uncond], both fed the SAME x_t
  (the first half's), eps = eps_u + k (eps_c - eps_u); the variance is the conditional row's, unguided.
Guarantee: with the same weights, z, x_T and noises, the chain equals the official `p_sample_loop` up to float32
rounding (compared against the public code on CPU). Differences that change no value: the condition and time
embeddings are computed once per call instead of once per step, and no noise is drawn for the unconditional CFG
half (upstream draws it, but `forward_with_cfg` replaces that half's state by the conditional one, so it never
reaches the output). With half-precision weights the chain itself (states, means, constants) stays float32.

x0 clipping (opt-in, `clip=c`; ADM's `clip_denoised` with the range [-c, c] instead of [-1, 1]): x0_hat is clamped
to [-c, c] before the posterior mean. Why a head may need it: the cosine schedule's last step has beta = 0.999, so
the respaced top step has abar_T ~ 2.4e-9 and x0_hat = recip_T (x_T - eps) with recip_T ~ 2e4; the mean carries
sqrt(abar_prev) recip_T ~ 630 times any eps error (a 0.02 error gives a state of std ~ 11, far off the training
states, and the chain diverges). The mean stays a deterministic function of x_t and the variance is unchanged, so
clipped chains are still Gaussian transition chains: two heads that clip alike keep sharing each step's covariance.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor, nn

VARIANCES = ("learned", "small", "large")


def cosine_betas(num_steps: int, max_beta: float = 0.999) -> Tensor:
    """IDDPM's cosine schedule: float64 [num_steps], beta_i = min(1 - abar((i+1)/T) / abar(i/T), max_beta)."""
    abar = lambda t: math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2
    return torch.tensor([min(1 - abar((i + 1) / num_steps) / abar(i / num_steps), max_beta)
                         for i in range(num_steps)], dtype=torch.float64)


def space_timesteps(num_timesteps: int, count: int) -> list[int]:
    """The `count` original steps IDDPM keeps (one section): start at 0, stride (T - 1) / (count - 1), Python round
    (half to even), sorted. E.g. (1000, 100) -> [0, 10, 20, 30, 40, 50, 61, ..., 999]."""
    if not 1 <= count <= num_timesteps:
        raise ValueError(f"cannot respace {num_timesteps} diffusion steps into {count}")
    stride = 1 if count <= 1 else (num_timesteps - 1) / (count - 1)
    steps, cur = [], 0.0
    for _ in range(count):
        steps.append(round(cur))       # accumulate the float stride exactly as upstream (same rounding points)
        cur += stride
    return sorted(set(steps))


def respaced_schedule(diffusion_steps: int, sampling_steps: int) -> dict[str, Tensor]:
    """The respaced Gaussian diffusion's per-step constants, float64 [S] each (index t = 0 .. S-1, t = 0 last):
    timestep_map (original step of t), betas, log_betas, posterior_logvar (clipped), fixed_large_logvar,
    coef1 / coef2 (posterior mean), recip / recipm1 (x0_hat = recip * x_t - recipm1 * eps)."""
    base_abar = torch.cumprod(1.0 - cosine_betas(diffusion_steps), 0)
    kept = space_timesteps(diffusion_steps, sampling_steps)
    betas, last = [], 1.0
    for i in kept:
        betas.append(1.0 - base_abar[i].item() / last)
        last = base_abar[i].item()
    betas = torch.tensor(betas, dtype=torch.float64)
    alphas = 1.0 - betas
    abar = torch.cumprod(alphas, 0)
    abar_prev = torch.cat([torch.ones(1, dtype=torch.float64), abar[:-1]])
    post_var = betas * (1.0 - abar_prev) / (1.0 - abar)
    return {
        "timestep_map": torch.tensor(kept, dtype=torch.float64),
        "betas": betas,
        "log_betas": betas.log(),
        "posterior_logvar": torch.cat([post_var[1:2], post_var[1:]]).log(),
        "fixed_large_logvar": torch.cat([post_var[1:2], betas[1:]]).log(),
        "coef1": betas * abar_prev.sqrt() / (1.0 - abar),
        "coef2": (1.0 - abar_prev) * alphas.sqrt() / (1.0 - abar),
        "recip": (1.0 / abar).sqrt(),
        "recipm1": (1.0 / abar - 1.0).sqrt(),
    }


def timestep_embedding(t: Tensor, dim: int, max_period: float = 10000.0) -> Tensor:
    """Sinusoidal embedding (GLIDE): t [N] (float) -> [N, dim] = [cos(t f), sin(t f)], f_i = max_period^(-i/half)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t[:, None].float() * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    return torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1) if dim % 2 else emb


class TimestepEmbedder(nn.Module):
    """t [N] -> [N, width]: sinusoid (256) -> Linear -> SiLU -> Linear (keys mlp.0, mlp.2)."""

    def __init__(self, width: int, frequency_dim: int = 256):
        super().__init__()
        self.frequency_dim = frequency_dim
        self.mlp = nn.Sequential(nn.Linear(frequency_dim, width), nn.SiLU(), nn.Linear(width, width))

    def forward(self, t: Tensor) -> Tensor:
        return self.mlp(timestep_embedding(t, self.frequency_dim).to(self.mlp[0].weight.dtype))


def _modulate(x: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
    return x * (1 + scale) + shift


class ResBlock(nn.Module):
    """x + gate * MLP(LN(x) * (1 + scale) + shift), (shift, scale, gate) = Linear(SiLU(y))."""

    def __init__(self, width: int):
        super().__init__()
        self.in_ln = nn.LayerNorm(width, eps=1e-6)
        self.mlp = nn.Sequential(nn.Linear(width, width), nn.SiLU(), nn.Linear(width, width))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(width, 3 * width))

    def forward(self, x: Tensor, y: Tensor) -> Tensor:
        shift, scale, gate = self.adaLN_modulation(y).chunk(3, dim=-1)
        return x + gate * self.mlp(_modulate(self.in_ln(x), shift, scale))


class FinalLayer(nn.Module):
    """DiT's final layer: Linear(LN_no_affine(x) * (1 + scale) + shift)."""

    def __init__(self, width: int, out_channels: int):
        super().__init__()
        self.norm_final = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(width, out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(width, 2 * width))

    def forward(self, x: Tensor, y: Tensor) -> Tensor:
        shift, scale = self.adaLN_modulation(y).chunk(2, dim=-1)
        return self.linear(_modulate(self.norm_final(x), shift, scale))


class SimpleMLPAdaLN(nn.Module):
    """The official head network: x [N, D], y = time_embed(t) + cond_embed(z) [N, W] -> [N, 2D] = (eps, v)."""

    def __init__(self, in_channels: int, width: int, z_channels: int, depth: int):
        super().__init__()
        self.in_channels = in_channels
        self.time_embed = TimestepEmbedder(width)
        self.cond_embed = nn.Linear(z_channels, width)
        self.input_proj = nn.Linear(in_channels, width)
        self.res_blocks = nn.ModuleList([ResBlock(width) for _ in range(depth)])
        self.final_layer = FinalLayer(width, 2 * in_channels)
        self.initialize_weights()

    def initialize_weights(self) -> None:
        """The official init: xavier-uniform linears, N(0, 0.02) time MLP, zero adaLN and output layers."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        nn.init.normal_(self.time_embed.mlp[0].weight, std=0.02)
        nn.init.normal_(self.time_embed.mlp[2].weight, std=0.02)
        for block in self.res_blocks:
            nn.init.zeros_(block.adaLN_modulation[-1].weight)
            nn.init.zeros_(block.adaLN_modulation[-1].bias)
        for layer in (self.final_layer.adaLN_modulation[-1], self.final_layer.linear):
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def forward_embedded(self, x: Tensor, y: Tensor) -> Tensor:
        x = self.input_proj(x)
        for block in self.res_blocks:
            x = block(x, y)
        return self.final_layer(x, y)

    def forward(self, x: Tensor, t: Tensor, c: Tensor) -> Tensor:
        """The official signature: x [N, D], t [N] original timesteps, c [N, z_channels] -> [N, 2D]."""
        return self.forward_embedded(x, self.time_embed(t) + self.cond_embed(c))


class DiffLoss(nn.Module):
    """The head (`net`, the only weights) and its respaced sampler. S = num_sampling_steps, t = S-1 .. 0.

    Rows: N states x [N, D]; conditions c = cond_embed(z) [N, W], or [2N, W] = [cond; uncond] for CFG (`embed`).
    """

    def __init__(self, token_dim: int, z_channels: int, depth: int, width: int, sampling_steps: int = 100,
                 diffusion_steps: int = 1000):
        super().__init__()
        self.token_dim = token_dim
        self.net = SimpleMLPAdaLN(token_dim, width, z_channels, depth)
        self.num_steps = sampling_steps
        # float32 copies of the float64 constants, as upstream casts them at use. Plain attributes, not buffers:
        # they stay out of the state dict and stay float32 when the weights go to half precision.
        self._consts = {k: v.float() for k, v in respaced_schedule(diffusion_steps, sampling_steps).items()}
        self._on: dict[torch.device, dict[str, Tensor]] = {}

    def const(self, name: str) -> Tensor:
        """A schedule constant [S] (float32) on the weights' device."""
        device = self.net.input_proj.weight.device
        if device not in self._on:
            self._on[device] = {k: v.to(device) for k, v in self._consts.items()}
        return self._on[device][name]

    def _net(self, x: Tensor, y: Tensor) -> Tensor:
        """The MLP on states x [N, D] (float32 chain) -> float32 [N, 2D], whatever the weights' dtype."""
        return self.net.forward_embedded(x.to(y.dtype), y).float()

    def embed(self, z: Tensor) -> Tensor:
        """Backbone conditions z [..., z_channels] -> [..., W] (constant along the chain: computed once)."""
        return self.net.cond_embed(z)

    def time_table(self) -> Tensor:
        """[S, W]: the time embedding of every respaced step t (at its original timestep). Without autograd it is
        cached until the time embedder's weights change (their in-place version counters), device or dtype: a
        speculative chain calls the head once per round, and this table is a tenth of a one-state call."""
        if torch.is_grad_enabled():
            return self.net.time_embed(self.const("timestep_map"))
        key = tuple((id(q), q._version, q.device, q.dtype) for q in self.net.time_embed.parameters())
        if getattr(self, "_times_key", None) != key:
            self._times, self._times_key = self.net.time_embed(self.const("timestep_map")), key
        return self._times

    def predict(self, x: Tensor, t: Tensor | int, c: Tensor, cfg_k: Tensor | float = 1.0,
                times: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """x [N, D] at respaced step t (int, or LongTensor [N]); c [N, W] or [2N, W] (CFG); cfg_k float or [N]
        -> (eps [N, D], guided with CFG; v [N, D] in the conditional row's learned-range units)."""
        times = self.time_table() if times is None else times
        n = x.shape[0]
        y = times[t] if isinstance(t, Tensor) else times[t][None]
        if c.shape[0] == n:
            out = self._net(x, y + c)
            return out[:, : self.token_dim], out[:, self.token_dim:]
        if c.shape[0] != 2 * n:
            raise ValueError(f"conditions have {c.shape[0]} rows for {n} states; expected {n} or {2 * n} (CFG)")
        if isinstance(t, Tensor):
            y = torch.cat([y, y])
        out = self._net(torch.cat([x, x]), y + c)
        eps_c, eps_u = out[:n, : self.token_dim], out[n:, : self.token_dim]
        k = cfg_k[:, None] if isinstance(cfg_k, Tensor) else cfg_k
        return eps_u + k * (eps_c - eps_u), out[:n, self.token_dim:]

    def mean_logvar(self, x: Tensor, t: Tensor | int, eps: Tensor, v: Tensor, variance: str = "learned",
                    clip: float | None = None) -> tuple[Tensor, Tensor]:
        """p(x_{t-1} | x_t) = N(mean, exp(logvar)): x, eps, v [N, D]; variance "learned" (the checkpoint's
        learned range), "small" (posterior variance, the range's lower end) or "large" (beta_t, its upper end;
        IDDPM's fixed-large with posterior_var_1 at t = 0); clip: None (official) or c > 0, x0_hat clamped to
        [-c, c] before the posterior mean -> (mean [N, D], logvar [N, D])."""
        at = (lambda buf: buf[t][:, None]) if isinstance(t, Tensor) else (lambda buf: buf[t])
        return self._posterior(x, t, at(self.const("recip")) * x - at(self.const("recipm1")) * eps, v, variance,
                               clip)

    def _posterior(self, x: Tensor, t: Tensor | int, x0: Tensor, v: Tensor, variance: str,
                   clip: float | None) -> tuple[Tensor, Tensor]:
        """`mean_logvar` from x0_hat [N, D] instead of eps."""
        at = (lambda buf: buf[t][:, None]) if isinstance(t, Tensor) else (lambda buf: buf[t])
        c = self.const
        if clip is not None:
            x0 = x0.clamp(-clip, clip)
        mean = at(c("coef1")) * x0 + at(c("coef2")) * x
        if variance == "learned":
            frac = (v + 1) / 2
            logvar = frac * at(c("log_betas")) + (1 - frac) * at(c("posterior_logvar"))
        elif variance == "small":
            logvar = at(c("posterior_logvar")).expand_as(x)
        elif variance == "large":
            logvar = at(c("fixed_large_logvar")).expand_as(x)
        else:
            raise ValueError(f"variance must be one of {VARIANCES}, got {variance!r}")
        return mean, logvar

    def reuse(self, ref_x: Tensor, ref_t: Tensor, ref_mean: Tensor, ref_logvar: Tensor, x: Tensor, t: Tensor,
              predict: str = "x0", variance: str = "learned", clip: float | None = None) -> tuple[Tensor, Tensor]:
        """The transition at x [N, D], step t [N], with the network's prediction at (ref_x [N, D], ref_t [N]) reused
        instead of a new call: `frozen(...)(x, t)`. -> (mean, logvar) [N, D]."""
        return self.frozen(ref_x, ref_t, ref_mean, ref_logvar, predict, variance, clip)(x, t)

    def frozen(self, ref_x: Tensor, ref_t: Tensor, ref_mean: Tensor, ref_logvar: Tensor, predict: str = "x0",
               variance: str = "learned", clip: float | None = None):
        """The network's prediction at (ref_x [N, D], ref_t [N]) read back once from that step's (ref_mean,
        ref_logvar) [N, D] through the schedule: x0_hat = (mean - coef2 x) / coef1 (the clamped x0 when clipping);
        predict="x0" keeps x0_hat, predict="eps" keeps eps = (recip x - x0_hat) / recipm1. The variance: a fixed
        one is the schedule's at t (what the network would give); "learned" re-applies the reference's v (read
        back from its log-variance). -> transition(x [N, D], t [N]) -> (mean, logvar) [N, D], no network."""
        at = lambda name, s: self.const(name)[s][:, None]
        if predict not in ("x0", "eps"):
            raise ValueError(f"predict must be 'x0' or 'eps' (which prediction to reuse), got {predict!r}")
        x0 = (ref_mean - at("coef2", ref_t) * ref_x) / at("coef1", ref_t)
        v = torch.zeros_like(x0)
        if variance == "learned":
            lo, hi = at("posterior_logvar", ref_t), at("log_betas", ref_t)
            v = 2 * (ref_logvar - lo) / (hi - lo).abs().clamp_min(1e-12).copysign(hi - lo) - 1
        if predict == "x0":
            return lambda x, t: self._posterior(x, t, x0, v, variance, clip)
        # float64: x0_hat = recip x - recipm1 eps cancels at recip_T ~ 2e4
        d = lambda name, s: at(name, s).double()
        eps = (d("recip", ref_t) * ref_x.double() - x0.double()) / d("recipm1", ref_t)
        return lambda x, t: self._posterior(x, t, (d("recip", t) * x.double() - d("recipm1", t) * eps).to(x.dtype),
                                            v, variance, clip)

    def transition(self, x: Tensor, t: Tensor, c: Tensor, cfg_k: Tensor | float = 1.0,
                   variance: str = "learned", clip: float | None = None) -> tuple[Tensor, Tensor]:
        """Many transitions in one call: x [N, D] at steps t [N] (LongTensor) -> (mean, logvar) [N, D] each."""
        eps, v = self.predict(x, t, c, cfg_k)
        return self.mean_logvar(x, t, eps, v, variance, clip)

    def chain(self, c: Tensor, x_T: Tensor, noises: Tensor, temperature: float = 1.0,
              cfg_k: Tensor | float = 1.0, variance: str = "learned", record: bool = True,
              clip: float | None = None) -> tuple[Tensor, Tensor | None, Tensor | None, Tensor | None]:
        """The ancestral sampler with given noises. c [N, W] or [2N, W]; x_T [N, D]; noises [N, S, D], noises[:, s]
        enters step s (from t = S-1-s to t-1); noises[:, S-1] is never used (the last step is noiseless).
        clip: as in `mean_logvar`. -> (tokens [N, D] = means[:, -1], means [N, S, D], logvars [N, S, D],
        states [N, S, D] = x before step s); the last three are None when record=False."""
        times = self.time_table()
        x = x_T
        means, logvars, states = [], [], []
        for s in range(self.num_steps):
            t = self.num_steps - 1 - s
            eps, v = self.predict(x, t, c, cfg_k, times)
            mean, logvar = self.mean_logvar(x, t, eps, v, variance, clip)
            if record:
                states.append(x)
                means.append(mean)
                logvars.append(logvar)
            x = mean + torch.exp(0.5 * logvar) * noises[:, s] * temperature if t > 0 else mean
        if not record:
            return x, None, None, None
        return x, torch.stack(means, 1), torch.stack(logvars, 1), torch.stack(states, 1)
