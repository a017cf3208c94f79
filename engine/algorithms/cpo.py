"""CPO (Xu et al. 2024, arXiv 2401.08417): contrastive preference optimisation, no reference model.

    loss = -log sigmoid(beta log pi(y_w|x) - beta log pi(y_l|x)) + cpo_alpha * NLL(y_w)

DPO's preference term with the reference dropped (log-probs are sums over the completion), plus
behaviour cloning on the chosen answer (its per-token mean NLL), so the chosen answer's likelihood
is pushed up rather than only the gap. No reference model is loaded: half of DPO's forward passes.

Hyper-parameters (presets/cpo.yaml): beta 0.1 (paper), cpo_alpha 1.0 (paper; 0 = the preference
term alone), lr 1e-6 for a full fine-tune (the paper trained LoRA adapters at 1e-4), 1 epoch.
Logged: rewards/chosen, rewards/rejected (beta x summed log-probs), rewards/margin,
rewards/accuracy, logps/chosen, logps/rejected, nll_loss, and the completion stats every
preference method logs (lengths/*, logits/*, policy/entropy).
"""

from __future__ import annotations

from engine.algorithms.pairs import PairMethod
from engine.losses.dpo import cpo_loss


class CPO(PairMethod):
    def pair_loss(self, out, pairs, batch):
        return cpo_loss(out.sums[:pairs], out.sums[pairs:], out.counts[:pairs], self.spec.beta, self.spec.cpo_alpha)
