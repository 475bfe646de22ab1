"""Preference losses as pure functions of per-sequence log-probs, and the log-prob computation.

Every loss has the signature

    loss(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps,
         *, beta, **options) -> (per_example_losses, metrics)

Inputs are 1-D tensors of log-probs SUMMED over completion tokens. The trainer takes the mean
of `per_example_losses`. `metrics` holds detached scalars: rewards/chosen (mean r_w),
rewards/rejected (mean r_l), rewards/margins and rewards/accuracies, where
r_w = beta * (policy_chosen - ref_chosen) and r_l likewise. Options are keyword-only
parameters, so a misspelt option raises TypeError naming it.

Unpaired losses (kto, apo_zero_unpaired) treat every chosen completion as a desirable example
and every rejected one as an undesirable example, so the chosen and rejected tensors may have
different lengths (B_d and B_u); their losses are cat([desirable, undesirable]).
"""

import math

import torch
import torch.nn.functional as F


def sequence_logps(logits, labels, completion_mask):
    """Sum the log-probs of completion tokens per sequence, in float32.

    logits [B, T, V] predict the next token: position t scores labels[:, t + 1]. Only targets
    where completion_mask[:, t + 1] is 1 count (position 0 has no prediction and never counts).
    Labels at masked positions may hold anything (-100, a pad id). Returns (summed_logps [B]
    float32, token_counts [B] int64).
    """
    mask = completion_mask[:, 1:].bool()
    # Masked labels may be -100 or out of range; any valid id works since they are zeroed below.
    targets = torch.where(mask, labels[:, 1:], torch.zeros_like(labels[:, 1:]))
    shifted = logits[:, :-1].float()
    nll = F.cross_entropy(shifted.flatten(0, 1), targets.flatten(), reduction="none")
    token_logps = -nll.view_as(targets).masked_fill(~mask, 0.0)
    return token_logps.sum(-1), mask.sum(-1)


def per_token_nll(summed_logps, token_counts):
    """Mean negative log-likelihood per completion token; a count of 0 counts as 1 (so 0, not NaN)."""
    return -summed_logps / token_counts.clamp(min=1)


def reward_metrics(r_w, r_l):
    """Detached reward statistics. For unequal lengths (unpaired batches) there is no pairing:
    margins is mean(r_w) - mean(r_l) and accuracies is NaN."""
    r_w, r_l = r_w.detach(), r_l.detach()
    if r_w.shape == r_l.shape:
        margins = (r_w - r_l).mean()
        accuracies = (r_w > r_l).to(r_w.dtype).mean()
    else:
        margins = r_w.mean() - r_l.mean()
        accuracies = torch.tensor(math.nan, dtype=r_w.dtype, device=r_w.device)
    return {
        "rewards/chosen": r_w.mean(),
        "rewards/rejected": r_l.mean(),
        "rewards/margins": margins,
        "rewards/accuracies": accuracies,
    }


def apo_zero(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, *, beta):
    """APO-zero: (1 - sigmoid(r_w)) + sigmoid(r_l). Raises winners and lowers losers; for winners
    better than the model (such as CLAIR revisions)."""
    r_w = beta * (policy_chosen_logps - ref_chosen_logps)
    r_l = beta * (policy_rejected_logps - ref_rejected_logps)
    losses = (1 - torch.sigmoid(r_w)) + torch.sigmoid(r_l)
    return losses, reward_metrics(r_w, r_l)


def apo_down(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, *, beta):
    """APO-down: sigmoid(r_w) + (1 - sigmoid(r_w - r_l)). Lowers both, losers more; for a model
    already better than the winners."""
    r_w = beta * (policy_chosen_logps - ref_chosen_logps)
    r_l = beta * (policy_rejected_logps - ref_rejected_logps)
    losses = torch.sigmoid(r_w) + (1 - torch.sigmoid(r_w - r_l))
    return losses, reward_metrics(r_w, r_l)


