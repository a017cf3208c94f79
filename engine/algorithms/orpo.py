"""ORPO (Hong et al. 2024): SFT on chosen plus an odds-ratio penalty on rejected; no reference.

loss = -mean logp(y_w) + lambda * -log sigmoid(log odds(y_w) - log odds(y_l)), odds from the
per-token-mean probability. `beta` holds lambda (0.1 for Mistral-ORPO, 0.2 Llama-2, 0.25 Phi-2),
as in TRL. Trained from a base model: no separate SFT stage, no reference model loaded.
"""

from __future__ import annotations

from engine.algorithms.pairs import PairMethod
from engine.losses.orpo import orpo_loss


class ORPO(PairMethod):
    def pair_loss(self, out, pairs, batch):
        return orpo_loss(out.means[:pairs], out.means[pairs:], self.spec.beta)
