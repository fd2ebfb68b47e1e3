"""What several test files share: tiny random models (they live in `specdec.testing`), greedy sampling, and the
sequence-level exactness check against an enumerable target."""
from __future__ import annotations

import torch

import specdec
from specdec import Sampling
from specdec.exactness import exact_joint, goodness_of_fit, sequence_index
from specdec.testing import perturbed_copy, tiny_gpt

__all__ = ["GREEDY", "fit_of", "perturbed_copy", "tiny_gpt"]

GREEDY = Sampling(temperature=0.0)


def fit_of(target, drafter, sampling, n=20000, seed=1234, rule=None, cond=1):
    """Generate n images of class `cond` and test them (chi-square and TVD) against the enumerated joint law of
    plain AR sampling from `target` (V ** T sequences: keep both tiny). -> (GoodnessOfFit, GenerationResult)."""
    law = exact_joint(target, torch.tensor(cond), sampling, target.num_tokens)
    res = specdec.generate(target, torch.full((n,), cond, dtype=torch.long), drafter=drafter, rule=rule,
                           sampling=sampling, seed=seed, decode=False)
    return goodness_of_fit(sequence_index(res.tokens, target.vocab_size), law), res
