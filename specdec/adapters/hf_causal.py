"""Any transformers causal LM used as an image-token generator.

The model sees a prompt (class token(s) or text ids) followed by image tokens that live somewhere in its vocabulary
(`image_token_ids[v]` is the model id of image token v). The engine only sees image ids 0..V-1 and logits restricted
to them.

Ragged rows on a transformers `Cache`: the cache grows for the whole batch at once, so each forward appends n slots
to every row and a `HoleMask` marks the slots a row rejected as holes. Attention gets a 4-D additive mask from it and
explicit `position_ids` (each row's logical positions), which Llama-style models in transformers 5.x accept as-is.
When holes pile up, `compact()` gathers each row's valid slots to the right (left padding), so memory stays
O(prompt + T).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch
from torch import Tensor

from specdec.adapters.base import check_capacity, check_cfg
from specdec.adapters.cfg import CFGRows
from specdec.cache import HoleMask
from specdec.protocols import ARModel
from specdec.tree import verify_inputs
from specdec.sampling import Sampling
from specdec.types import Logits


@dataclass
class HFState(CFGRows):
    """CFG rows (`CFGRows`), the transformers cache of all of them, its holes, and per row the generated tokens
    currently in the cache [rows]; steps counts rollbacks (compaction runs every `compact_every` of them)."""

    cache: Any
    holes: HoleMask
    generated: Tensor
    steps: int = 0
    hidden: bool = False


def left_pad(prompts: Sequence[Tensor], pad_id: int) -> tuple[Tensor, Tensor]:
    """Ragged 1-D prompts -> (ids [B, P] left-padded, attention mask [B, P])."""
    width = max(int(p.numel()) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros(len(prompts), width, dtype=torch.long)
    for i, p in enumerate(prompts):
        if p.numel():
            ids[i, width - p.numel():] = p
            mask[i, width - p.numel():] = 1
    return ids, mask


def additive_mask(allowed: Tensor, dtype: torch.dtype) -> Tensor:
    """Boolean [B, 1, n, S] -> float additive mask (0 where allowed, dtype min elsewhere), for eager and SDPA."""
    return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill(
        ~allowed, torch.finfo(dtype).min)


class HFCausalAdapter(ARModel):
    """ARModel over a transformers causal LM (e.g. `LlamaForCausalLM`).

    model:           the causal LM; called as model(input_ids, attention_mask=4-D, position_ids, past_key_values)
    image_token_ids: LongTensor [V]: model vocabulary id of each image token (rows of the output layer `_head`)
    grid:            token layout, e.g. (16, 16)
    uncond_prompt:   LongTensor [P'] prompt of the unconditional rows for CFG (None: no CFG)
    class_prompts:   optional callable mapping cond (e.g. class ids [B]) to a list of 1-D prompt tensors; by
                     default cond is a LongTensor [B, P] of prompt ids or a list of 1-D prompt tensors
    codebook / decode: VQ code vectors [V, D] and tokens -> pixels, when the user has them
    token_embeddings: [V, D] LM inputs of the image tokens (default: the input-embedding rows of image_token_ids)

    Subclasses adapt other layouts through hooks: `_head` (the output layer's weight: device, dtype, size),
    `_run` / `_run_image_tokens` (how prompt ids and image tokens enter and logits leave), `uncond_prompts`
    (unconditional rows derived from each prompt) and `_slots` (cache slots taken by k image tokens).
    """

    def __init__(self, model, image_token_ids: Tensor, grid: tuple[int, ...], uncond_prompt: Tensor | None = None,
                 class_prompts: Callable[[Any], list[Tensor]] | None = None, pad_id: int = 0,
                 codebook: Tensor | None = None, decode: Callable[[Tensor], Tensor] | None = None,
                 compact_every: int = 16, token_embeddings: Tensor | None = None):
        self.model = model.eval()
        ids = torch.as_tensor(image_token_ids, dtype=torch.long)
        if ids.dim() != 1 or ids.numel() < 2:
            raise ValueError("image_token_ids must be a 1-D tensor with the model id of every image token")
        n_vocab = self._head.shape[0]
        if int(ids.max()) >= n_vocab or int(ids.min()) < 0:
            raise ValueError(f"image_token_ids must lie in the model's vocabulary [0, {n_vocab})")
        # device-resident: indexed in every forward without a host-to-device copy (see `_place_tables`)
        self.image_token_ids = ids.to(self.device)
        self.grid = tuple(grid)
        self.num_tokens = 1
        for g in grid:
            self.num_tokens *= g
        self.vocab_size = ids.numel()
        self.uncond_prompt = None if uncond_prompt is None else torch.as_tensor(uncond_prompt, dtype=torch.long)
        self.supports_cfg = self.uncond_prompt is not None
        self.class_prompts = class_prompts
        self.pad_id = pad_id
        self.codebook = codebook
        if token_embeddings is None:
            token_embeddings = model.get_input_embeddings().weight.detach()[self.image_token_ids]
        self.token_embeddings = token_embeddings
        self.max_new_tokens = getattr(model.config.get_text_config(), "max_position_embeddings", None) or 1 << 30
        self.compact_every = compact_every
        self._decode = decode
        # without a decoder generate() returns tokens only; a subclass with its own decode() (Janus, Emu3) can
        self.can_decode = decode is not None or type(self).decode is not HFCausalAdapter.decode

    @property
    def _head(self) -> Tensor:
        """Weight [N, hidden] of the layer whose rows `image_token_ids` index: its device and dtype are the
        model's."""
        return self.model.get_output_embeddings().weight

    @property
    def device(self) -> torch.device:
        return self._head.device

    def _place_tables(self) -> None:
        """Follow a model moved since construction (`model.to(...)`): checked once per generation in `start`, so
        the decode steps index a table already on the model's device."""
        if self.image_token_ids.device != self.device:
            self.image_token_ids = self.image_token_ids.to(self.device)

    def prompts(self, cond) -> list[Tensor]:
        if self.class_prompts is not None:
            return [torch.as_tensor(p, dtype=torch.long) for p in self.class_prompts(cond)]
        if isinstance(cond, Tensor):
            if cond.dim() != 2 or cond.dtype.is_floating_point:
                raise TypeError(f"cond must be prompt ids LongTensor [B, P] (or a list of 1-D prompts); "
                                f"got dtype {cond.dtype}, shape {tuple(cond.shape)}")
            return list(cond.long())
        if isinstance(cond, (list, tuple)) and all(isinstance(c, Tensor) and c.dim() == 1 for c in cond):
            return [c.long() for c in cond]
        raise TypeError("cond must be a LongTensor [B, P] of prompt ids or a list of 1-D LongTensors")

    def _run(self, ids: Tensor, positions: Tensor, allowed: Tensor, cache) -> Tensor:
        """Model ids [rows, n] -> logits [rows, n, V] restricted to the image tokens."""
        out = self.model(input_ids=ids, attention_mask=additive_mask(allowed, self._head.dtype),
                         position_ids=positions, past_key_values=cache, use_cache=True,
                         output_hidden_states=self._keep_hidden)
        if self._keep_hidden:
            self._last_hidden = out.hidden_states[-1]
        return out.logits[..., self.image_token_ids].float()

    def uncond_prompts(self, prompts: list[Tensor]) -> list[Tensor]:
        """The unconditional rows for CFG, one per prompt (a subclass may derive them from each prompt)."""
        return [self.uncond_prompt] * len(prompts)

    @torch.no_grad()
    def start(self, cond, sampling: Sampling, capacity: int, hidden: bool = False) -> tuple[HFState, Logits]:
        from transformers import DynamicCache

        check_cfg(self, sampling)
        prompts = self.prompts(cond)
        if not prompts:
            raise ValueError("cond is empty: pass at least one prompt")
        rows = CFGRows(len(prompts), sampling.uses_cfg)
        ids, mask = left_pad(rows.stack(prompts, self.uncond_prompts), self.pad_id)
        vocab = self.model.get_input_embeddings().weight.shape[0]
        bad = ids[(mask > 0) & ((ids < 0) | (ids >= vocab))]             # prompts are on the host: no device sync
        if bad.numel():
            raise ValueError(f"prompt ids {sorted(set(bad.tolist()))[:8]} lie outside the model's vocabulary "
                             f"[0, {vocab}); tokenize the prompt with this model's tokenizer")
        check_capacity(self, int(mask.sum(1).max()) + capacity)
        self._place_tables()
        # padding slots are holes from the start: never attended, and they take no logical position
        holes = HoleMask.from_prefix(mask.to(self.device))
        positions, allowed = holes.prefill_inputs()
        cache = DynamicCache(config=self.model.config.get_text_config())
        self._keep_hidden = hidden
        logits = self._run(ids.to(self.device), positions, allowed, cache)[:, -1:]
        generated = torch.zeros(ids.shape[0], dtype=torch.long, device=self.device)
        state = HFState(rows.batch, rows.cfg, cache, holes, generated, hidden=hidden)
        return state, state.split(logits, self._hidden(-1))

    # hidden states on request (start(..., hidden=True)): `_run` implementations store the final hidden states
    # [rows, n, H] of their forward in _last_hidden while _keep_hidden is set (from the state, per forward)
    _keep_hidden = False
    _last_hidden: Tensor | None = None

    @property
    def hidden_size(self) -> int:
        return self.model.config.get_text_config().hidden_size

    @property
    def output_embeddings(self) -> Tensor | None:
        """[V, hidden]: the output layer's rows of the image tokens (None when the layer has a bias)."""
        head = self.model.get_output_embeddings()
        if head is None or getattr(head, "bias", None) is not None:
            return None
        return head.weight.detach()[self.image_token_ids]

    def _hidden(self, last: int = 0) -> Tensor | None:
        """The last forward's final hidden states [rows, n, H] from position `last` on, when kept."""
        if not self._keep_hidden or self._last_hidden is None:
            return None
        return self._last_hidden[:, last:]

    def _image_logits(self, state: HFState, tokens: Tensor, positions: Tensor, allowed: Tensor) -> Logits:
        """Image tokens [rows, n] through the model -> Logits of the engine's rows (with hidden states when the
        state asked for them)."""
        self._keep_hidden = state.hidden
        return state.split(self._run_image_tokens(tokens, positions, allowed, state.cache), self._hidden())

    def _run_image_tokens(self, tokens: Tensor, positions: Tensor, allowed: Tensor, cache) -> Tensor:
        """Image tokens [rows, n] (engine ids) -> logits [rows, n, V]; a subclass may feed embeddings instead."""
        return self._run(self.image_token_ids[tokens], positions, allowed, cache)

    @torch.no_grad()
    def forward(self, state: HFState, tokens: Tensor) -> Logits:
        tokens = state.double(tokens)
        positions, allowed = state.holes.extend(tokens.shape[1])
        state.generated = state.generated + tokens.shape[1]
        return self._image_logits(state, tokens, positions, allowed)

    supports_trees = True          # tree nodes are slots of the growing cache; rejected ones become holes

    @torch.no_grad()
    def forward_tree(self, state: HFState, tree, last: Tensor, n_done: Tensor) -> Logits:
        """[last, nodes] appended as one block: each node attends the valid prefix, the root and its ancestors
        (4-D mask), at position_ids root + depth (`specdec.tree.verify_inputs`)."""
        tokens, positions, _, allowed = verify_inputs(tree, n_done, last, torch.zeros_like(n_done))
        offsets = positions - (n_done - 1)[:, None]
        pos, mask = state.holes.extend_tree(state.double(offsets), state.double(allowed))
        state.generated = state.generated + tokens.shape[1]
        return self._image_logits(state, state.double(tokens), pos, mask)

    def commit_tree(self, state: HFState, tree, path: Tensor) -> None:
        """Keep the root and the accepted path's nodes of the last block; the other nodes become holes."""
        N = tree.size
        keep = torch.zeros(path.shape[0], 1 + N, dtype=torch.bool, device=path.device)
        keep[:, 0] = True
        keep.scatter_(1, path.clamp_min(-1) + 1, True)                     # -1 (padding) lands on the root
        accepted = (path >= 0).sum(1)
        state.holes.keep_tree(state.double(keep), state.double(accepted))
        state.generated = state.generated - (1 + N) + 1 + state.double(accepted)

    def _slots(self, k: Tensor) -> Tensor:
        """Cache slots [rows] taken by the first k [rows] generated tokens (one each here)."""
        return k

    def rollback(self, state: HFState, keep: Tensor) -> None:
        keep = state.double(keep)
        state.holes.rollback(self._slots(state.generated) - self._slots(keep))
        state.generated = keep.clone()
        state.steps += 1
        if self.compact_every and state.steps % self.compact_every == 0:
            self.compact(state)

    def compact(self, state: HFState) -> None:
        """Move every row's valid slots to the right end, dropping the columns that hold only holes.

        One host sync every compact_every steps: the new cache width (the longest row) is read on the host."""
        valid = state.holes.valid
        keep_cols = int(valid.sum(1).max())
        if keep_cols == valid.shape[1]:
            return
        order = torch.sort(valid.long(), dim=1, stable=True).indices[:, -keep_cols:]   # holes first, then valid
        for layer in state.cache.layers:
            index = order[:, None, :, None].expand(-1, layer.keys.shape[1], -1, layer.keys.shape[-1])
            layer.keys = layer.keys.gather(2, index)
            layer.values = layer.values.gather(2, index)
        state.holes.valid = valid.gather(1, order)

    @torch.no_grad()
    def decode(self, tokens: Tensor) -> Tensor | None:
        return None if self._decode is None else self._decode(tokens)
