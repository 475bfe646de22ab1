"""Loss values worked out by hand, gradients against closed forms and finite differences,
and sequence_logps against a per-position loop."""

import math

import pytest
import torch

from rayalign.train.losses import LOSSES, apo_down, apo_zero, dpo, kto, reward_metrics, sequence_logps, sft

BETA = 0.1


def sigmoid(x):
    return 1 / (1 + math.exp(-x))


def f64(*values):
    return torch.tensor(values, dtype=torch.float64)


def options_for(name, n):
    return {"chosen_token_count": torch.full((n,), 4)} if name == "sft" else {}


# --- values by hand --------------------------------------------------------------------------

@pytest.mark.parametrize("name, expected", [
    ("apo_zero", 1.0),                      # (1 - 1/2) + 1/2
    ("apo_down", 1.0),                      # 1/2 + (1 - 1/2)
    ("dpo", math.log(2)),                   # -log(1/2)
    ("ipo", (1 / (2 * BETA)) ** 2),         # (0 - 5)^2 = 25
    ("hinge", 1.0),                         # relu(1 - 0)
    ("kto", 0.5),                           # 1 - sigmoid(0), for each desirable and undesirable
    ("apo_zero_unpaired", 0.5),             # 1 - 1/2 and 1/2
])
def test_zero_log_ratios(name, expected):
    logps = f64(-3.0, -7.5)
    losses, _ = LOSSES[name](logps, logps - 1, logps, logps - 1, beta=BETA)
    assert torch.equal(losses, torch.full_like(losses, expected))


# policy - ref: chosen +2, rejected -1, so with beta 0.1: r_w = 0.2, r_l = -0.1, h = 3.
PC, PR, RC, RR = f64(-10.0), f64(-21.0), f64(-12.0), f64(-20.0)


@pytest.mark.parametrize("name, expected", [
    ("apo_zero", 1 - sigmoid(0.2) + sigmoid(-0.1)),   # 0.450166 + 0.475021 = 0.925187
    ("apo_down", sigmoid(0.2) + 1 - sigmoid(0.3)),    # 0.549834 + 0.425557 = 0.975391
    ("dpo", math.log(1 + math.exp(-0.3))),            # 0.554355
    ("ipo", (3 - 5) ** 2),                            # h = 3, 1/(2 beta) = 5
    ("hinge", 1 - 0.3),                               # relu(1 - 0.1 * 3)
])
def test_paired_nonzero_values(name, expected):
    losses, _ = LOSSES[name](PC, PR, RC, RR, beta=BETA)
    assert losses.item() == pytest.approx(expected, rel=1e-12)


def test_conservative_dpo():
    # 0.9 * -logsigmoid(0.3) + 0.1 * -logsigmoid(-0.3)
    expected = 0.9 * math.log(1 + math.exp(-0.3)) + 0.1 * math.log(1 + math.exp(0.3))
    losses, _ = dpo(PC, PR, RC, RR, beta=BETA, label_smoothing=0.1)
    assert losses.item() == pytest.approx(expected, rel=1e-12)
    with pytest.raises(ValueError, match="label_smoothing"):
        dpo(PC, PR, RC, RR, beta=BETA, label_smoothing=0.7)


@pytest.mark.parametrize("reference_point, expected", [
    # desirable 1 - s(0.1 * (2 - 0)), undesirable 1 - s(0.1 * (0 + 1))
    (0.0, [1 - sigmoid(0.2), 1 - sigmoid(0.1)]),
    # z = 0.5: 1 - s(0.1 * 1.5) for both
    (0.5, [1 - sigmoid(0.15), 1 - sigmoid(0.15)]),
    # a negative KL estimate is clamped to 0
    (torch.tensor(-3.0), [1 - sigmoid(0.2), 1 - sigmoid(0.1)]),
])
def test_kto_values(reference_point, expected):
    losses, _ = kto(PC, PR, RC, RR, beta=BETA, reference_point=reference_point)
    assert losses.tolist() == pytest.approx(expected, rel=1e-12)


def test_kto_weights():
    losses, _ = kto(PC, PR, RC, RR, beta=BETA, desirable_weight=2.0, undesirable_weight=0.5)
    assert losses.tolist() == pytest.approx([2 * (1 - sigmoid(0.2)), 0.5 * (1 - sigmoid(0.1))], rel=1e-12)


def test_sft_is_per_token_nll_of_chosen():
    zeros = torch.zeros(2, dtype=torch.float64)
    losses, metrics = sft(f64(-12.0, -5.0), f64(-1.0, -1.0), zeros, zeros, beta=BETA,
                          chosen_token_count=torch.tensor([4, 2]))
    assert losses.tolist() == pytest.approx([3.0, 2.5])
    assert metrics["rewards/chosen"].item() == pytest.approx(BETA * -8.5)   # 0.1 * mean(-12, -5)


# --- gradients ---------------------------------------------------------------------------------

