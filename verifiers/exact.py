"""Standard speculative sampling. LOSSLESS.

Leviathan et al., "Fast Inference from Transformers via Speculative Decoding", arXiv 2211.17192;
Chen et al., "Accelerating LLM Decoding with Speculative Sampling", arXiv 2302.01318.

Notation: p = target distribution, q = draft distribution (both after specdec.sampling), x = draft token,
k = draft tokens per step, B batch, V vocabulary.

    accept x_i iff U_i < p_i(x_i) / q_i(x_i), scanning left to right
    first rejection at i: commit y ~ norm((p_i - q_i)+);   all k accepted: commit bonus y ~ p_{k+1}

One-hot q (deterministic drafts) is the same formula: accept with p(x), else sample p with x zeroed. With
temperature 0 both p and q are one-hot, so this is greedy exact-match. k = 0 is plain sampling from p.
"""
from __future__ import annotations

import torch
from torch import Tensor

from specdec.random import sample_categorical
from specdec.protocols import AcceptanceRule, Randomness
from specdec.types import Verdict


def leading_run(ok: Tensor) -> Tensor:
    """ok [B, k] bool -> LongTensor [B]: the number of leading True values per row."""
    return ok.long().cumprod(-1).sum(-1)


def at_position(x: Tensor, index: Tensor) -> Tensor:
    """x [B, n, V], index [B] -> x[b, index[b]] as [B, V]."""
    return x.gather(1, index[:, None, None].expand(-1, 1, x.shape[-1]))[:, 0]


def correction_uniform(rng: Randomness, n_accepted: Tensor, k: int) -> Tensor:
    """The uniform [B] for the token committed after n_accepted drafts.

    A correction (after a rejection) draws from the "residual" stream. A bonus (all k accepted) is a plain draw
    from p, and takes the "sample" stream, the one plain AR decoding and drafters use at the same position: so a
    drafter equal to the target reproduces plain AR token for token. Both are fresh: no committed decision so far
    read them."""
    u = torch.where(n_accepted[:, None] == k, rng.uniform("sample", k + 1), rng.uniform("residual", k + 1))
    return u.gather(1, n_accepted[:, None])[:, 0]


def residual_sample(target_probs: Tensor, draft_probs: Tensor, n_accepted: Tensor, u: Tensor) -> Tensor:
    """Sample the correction at the first rejection (or the bonus after k acceptances) from norm((p - q)+).

    target_probs [B, k+1, V], draft_probs [B, k, V], n_accepted [B], u [B] -> LongTensor [B].
    Where p and q agree to rounding the residual has no mass; p itself is then the right law.
    """
    p = at_position(target_probs, n_accepted)
    bonus_q = draft_probs.new_zeros(draft_probs.shape[0], 1, draft_probs.shape[-1])       # bonus position: q = 0
    q_padded = torch.cat([draft_probs, bonus_q], 1)
    residual = (p - at_position(q_padded, n_accepted)).clamp_min(0)
    empty = residual.sum(-1, keepdim=True) <= 1e-9
    residual = torch.where(empty, p, residual)
    return sample_categorical(residual, u)


def token_probs(probs: Tensor, tokens: Tensor) -> Tensor:
    """probs [B, k(+1), V], tokens [B, k] -> probs[b, j, tokens[b, j]] as [B, k]."""
    return probs[:, : tokens.shape[1]].gather(-1, tokens[..., None])[..., 0]


class ExactRule(AcceptanceRule):
    """Standard speculative sampling; vectorised over batch and draft positions."""

    lossless = True
    name = "exact"

    @staticmethod
    def single_step_law(p: Tensor, q: Tensor) -> tuple[Tensor, Tensor]:
        """p, q [P, V] -> (law of the first committed token float64 [P, V] = p, acceptance sum_v min(p, q) [P])."""
        return p.double(), torch.minimum(p, q).double().sum(-1)

    def verify(self, draft_tokens: Tensor, draft_probs: Tensor, target_probs: Tensor,
               rng: Randomness) -> Verdict:
        """draft_tokens [B, k], draft_probs [B, k, V], target_probs [B, k+1, V] -> Verdict."""
        k = draft_tokens.shape[1]
        p_x = token_probs(target_probs, draft_tokens)
        q_x = token_probs(draft_probs, draft_tokens)
        # U < p/q written without division: q = 0 cannot occur for a real draft, p = 0 always rejects
        ok = rng.uniform("accept", k) * q_x < p_x
        n_accepted = leading_run(ok)
        next_token = residual_sample(target_probs, draft_probs, n_accepted, correction_uniform(rng, n_accepted, k))
        return Verdict(n_accepted, next_token)