def dpo(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, *, beta,
        label_smoothing=0.0):
    """DPO (sigmoid): -logsigmoid(r_w - r_l). With label_smoothing eps > 0 this is conservative
    DPO, which assumes a fraction eps of the labels is flipped:
    -(1 - eps) * logsigmoid(m) - eps * logsigmoid(-m)."""
    if not 0.0 <= label_smoothing < 0.5:
        raise ValueError(f"dpo label_smoothing must be in [0, 0.5), got {label_smoothing}")
    r_w = beta * (policy_chosen_logps - ref_chosen_logps)
    r_l = beta * (policy_rejected_logps - ref_rejected_logps)
    margin = r_w - r_l
    losses = -(1 - label_smoothing) * F.logsigmoid(margin) - label_smoothing * F.logsigmoid(-margin)
    return losses, reward_metrics(r_w, r_l)


def ipo(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, *, beta):
    """IPO: (h - 1/(2 beta))^2 with h = (pc - rc) - (pr - rr), the log-ratio difference NOT
    multiplied by beta. The IPO paper and TRL average log-probs over tokens; callers that want
    that pass length-averaged log-probs instead of sums."""
    chosen_ratio = policy_chosen_logps - ref_chosen_logps
    rejected_ratio = policy_rejected_logps - ref_rejected_logps
    losses = (chosen_ratio - rejected_ratio - 1 / (2 * beta)) ** 2
    return losses, reward_metrics(beta * chosen_ratio, beta * rejected_ratio)


def hinge(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, *, beta):
    """SLiC hinge: relu(1 - beta * h) with h the log-ratio difference, i.e. relu(1 - (r_w - r_l))."""
    r_w = beta * (policy_chosen_logps - ref_chosen_logps)
    r_l = beta * (policy_rejected_logps - ref_rejected_logps)
    losses = torch.relu(1 - (r_w - r_l))
    return losses, reward_metrics(r_w, r_l)


def sft(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, *, beta,
        chosen_token_count=None):
    """SFT on winners: per-token negative log-likelihood -policy_chosen_logps / chosen_token_count.

    Requires the option chosen_token_count (1-D tensor of completion token counts, as returned
    by sequence_logps); a count of 0 is treated as 1 so an empty completion gives 0, not NaN.
    Rejected log-probs do not enter the loss; the reward metrics are still computed from the
    given references (which may be zeros)."""
    if chosen_token_count is None:
        raise ValueError("the sft loss needs the option chosen_token_count "
                         "(completion token counts of the chosen sequences)")
    losses = per_token_nll(policy_chosen_logps, chosen_token_count)
    r_w = beta * (policy_chosen_logps - ref_chosen_logps)
    r_l = beta * (policy_rejected_logps - ref_rejected_logps)
    return losses, reward_metrics(r_w, r_l)


def kto(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, *, beta,
        reference_point=0.0, desirable_weight=1.0, undesirable_weight=1.0):
    """KTO (unpaired; see the module docstring). With log-ratios lr = policy - ref and the
    reference point z (an estimate of KL(policy || ref), detached and clamped at >= 0 as in the
    KTO paper): desirable losses desirable_weight * (1 - sigmoid(beta * (lr_w - z))),
    undesirable losses undesirable_weight * (1 - sigmoid(beta * (z - lr_l)))."""
    z = torch.as_tensor(reference_point, dtype=policy_chosen_logps.dtype,
                        device=policy_chosen_logps.device).detach().clamp(min=0)
    chosen_ratio = policy_chosen_logps - ref_chosen_logps
    rejected_ratio = policy_rejected_logps - ref_rejected_logps
    desirable = desirable_weight * (1 - torch.sigmoid(beta * (chosen_ratio - z)))
    undesirable = undesirable_weight * (1 - torch.sigmoid(beta * (z - rejected_ratio)))
    return torch.cat([desirable, undesirable]), reward_metrics(beta * chosen_ratio, beta * rejected_ratio)


def apo_zero_unpaired(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps,
                      *, beta):
    """Unpaired APO-zero (see the module docstring): desirable 1 - sigmoid(r_w),
    undesirable sigmoid(r_l)."""
    r_w = beta * (policy_chosen_logps - ref_chosen_logps)
    r_l = beta * (policy_rejected_logps - ref_rejected_logps)
    losses = torch.cat([1 - torch.sigmoid(r_w), torch.sigmoid(r_l)])
    return losses, reward_metrics(r_w, r_l)


LOSSES = {
    "apo_zero": apo_zero,
    "apo_down": apo_down,
    "dpo": dpo,
    "ipo": ipo,
    "hinge": hinge,
    "sft": sft,
    "kto": kto,
    "apo_zero_unpaired": apo_zero_unpaired,
}
