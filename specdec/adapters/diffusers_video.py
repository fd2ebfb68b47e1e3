"""A block-autoregressive video model from diffusers behind `specdec.protocols.BlockGenerator`.

The model is AnyFlow-FAR (`diffusers.AnyFlowFARTransformer3DModel` with `FlowMapEulerDiscreteScheduler`): a causal
Wan2.1 DiT that makes a clip chunk by chunk, each chunk attending to the clean latents of the earlier ones through a
KV cache, far chunks seen through a coarser ("compressed") patch embedding. Gu, Fang et al., "AnyFlow: Any-Step
Video Diffusion Model with On-Policy Flow Map Distillation", arXiv 2605.13724; the causal backbone is FAR, Gu et al.,
"Long-Context Autoregressive Video Modeling with Next-Frame Prediction", arXiv 2503.19325. Block routing between a
small and a large model of this kind: Hu & Zhang, SDVG, arXiv 2604.17397.

Why this class. Its pipeline (`AnyFlowFARPipeline`) already is "for each chunk: denoise it to the end from its own
x_T given the committed chunks, then write it to the context": a chunk is finished before the next one starts, and
sampling is plain Euler on flow-map (mean-velocity) predictions with no re-noising, so a block consumes exactly one
tensor of randomness, its x_T [B, F_b, C, h, w]. The KV cache is rebuilt at each commit from the clean latents of
all committed chunks (a cache-prefill forward at t = 0), so it is a pure function of the committed latents: a block
drafted by a smaller model and accepted enters the larger model's context exactly as if that model had made it, and
a rejected draft leaves no trace (generating a block only reads the cache).

Mapping (F = latent frames per clip, F_b = latent frames per block, N = F / F_b blocks, B batch, C latent channels,
h x w latent size; the text condition is the pipeline's prompt embeddings [B, L, D], made by `pipe.encode_prompt`):
  block_noise     x_T of block b: standard normal [B, F_b, C, h, w] drawn from the caller's torch.Generator
  generate_block  the pipeline's inner loop for chunk b (its timesteps, CFG mix and scheduler steps) on the cache
  commit_block    write the clean latents into the clip buffer and re-encode the cache over blocks [0, b]
The chunk partition is uniform ([F_b] * N); the released checkpoints' default (1, 3, 3, ...) is not, so pass a
uniform `chunk_partition` to the pipeline when comparing.

Guarantee: the adapter is EXACT with respect to the pipeline: with the same x_T's it returns the pipeline's latents
(the test checks equality on tiny random models). The routing it serves is lossy and unbounded.

diffusers is an optional dependency (`pip install -e '.[video]'`), imported on first use.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from specdec.protocols import BlockGenerator

INSTALL_HINT = "install the video extra: pip install -e '.[video]'"


def require_diffusers():
    """The diffusers module, or ImportError with the install command."""
    try:
        import diffusers
    except ImportError as err:
        raise ImportError(f"this adapter needs diffusers; {INSTALL_HINT}") from err
    return diffusers


@dataclass(frozen=True)
class FARBlockConfig:
    """How the adapter samples a clip (every default in one place).

    num_frames:          F, latent frames per clip (a Wan VAE turns F latent frames into 4 (F - 1) + 1 frames)
    frames_per_block:    F_b, latent frames per block; divides F
    height, width:       latent size h x w (pixels / 8 for the Wan VAE); multiples of the compressed patch size
    num_inference_steps: flow-map steps per block (ignored when `sigmas` is given)
    sigmas:              optional custom schedule, noisy to clean, as in the pipeline's `sigmas`
    guidance_scale:      classifier-free guidance; > 1 needs negative prompt embeddings in `start`
    use_mean_velocity:   condition on (t, r) to predict the mean velocity (the pipeline's default)
    """

    num_frames: int = 6
    frames_per_block: int = 2
    height: int = 4
    width: int = 4
    num_inference_steps: int = 2
    sigmas: tuple[float, ...] | None = None
    guidance_scale: float = 1.0
    use_mean_velocity: bool = True

    def __post_init__(self):
        for name in ("num_frames", "frames_per_block", "height", "width", "num_inference_steps"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"{name} must be a positive int, got {getattr(self, name)!r}")
        if self.num_frames % self.frames_per_block:
            raise ValueError(f"frames_per_block={self.frames_per_block} must divide num_frames={self.num_frames} "
                             f"(latent frames); pick a divisor, e.g. {_divisors(self.num_frames)}")
        if self.sigmas is not None and (len(self.sigmas) == 0 or not all(0 <= s <= 1 for s in self.sigmas)):
            raise ValueError(f"sigmas must be a non-empty sequence in [0, 1], noisy to clean; got {self.sigmas}")
        if not self.guidance_scale >= 1.0:
            raise ValueError(f"guidance_scale must be >= 1 (1 = no guidance), got {self.guidance_scale}")

    @property
    def num_blocks(self) -> int:
        return self.num_frames // self.frames_per_block

    @property
    def uses_cfg(self) -> bool:
        return self.guidance_scale > 1.0


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


@dataclass
class FARState:
    """One batch of clips in progress.

    embeds:    text embeddings the transformer reads [B', L, D] (B' = 2B with CFG: negative rows first)
    latents:   the clip buffer [B, F, C, h, w]; blocks [0, committed) hold committed clean latents, the rest zeros
    kv_cache:  per layer {"full_cache", "compressed_cache"}: [2, B', heads, slots, head_dim]
    committed: number of committed blocks
    """

    embeds: Tensor
    latents: Tensor
    kv_cache: dict
    committed: int = 0
    flag: dict = field(default_factory=lambda: {"num_cached_chunks": 0, "is_cache_step": False})


class FARBlockGenerator(BlockGenerator):
    """BlockGenerator over an `AnyFlowFARTransformer3DModel` and its `FlowMapEulerDiscreteScheduler`.

    Two instances over transformers with the same `in_channels` (the VAE's latent channels), patch sizes and config
    share a latent space: a router drafts with the small one and verifies / regenerates with the large one, feeding
    both the noises of the target's `block_noise` and committing the chosen block to both.
    """

    def __init__(self, transformer, scheduler, config: FARBlockConfig = FARBlockConfig()):
        diffusers = require_diffusers()
        if not isinstance(transformer, diffusers.AnyFlowFARTransformer3DModel):
            raise TypeError(f"transformer must be a diffusers.AnyFlowFARTransformer3DModel, "
                            f"got {type(transformer).__name__}")
        if not isinstance(scheduler, diffusers.FlowMapEulerDiscreteScheduler):
            raise TypeError(f"scheduler must be the pipeline's diffusers.FlowMapEulerDiscreteScheduler, "
                            f"got {type(scheduler).__name__}")
        if not isinstance(config, FARBlockConfig):
            raise TypeError(f"config must be a FARBlockConfig, got {type(config).__name__}")
        tc = transformer.config
        for name, patch in (("patch_size", tc.patch_size), ("compressed_patch_size", tc.compressed_patch_size)):
            if config.height % patch[1] or config.width % patch[2]:
                raise ValueError(f"latent size {config.height}x{config.width} must be a multiple of the "
                                 f"transformer's {name} {tuple(patch[1:])}; change height / width")
        self.transformer = transformer.eval()
        self.scheduler = copy.deepcopy(scheduler)   # set_timesteps / step mutate it: keep it ours alone
        self.config = config
        self.num_frames = config.num_frames
        self.frames_per_block = config.frames_per_block
        self.device = transformer.device
        self.dtype = transformer.dtype
        self.channels = tc.in_channels

    # ---- protocol ------------------------------------------------------------------------------------------------

    def start(self, cond: Any) -> FARState:
        """cond: prompt embeddings [B, L, D], or (prompt_embeds, negative_prompt_embeds) both [B, L, D]; the
        negative ones are required when guidance_scale > 1 and rejected otherwise."""
        pos, neg = _split_cond(cond, self.config.uses_cfg, self.transformer.config.text_dim)
        embeds = (torch.cat([neg, pos]) if neg is not None else pos).to(self.device, self.dtype)
        cfg = self.config
        latents = torch.zeros(pos.shape[0], cfg.num_frames, self.channels, cfg.height, cfg.width,
                              device=self.device, dtype=self.dtype)
        return FARState(embeds=embeds, latents=latents, kv_cache=self._empty_cache(embeds.shape[0]))

    def block_noise(self, state: FARState, block: int, generator: torch.Generator) -> Tensor:
        """x_T of block `block`: N(0, 1) [B, F_b, C, h, w], drawn in float32 on the generator's device (as the
        pipeline's `prepare_latents`), returned on the model's device and dtype."""
        self._check_block(state, block, "draw noise for")
        cfg = self.config
        shape = (state.latents.shape[0], cfg.frames_per_block, self.channels, cfg.height, cfg.width)
        noise = torch.randn(shape, generator=generator, device=generator.device, dtype=torch.float32)
        return noise.to(self.device, self.dtype)

    @torch.no_grad()
    def generate_block(self, state: FARState, block: int, noise: Tensor) -> Tensor:
        """Denoise block `block` from x_T = noise [B, F_b, C, h, w] given the committed blocks -> clean latents
        [B, F_b, C, h, w]. Reads the cache, never writes it (a rejected draft needs no undo)."""
        self._check_block(state, block, "generate")
        x = self._check_latents(state, noise, "noise").to(self.device, self.dtype)
        cfg, sched = self.config, self.scheduler
        partition = [cfg.frames_per_block] * (block + 1)
        sched.set_timesteps(None if cfg.sigmas else cfg.num_inference_steps, device=self.device,
                            sigmas=list(cfg.sigmas) if cfg.sigmas else None)
        rs = sched.sigmas[1:] * sched.config.num_train_timesteps
        skip = (sched.timesteps == rs).tolist()     # zero-length steps (a repeated sigma): the pipeline skips them
        for t, r, skipped in zip(sched.timesteps, rs, skip):
            if skipped:
                continue
            inp = torch.cat([x, x]) if cfg.uses_cfg else x
            t_in = t.expand(inp.shape[0]).unsqueeze(-1).repeat((1, inp.shape[1]))
            r_in = r.expand(inp.shape[0]).unsqueeze(-1).repeat((1, inp.shape[1])) if cfg.use_mean_velocity else t_in
            pred, _ = self.transformer(hidden_states=inp, timestep=t_in, r_timestep=r_in,
                                       encoder_hidden_states=state.embeds, chunk_partition=partition,
                                       kv_cache=state.kv_cache, kv_cache_flag=copy.deepcopy(state.flag),
                                       return_dict=False)
            if cfg.uses_cfg:
                uncond, cond = pred.chunk(2)
                pred = uncond + cfg.guidance_scale * (cond - uncond)
            x = sched.step(pred, t, x, return_dict=False)[0]
        return x

    @torch.no_grad()
    def commit_block(self, state: FARState, block: int, latents: Tensor) -> None:
        """Write clean latents [B, F_b, C, h, w] of block `block` (from this model or any other in the same latent
        space) to the clip and re-encode the KV cache over blocks [0, block] (skipped after the last block)."""
        self._check_block(state, block, "commit")
        latents = self._check_latents(state, latents, "latents")
        fb = self.frames_per_block
        state.latents[:, block * fb:(block + 1) * fb] = latents.to(self.device, self.dtype)
        state.committed = block + 1
        if block + 1 < self.config.num_blocks:
            self._encode_cache(state, block)

    # ---- helpers -------------------------------------------------------------------------------------------------

    def _encode_cache(self, state: FARState, block: int) -> None:
        """The pipeline's `encode_kv_cache`: a t = r = 0 forward over all committed latents, in cache mode."""
        cfg = self.config
        partition = [cfg.frames_per_block] * (block + 1)
        ctx = state.latents[:, :(block + 1) * cfg.frames_per_block]
        inp = torch.cat([ctx, ctx]) if cfg.uses_cfg else ctx
        zero = torch.tensor([0], device=self.device).expand(inp.shape[0]).unsqueeze(-1).repeat((1, inp.shape[1]))
        mask = self.transformer.build_attention_mask(chunk_partition=partition, height=inp.shape[-2],
                                                     width=inp.shape[-1], device=self.device, mode="cache")
        flag = {"num_cached_chunks": block, "is_cache_step": True}
        self.transformer(hidden_states=inp, chunk_partition=partition, timestep=zero, r_timestep=zero,
                         encoder_hidden_states=state.embeds, attention_mask=mask, return_dict=False,
                         kv_cache=state.kv_cache, kv_cache_flag=flag)
        state.flag["num_cached_chunks"] = block + 1

    def _empty_cache(self, rows: int) -> dict:
        """Zeroed cache slots sized as the pipeline sizes them: the last `full_chunk_limit` chunks at full
        resolution, the older ones compressed."""
        tc, cfg = self.transformer.config, self.config
        full = (cfg.height // tc.patch_size[1]) * (cfg.width // tc.patch_size[2])
        comp = (cfg.height // tc.compressed_patch_size[1]) * (cfg.width // tc.compressed_patch_size[2])
        n_full = tc.full_chunk_limit * cfg.frames_per_block * full
        n_comp = max(0, cfg.num_blocks - tc.full_chunk_limit + 1) * cfg.frames_per_block * comp

        def slots(n):
            return torch.zeros(2, rows, tc.num_attention_heads, n, tc.attention_head_dim,
                               device=self.device, dtype=self.dtype)

        return {i: {"full_cache": slots(n_full), "compressed_cache": slots(n_comp)} for i in range(tc.num_layers)}

    def _check_block(self, state: FARState, block: int, verb: str) -> None:
        if not isinstance(state, FARState):
            raise TypeError(f"state must come from {type(self).__name__}.start, got {type(state).__name__}")
        if block != state.committed:
            raise ValueError(f"cannot {verb} block {block}: blocks are made in order and {state.committed} are "
                             f"committed, so the next is block {state.committed}")
        if block >= self.config.num_blocks:
            raise ValueError(f"block {block} is past the clip's {self.config.num_blocks} blocks")

    def _check_latents(self, state: FARState, x: Tensor, name: str) -> Tensor:
        cfg = self.config
        want = (state.latents.shape[0], cfg.frames_per_block, self.channels, cfg.height, cfg.width)
        if not isinstance(x, Tensor) or tuple(x.shape) != want or not x.is_floating_point():
            got = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
            raise ValueError(f"{name} must be a float tensor [B, F_b, C, h, w] = {want}, got {got}; draw it with "
                             f"the target's block_noise, whose latent space this model must share")
        return x


def _split_cond(cond: Any, uses_cfg: bool, text_dim: int) -> tuple[Tensor, Tensor | None]:
    pos, neg = (cond if isinstance(cond, (tuple, list)) and len(cond) == 2 else (cond, None))
    for name, e in (("prompt_embeds", pos), ("negative_prompt_embeds", neg)):
        if e is not None and (not isinstance(e, Tensor) or e.dim() != 3 or e.shape[-1] != text_dim):
            got = tuple(e.shape) if isinstance(e, Tensor) else type(e).__name__
            raise ValueError(f"{name} must be a tensor [B, L, {text_dim}] (the pipeline's encode_prompt output), "
                             f"got {got}")
    if uses_cfg and neg is None:
        raise ValueError("guidance_scale > 1 needs (prompt_embeds, negative_prompt_embeds) as cond; pass both or "
                         "set guidance_scale=1")
    if not uses_cfg and neg is not None:
        raise ValueError("negative_prompt_embeds given but guidance_scale == 1 would ignore them; raise "
                         "guidance_scale or pass prompt_embeds alone")
    if neg is not None and neg.shape != pos.shape:
        raise ValueError(f"negative_prompt_embeds {tuple(neg.shape)} must match prompt_embeds {tuple(pos.shape)}")
    return pos, neg


# ---- tiny random components (tests, demos): built from configs, nothing downloaded --------------------------------

TINY_SIZES = {
    # name: (layers, heads, head_dim, ffn); both read the same text width and latent channels
    "small": (1, 2, 8, 16),
    "large": (2, 2, 12, 32),
}
TINY_TEXT_DIM = 32
TINY_LATENT_CHANNELS = 16


def tiny_transformer(seed: int = 0, size: str = "large", full_chunk_limit: int = 2):
    """A random AnyFlowFARTransformer3DModel of size "small" or "large" (`TINY_SIZES`), text width 32, 16 latent
    channels (the tiny VAE's z_dim), full-resolution patches 1x2x2, compressed 1x4x4."""
    diffusers = require_diffusers()
    if size not in TINY_SIZES:
        raise ValueError(f"size must be one of {sorted(TINY_SIZES)}, got {size!r}")
    layers, heads, head_dim, ffn = TINY_SIZES[size]
    with torch.random.fork_rng(devices=[]):     # diffusers initialises from the global RNG: seed it locally
        torch.manual_seed(seed)
        return diffusers.AnyFlowFARTransformer3DModel(
            patch_size=(1, 2, 2), compressed_patch_size=(1, 4, 4), full_chunk_limit=full_chunk_limit,
            num_attention_heads=heads, attention_head_dim=head_dim, in_channels=TINY_LATENT_CHANNELS,
            out_channels=TINY_LATENT_CHANNELS, text_dim=TINY_TEXT_DIM, freq_dim=32, ffn_dim=ffn, num_layers=layers,
            rope_max_seq_len=32).eval()


def tiny_vae(seed: int = 0):
    """A random AutoencoderKLWan (Wan2.1 layout: 8x spatial, 4x temporal) with 16 latent channels."""
    diffusers = require_diffusers()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return diffusers.AutoencoderKLWan(base_dim=3, z_dim=TINY_LATENT_CHANNELS, dim_mult=[1, 1, 1, 1],
                                          num_res_blocks=1, temperal_downsample=[False, True, True]).eval()


def tiny_components(seed: int = 0, size: str = "large") -> dict:
    """{"transformer", "vae", "scheduler"} for `AnyFlowFARPipeline(tokenizer=None, text_encoder=None, **...)`;
    prompts enter as embeddings [B, L, TINY_TEXT_DIM]."""
    diffusers = require_diffusers()
    return {"transformer": tiny_transformer(seed, size), "vae": tiny_vae(seed),
            "scheduler": diffusers.FlowMapEulerDiscreteScheduler(num_train_timesteps=1000, shift=5.0)}