def grads(loss_fn, pc, pr, rc, rr, **options):
    pc, pr = pc.clone().requires_grad_(), pr.clone().requires_grad_()
    losses, _ = loss_fn(pc, pr, rc, rr, beta=BETA, **options)
    losses.sum().backward()
    return pc.grad, pr.grad


def random_logps(n=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [-20 * torch.rand(n, generator=g, dtype=torch.float64) for _ in range(4)]


def test_apo_zero_gradient_closed_form():
    pc, pr, rc, rr = random_logps()
    s_w, s_l = torch.sigmoid(BETA * (pc - rc)), torch.sigmoid(BETA * (pr - rr))
    d_chosen, d_rejected = grads(apo_zero, pc, pr, rc, rr)
    assert torch.allclose(d_chosen, -BETA * s_w * (1 - s_w))
    assert torch.allclose(d_rejected, BETA * s_l * (1 - s_l))


def test_apo_down_gradient_closed_form():
    pc, pr, rc, rr = random_logps()
    r_w, r_l = BETA * (pc - rc), BETA * (pr - rr)
    s_w, s_m = torch.sigmoid(r_w), torch.sigmoid(r_w - r_l)
    d_chosen, d_rejected = grads(apo_down, pc, pr, rc, rr)
    assert torch.allclose(d_chosen, BETA * (s_w * (1 - s_w) - s_m * (1 - s_m)))
    assert torch.allclose(d_rejected, BETA * s_m * (1 - s_m))


def test_dpo_gradient_closed_form():
    pc, pr, rc, rr = random_logps()
    s_m = torch.sigmoid(BETA * ((pc - rc) - (pr - rr)))
    d_chosen, d_rejected = grads(dpo, pc, pr, rc, rr)
    assert torch.allclose(d_chosen, -BETA * (1 - s_m))
    assert torch.allclose(d_rejected, BETA * (1 - s_m))


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_gradcheck(name):
    pc, pr, rc, rr = random_logps(n=5, seed=1)
    options = options_for(name, 5)

    def total(pc, pr, rc, rr):
        return LOSSES[name](pc, pr, rc, rr, beta=BETA, **options)[0]

    inputs = tuple(x.requires_grad_() for x in (pc, pr, rc, rr))
    assert torch.autograd.gradcheck(total, inputs)


@pytest.mark.parametrize("name", ["kto", "apo_zero_unpaired"])
def test_gradcheck_unpaired_unequal_lengths(name):
    pc, _, rc, _ = random_logps(n=3, seed=2)
    _, pr, _, rr = random_logps(n=5, seed=3)
    inputs = tuple(x.requires_grad_() for x in (pc, pr, rc, rr))
    assert torch.autograd.gradcheck(lambda *xs: LOSSES[name](*xs, beta=BETA)[0], inputs)


# --- direction of a gradient step ------------------------------------------------------------

def test_apo_zero_step_raises_chosen_lowers_rejected():
    zeros = torch.zeros(1, dtype=torch.float64)
    d_chosen, d_rejected = grads(apo_zero, zeros, zeros, zeros, zeros)
    # At r = 0: dL/dchosen = -beta/4, dL/drejected = +beta/4; descent moves against them.
    assert d_chosen.item() == pytest.approx(-BETA / 4)
    assert d_rejected.item() == pytest.approx(BETA / 4)


def test_apo_down_lowers_both_rejected_more():
    zeros = torch.zeros(1, dtype=torch.float64)
    d_chosen, d_rejected = grads(apo_down, zeros, zeros, zeros, zeros)
    # At r = 0 the two chosen terms cancel: beta * s'(0) - beta * s'(0) = beta/4 - beta/4 = 0,
    # so the first step only lowers the rejected (dL/drejected = beta * s'(0) = beta/4).
    assert d_chosen.item() == 0.0
    assert d_rejected.item() == pytest.approx(BETA / 4)
    # Once r_l < 0, s'(r_w) > s'(r_w - r_l) and the chosen is pushed down as well.
    pc, pr = zeros.clone(), zeros.clone()
    for _ in range(5):
        d_chosen, d_rejected = grads(apo_down, pc, pr, zeros, zeros)
        pc, pr = pc - 10 * d_chosen, pr - 10 * d_rejected
    assert pr.item() < pc.item() < 0


# --- metrics -----------------------------------------------------------------------------------

def test_reward_metrics_by_value():
    r_w, r_l = f64(0.2, 0.0, -0.1), f64(0.1, 0.0, 0.3)
    metrics = reward_metrics(r_w, r_l)
    assert metrics["rewards/chosen"].item() == pytest.approx(0.1 / 3)
    assert metrics["rewards/rejected"].item() == pytest.approx(0.4 / 3)
    assert metrics["rewards/margins"].item() == pytest.approx(-0.1)      # mean(0.1, 0, -0.4)
    assert metrics["rewards/accuracies"].item() == pytest.approx(1 / 3)  # the tie does not count


def test_loss_metrics_are_detached_rewards():
    pc = f64(-10.0, -4.0).requires_grad_()
    _, metrics = apo_zero(pc, f64(-21.0, -4.0), f64(-12.0, -4.0), f64(-20.0, -4.0), beta=BETA)
    # r_w = (0.2, 0), r_l = (-0.1, 0)
    assert metrics["rewards/chosen"].item() == pytest.approx(0.1)
    assert metrics["rewards/rejected"].item() == pytest.approx(-0.05)
    assert metrics["rewards/margins"].item() == pytest.approx(0.15)
    assert metrics["rewards/accuracies"].item() == 0.5
    assert not any(value.requires_grad for value in metrics.values())


@pytest.mark.parametrize("name", ["kto", "apo_zero_unpaired"])
def test_unpaired_unequal_lengths(name):
    losses, metrics = LOSSES[name](f64(-1.0, -2.0), f64(-3.0, -4.0, -5.0), f64(-2.0, -2.0),
                                   f64(-3.0, -3.0, -3.0), beta=BETA)
    assert losses.shape == (5,)
    # r_w = (0.1, 0), r_l = (0, -0.1, -0.2)
    assert metrics["rewards/margins"].item() == pytest.approx(0.05 - (-0.1))
    assert math.isnan(metrics["rewards/accuracies"].item())
    if name == "apo_zero_unpaired":
        assert losses.tolist() == pytest.approx(
            [1 - sigmoid(0.1), 0.5, 0.5, sigmoid(-0.1), sigmoid(-0.2)], rel=1e-12)


# --- errors --------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", sorted(LOSSES))
def test_unknown_option_names_it(name):
    with pytest.raises(TypeError, match="'label_smoothin'"):
        LOSSES[name](PC, PR, RC, RR, beta=BETA, label_smoothin=0.1, **options_for(name, 1))


def test_sft_without_token_count():
    with pytest.raises(ValueError, match="chosen_token_count"):
        sft(PC, PR, RC, RR, beta=BETA)


# --- sequence_logps ----------------------------------------------------------------------------

V = 11


def hand_logps(logits, labels, mask):
    total = 0.0
    for t in range(logits.shape[0] - 1):
        if mask[t + 1]:
            total += torch.log_softmax(logits[t].double(), -1)[labels[t + 1]].item()
    return total


def make_sequence(prompt_len, completion_len, seed):
    g = torch.Generator().manual_seed(seed)
    n = prompt_len + completion_len
    logits = 3 * torch.randn(n, V, generator=g)
    labels = torch.randint(0, V, (n,), generator=g)
    mask = torch.tensor([0] * prompt_len + [1] * completion_len)
    return logits, labels, mask


SEQUENCES = [make_sequence(3, 4, 0), make_sequence(2, 6, 1), make_sequence(5, 1, 2)]


def test_sequence_logps_matches_hand_loop():
    for logits, labels, mask in SEQUENCES:
        summed, counts = sequence_logps(logits[None], labels[None], mask[None])
        assert summed.item() == pytest.approx(hand_logps(logits, labels, mask), rel=1e-5)
        assert counts.item() == mask[1:].sum().item()


@pytest.mark.parametrize("side", ["right", "left"])
@pytest.mark.parametrize("pad_label", [-100, V + 5, 0])
def test_sequence_logps_padding_is_ignored(side, pad_label):
    width = max(len(labels) for _, labels, _ in SEQUENCES) + 2
    g = torch.Generator().manual_seed(3)
    logits = 50 * torch.randn(len(SEQUENCES), width, V, generator=g)   # garbage at padding positions
    labels = torch.full((len(SEQUENCES), width), pad_label)
    mask = torch.zeros(len(SEQUENCES), width, dtype=torch.long)
    for i, (seq_logits, seq_labels, seq_mask) in enumerate(SEQUENCES):
        n = len(seq_labels)
        span = slice(0, n) if side == "right" else slice(width - n, width)
        logits[i, span], labels[i, span], mask[i, span] = seq_logits, seq_labels, seq_mask
    summed, counts = sequence_logps(logits, labels, mask)
    for i, (seq_logits, seq_labels, seq_mask) in enumerate(SEQUENCES):
        alone, alone_count = sequence_logps(seq_logits[None], seq_labels[None], seq_mask[None])
        assert summed[i].item() == pytest.approx(alone.item(), rel=1e-6)
        assert counts[i] == alone_count[0]


def test_sequence_logps_bf16_is_computed_in_float32():
    g = torch.Generator().manual_seed(4)
    logits = 3 * torch.randn(2, 24, V, generator=g)
    labels = torch.randint(0, V, (2, 24), generator=g)
    mask = torch.ones(2, 24, dtype=torch.long)
    exact, _ = sequence_logps(logits, labels, mask)
    low, _ = sequence_logps(logits.bfloat16(), labels, mask)
    upcast, _ = sequence_logps(logits.bfloat16().float(), labels, mask)
    assert low.dtype == torch.float32
    assert torch.equal(low, upcast)    # the only loss of precision is rounding the logits
    assert torch.allclose(low, exact, rtol=1e-2)
