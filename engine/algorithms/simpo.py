"""SimPO (Meng et al. 2024): reference-free, length-normalised, with a target margin.

loss = -log sigmoid(beta * mean logp(y_w) - beta * mean logp(y_l) - gamma), gamma = gamma_beta_ratio * beta.
Defaults (presets/simpo.yaml): beta 2.0-2.5, gamma_beta_ratio 0.5 (grid 0-1), lr 3e-7 to 1e-6.
No reference model is loaded.
"""

from __future__ import annotations

from engine.algorithms.pairs import PairMethod
from engine.losses.dpo import simpo_loss


class SimPO(PairMethod):
    def pair_loss(self, out, pairs, batch):
        return simpo_loss(
            out.means[:pairs],
            out.means[pairs:],
            self.spec.beta,
            self.spec.gamma_beta_ratio,
            label_smoothing=self.spec.label_smoothing,
        )
