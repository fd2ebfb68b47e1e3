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

from specdec.protocols import AcceptanceRule, Randomness
from specdec.types import TreeVerdict, Verdict
from verifiers._tree import recursive_rejection
from verifiers._kit import accept_run, correction_uniform, residual_sample, step_uniforms, token_probs


class ExactRule(AcceptanceRule):
    """Standard speculative sampling; vectorised over batch and draft positions."""

    lossless = True
    name = "exact"

    supports_trees = True

    def verify_tree(self, tree, target_probs: Tensor, rng: Randomness) -> TreeVerdict:
        """Recursive rejection over the tree's siblings (verifiers._tree): lossless for i.i.d., without-replacement
        and deterministic siblings, given each node's sequential q."""
        return recursive_rejection(tree.tokens, tree.parents, tree.valid(), tree.q, target_probs, rng,
                                   tree.max_depth, tree.max_children, tree.pool)

    @staticmethod
    def single_step_law(p: Tensor, q: Tensor) -> tuple[Tensor, Tensor]:
        """p, q [P, V] -> (law of the first committed token float64 [P, V] = p, acceptance sum_v min(p, q) [P])."""
        return p.double(), torch.minimum(p, q).double().sum(-1)

    def verify(self, draft_tokens: Tensor, draft_probs: Tensor, target_probs: Tensor,
               rng: Randomness) -> Verdict:
        """draft_tokens [B, k], draft_probs [B, k, V], target_probs [B, k+1, V] -> Verdict."""
        k = draft_tokens.shape[1]
        u_accept, u_sample, u_residual = step_uniforms(rng, k)
        n_accepted = accept_run(rng, token_probs(target_probs, draft_tokens), token_probs(draft_probs, draft_tokens),
                                u_accept)
        next_token = residual_sample(target_probs, draft_probs, n_accepted,
                                     correction_uniform(rng, n_accepted, k, (u_sample, u_residual)))
        return Verdict(n_accepted, next_token)
