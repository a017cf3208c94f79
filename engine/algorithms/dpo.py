"""DPO and its reference-based variants, as the offline loop sees them.

Hyper-parameters (presets/dpo.yaml, ipo.yaml, robust_dpo.yaml, hinge.yaml, rpo.yaml):
- beta: KL strength (DPO paper 0.1; 0.5 on TL;DR); for IPO it is tau, for hinge the RSO beta (0.05).
- loss_type: sigmoid (DPO; with label_smoothing > 0 = cDPO), robust, hinge, ipo.
- label_smoothing: assumed label-flip rate for cDPO / robust DPO (0.1 typical).
- rpo_alpha: weight of the NLL on chosen (RPO, Pang et al. 2024: alpha = 1); 0 = plain DPO.
IPO compares per-token-mean log-ratios (its target margin 1/(2 tau) is in per-token nats);
the others compare sums over the completion.

Logged: rewards/chosen, rewards/rejected, rewards/margin, rewards/accuracy,
logps/chosen, logps/rejected (per-token means for IPO, as its loss uses), nll_loss (RPO), and for
every preference method lengths/chosen, lengths/rejected (completion tokens), logits/chosen,
logits/rejected (mean logit over vocabulary and completion tokens) and policy/entropy.
"""

from __future__ import annotations

from engine.algorithms.pairs import PairMethod
from engine.losses.dpo import dpo_loss, rpo_loss


class DPO(PairMethod):
    needs_reference = True

    def pair_loss(self, out, pairs, batch):
        spec, ref_logps = self.spec, batch["ref_logps"]
        if spec.loss_type == "ipo":
            # IPO works on per-token means: divide the reference sums by the same token counts.
            policy_scores, ref_scores = out.means, ref_logps / out.counts.clamp(min=1)
        else:
            policy_scores, ref_scores = out.sums, ref_logps
        scores = (policy_scores[:pairs], policy_scores[pairs:], ref_scores[:pairs], ref_scores[pairs:])
        if spec.rpo_alpha > 0:
            return rpo_loss(
                *scores,
                out.counts[:pairs],
                spec.beta,
                spec.rpo_alpha,
                loss_type=spec.loss_type,
                label_smoothing=spec.label_smoothing,
            )
        return dpo_loss(*scores, spec.beta, label_smoothing=spec.label_smoothing, loss_type=spec.loss_type)
