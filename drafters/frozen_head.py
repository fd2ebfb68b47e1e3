"""The frozen drafter for a diffusion head's chain: propose the next transitions by reusing the target head's last
prediction, with no network call. LOSSLESS with the exact rule over Gaussian transitions.

De Bortoli, Galashov, Gretton, Doucet, "Accelerated Diffusion Models via Speculative Sampling", ICML 2025,
arXiv 2501.05370 (the training-free draft that freezes the target's prediction over the draft window).

A continuous token is the end of the target head's ancestral chain x_{j+1} = mu_p(x_j, t_j) + sigma_j eps_j
(`specdec.continuous`). After the target has evaluated its mean at an exact state x_r, its prediction there
(x0_hat, or eps) is known; the drafter rolls the next transitions out with the shared noises as if the network
kept predicting it: mu_q(x, t) = posterior mean at (x, t) with x0_hat (predict="x0") or eps (predict="eps") held
fixed, read back from the target's own mean through the diffusion schedule (`DiffLoss.frozen`). The variance is the
schedule's sigma_t, as the target's with a fixed head variance: drafter and target share every transition's
covariance, so the exact rule's reflection coupling applies and the token's law is exactly the target's. (With a
learned variance the drafted variance is the reference's, the rule's residual loop keeps the law exact.)

Why it pays: nothing to train, nothing to load, no drafter call; every round costs one target head call over the
window's states. On the continuous zoo a frozen x0_hat is accepted at 0.87 of transitions one step ahead and 0.76
four steps ahead (the trained MAR drafter: 0.76), so S sequential head calls per token become about S / 3.5.
That saves latency where head calls are latency-bound (a GPU at small batch); a compute-bound device pays for the
window's extra states. It drafts no AR steps: the loop runs gamma = 1 and the drafter needs no backbone.
"""
from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from specdec.continuous import HeadReference, roll_transitions

PREDICTIONS = ("x0", "eps")


@dataclass(frozen=True)
class FrozenHeadDrafter:
    """predict: which of the target's predictions is held fixed over the window, "x0" (x0_hat; the better one on the
    continuous zoo) or "eps"."""

    predict: str = "x0"

    name = "frozen_head"
    chain_only = True          # proposes head transitions only: no AR steps, no backbone (gamma = 1)
    lossless = True            # with a lossless chain rule (the exact rule)

    def __post_init__(self):
        if self.predict not in PREDICTIONS:
            raise ValueError(f"predict must be one of {PREDICTIONS} (the prediction to reuse), got {self.predict!r}")

    def propose(self, target, ref: HeadReference, x: Tensor, steps: Tensor, noises: Tensor,
                temperature: float) -> tuple[Tensor, Tensor, Tensor]:
        """Roll out w transitions from the exact states x [n, D] at chain indices steps LongTensor [n, w] with the
        shared noises [n, w, D] (scaled by temperature * sigma), every mean from the target's prediction at the
        reference, read back once (`target.head_frozen`).
        -> (states [n, w+1, D] (states[:, 0] = x), means [n, w, D], logvars [n, w, D])."""
        S = target.num_steps
        head = target.head_frozen(ref.state, S - 1 - ref.index, ref.mean, ref.logvar, self.predict)
        return roll_transitions(lambda state, step: head(state, S - 1 - step), x, steps, noises, temperature)
