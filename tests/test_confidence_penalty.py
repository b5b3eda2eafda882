"""The confidence penalty against a transcription of the paper's objective (arXiv:1701.06548), golden values
and one tiny run."""

from __future__ import annotations

import json
import math

import pytest
import torch

from alr.data import Batch
from alr.methods import ConfidencePenalty, Supervised
from alr.trainer import fit
from conftest import compose
from golden_values import check_golden, logits_case, loss_and_grad, train_three_steps


def _reference(logits, y, beta=0.1, threshold=None):
    """Per sample: −log p_y − β·H(p), or −log p_y + β·max(0, Γ − H(p)); averaged over the batch."""
    B, K = logits.shape
    total = 0.0
    for i in range(B):
        p = torch.softmax(logits[i], dim=0)
        entropy = -sum(p[j] * torch.log(p[j]) for j in range(K))
        ce = -torch.log(p[int(y[i])])
        total = total + (ce - beta * entropy if threshold is None else ce + beta * torch.relu(threshold - entropy))
    return total / B


@pytest.mark.parametrize("threshold", [None, 1.0])
@pytest.mark.parametrize("beta", [0.1, 2.0])
@pytest.mark.parametrize("B,K", [(1, 2), (7, 5), (16, 10)])
def test_loss_and_gradient_match_the_papers_objective(B: int, K: int, beta: float, threshold):
    logits, y = logits_case(B, K, seed=B * K)
    crit = ConfidencePenalty(beta, threshold)
    loss, grad = loss_and_grad(crit, logits, y)
    ref, ref_grad = loss_and_grad(lambda z, t: _reference(z, t, beta, threshold), logits, y)
    torch.testing.assert_close(loss, ref)
    torch.testing.assert_close(grad, ref_grad)
    # and the closed form: ∂H/∂z = −p·(log p + H), so ∂L/∂z = (p − onehot + β·p·(log p + H)·[H < Γ]) / B
    p = torch.softmax(logits, 1)
    ent = -(p * p.log()).sum(1, keepdim=True)
    active = torch.ones_like(ent) if threshold is None else (ent < threshold).float()
    closed = (p - torch.eye(K)[y] + beta * active * p * (p.log() + ent)) / B
    torch.testing.assert_close(grad, closed)
    terms = crit.last_terms
    torch.testing.assert_close(terms["H"], ent.mean())
    torch.testing.assert_close(loss, terms["L_hard"] + terms["L_reg"])
    assert all(not t.requires_grad and t.dim() == 0 for t in terms.values())


@pytest.mark.parametrize("threshold", [None, 1.2])
def test_three_sgd_steps_match_the_papers_objective(threshold):
    method = Supervised(ConfidencePenalty(0.5, threshold))
    ours = train_three_steps(lambda m, x, y: method(m, Batch(x, y)).loss)
    ref = train_three_steps(lambda m, x, y: _reference(m(x), y, 0.5, threshold))
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a, b)


def test_golden_values():
    logits, y = logits_case(4, 5, seed=7)
    crit = ConfidencePenalty()
    loss, grad = loss_and_grad(crit, logits, y)
    hinge = ConfidencePenalty(0.1, threshold=1.0)
    hinge_loss, hinge_grad = loss_and_grad(hinge, logits, y)
    method = Supervised(ConfidencePenalty())
    weight, bias, losses = train_three_steps(lambda m, x, y: method(m, Batch(x, y)).loss)
    check_golden(
        "cp",
        {
            "loss": loss,
            "H": crit.last_terms["H"],
            "grad_logits": grad,
            "hinge_loss": hinge_loss,
            "hinge_grad_logits": hinge_grad,
            "weight_after_3_steps": weight,
            "losses_3_steps": losses,
        },
    )


def test_the_hinge_penalises_only_entropies_below_the_threshold():
    K = 5
    confident = torch.tensor([[6.0, 0.0, 0.0, 0.0, 0.0]])  # H ≈ 0.07 nats
    uniform = torch.zeros(1, K)  # H = log 5 ≈ 1.61
    logits, y = torch.cat([confident, uniform]), torch.tensor([0, 3])
    plain_loss, plain_grad = loss_and_grad(ConfidencePenalty(beta=0.0), logits, y)  # the cross entropy alone
    cp_loss, cp_grad = loss_and_grad(ConfidencePenalty(beta=0.5), logits, y)

    # Γ between the two entropies: row 0 gets the penalty's gradient, row 1 the cross entropy's only
    crit = ConfidencePenalty(beta=0.5, threshold=1.0)
    loss, grad = loss_and_grad(crit, logits, y)
    torch.testing.assert_close(grad[0], cp_grad[0])
    torch.testing.assert_close(grad[1], plain_grad[1])
    H0 = crit.last_terms["H"] * 2 - math.log(K)
    torch.testing.assert_close(loss, plain_loss + 0.5 * (1.0 - H0) / 2)

    # Γ below every entropy: no penalty at all; Γ above log K: −β·H plus a constant, the same gradient
    loss, grad = loss_and_grad(ConfidencePenalty(beta=0.5, threshold=1e-3), logits, y)
    torch.testing.assert_close(loss, plain_loss)
    torch.testing.assert_close(grad, plain_grad)
    loss, grad = loss_and_grad(ConfidencePenalty(beta=0.5, threshold=2.0), logits, y)
    torch.testing.assert_close(loss, cp_loss + 0.5 * 2.0)
    torch.testing.assert_close(grad, cp_grad)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"beta": -0.1}, "beta must be >= 0"),
        ({"beta": float("nan")}, "beta must be >= 0"),
        ({"threshold": 0.0}, r"threshold \(Γ, in nats\) must be > 0 or null"),
        ({"threshold": -1.0}, "threshold"),
        ({"threshold": float("inf")}, "threshold"),
    ],
)
def test_bad_arguments_are_one_line_errors(kwargs, match):
    with pytest.raises(ValueError, match=match) as e:
        ConfidencePenalty(**kwargs)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("threshold", [None, 1.0])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_logits_give_a_float32_loss(dtype: torch.dtype, threshold):
    logits, y = logits_case(6, 10, scale=20.0)
    z = logits.to(dtype).requires_grad_()
    crit = ConfidencePenalty(0.1, threshold)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = crit(z, y)
    loss.backward()
    assert loss.dtype == torch.float32 and all(t.dtype == torch.float32 for t in crit.last_terms.values())
    assert z.grad.dtype == dtype and torch.isfinite(z.grad.float()).all()
    torch.testing.assert_close(loss, _reference(z.detach().float(), y, 0.1, threshold))


@pytest.mark.slow
def test_cp_trains_end_to_end(tmp_path):
    overrides = ["method=cp", "debug=fast", "trainer.batch_size=32", "trainer.epochs=1"]
    fit(compose(*overrides, f"paths.output_dir={tmp_path}"), tmp_path / "default" / "digits-digits_cnn-cp-s0")
    run = tmp_path / "default" / "digits-digits_cnn-cp-s0"
    result = json.loads((run / "result.json").read_text())
    assert result["status"] == "finished" and result["params"]["method"] == 0
    last = json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])
    assert {"train/L_hard", "train/L_reg", "train/H"} <= set(last)
    assert last["train/loss"] == pytest.approx(last["train/L_hard"] + last["train/L_reg"], rel=1e-5)
    assert last["train/L_reg"] == pytest.approx(-0.1 * last["train/H"], rel=1e-5)
