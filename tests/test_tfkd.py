"""TF-KD (regularisation) against a transcription of its authors' loss_kd_regularization (yuanli2333/
Teacher-free-Knowledge-Distillation, my_loss_function.py), golden values and one tiny run."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F

from alr.data import Batch
from alr.methods import Supervised, TeacherFreeKD
from alr.trainer import fit
from conftest import compose
from golden_values import check_golden, logits_case, loss_and_grad, train_three_steps


def _reference(logits, y, alpha=0.1, T=20.0, multiplier=100.0, correct_prob=0.99):
    """Row by row: u = 0.99 at the label, 0.01/(K−1) elsewhere; t = exp(u/T)/Σ exp(u/T); log p = z − log Σ exp z;
    KL summed over every element and divided by B·K (torch 1.2's KLDivLoss "mean"), times the multiplier."""
    B, K = logits.shape
    ce, kl = 0.0, 0.0
    for i in range(B):
        u = torch.full((K,), (1 - correct_prob) / (K - 1))
        u[int(y[i])] = correct_prob
        t = torch.exp(u / T) / torch.exp(u / T).sum()
        log_p = logits[i] - torch.log(torch.exp(logits[i]).sum())
        ce = ce - log_p[int(y[i])]
        kl = kl + sum(t[j] * (torch.log(t[j]) - log_p[j]) for j in range(K))
    return (1 - alpha) * ce / B + alpha * multiplier * kl / (B * K)


SETTINGS = [(0.1, 20.0, 100.0, 0.99), (0.5, 1.0, 1.0, 0.9), (0.95, 40.0, 50.0, 0.99)]


@pytest.mark.parametrize("alpha,T,m,a", SETTINGS)
@pytest.mark.parametrize("B,K", [(1, 2), (7, 5), (16, 10)])
def test_loss_and_gradient_match_the_authors_formula(B: int, K: int, alpha: float, T: float, m: float, a: float):
    logits, y = logits_case(B, K, seed=B * K)
    crit = TeacherFreeKD(alpha, T, m, a)
    loss, grad = loss_and_grad(crit, logits, y)
    ref, ref_grad = loss_and_grad(lambda z, t: _reference(z, t, alpha, T, m, a), logits, y)
    torch.testing.assert_close(loss, ref)
    torch.testing.assert_close(grad, ref_grad)
    # closed form: the teacher sums to 1, so ∂/∂z of −Σ t·log p is p − t
    p, teacher = torch.softmax(logits, 1), crit.teacher(y, K)
    closed = (1 - alpha) * (p - torch.eye(K)[y]) / B + alpha * m * (p - teacher) / (B * K)
    torch.testing.assert_close(grad, closed)
    terms = crit.last_terms
    torch.testing.assert_close(loss, (1 - alpha) * terms["L_hard"] + alpha * terms["L_reg"])
    assert all(not t.requires_grad and t.dim() == 0 for t in terms.values())


def test_the_virtual_teacher_is_a_softmax_of_the_probabilities_over_T():
    """At K = 100, T = 20 the softened teacher is close to uniform: 1.05 % on the label."""
    K, T, a = 100, 20.0, 0.99
    hi, lo = math.exp(a / T), math.exp((1 - a) / (K - 1) / T)
    teacher = TeacherFreeKD().teacher(torch.tensor([3, 97]), K)
    assert teacher.shape == (2, K) and teacher.dtype == torch.float32
    torch.testing.assert_close(teacher[0, 3], torch.tensor(hi / (hi + (K - 1) * lo)))
    torch.testing.assert_close(teacher[1, 0], torch.tensor(lo / (hi + (K - 1) * lo)))
    torch.testing.assert_close(teacher.sum(1), torch.ones(2))
    assert 0.0104 < teacher[0, 3].item() < 0.0106


def test_the_reduction_is_the_element_wise_mean_so_a_multiplier_of_K_gives_the_batch_mean_kl():
    logits, y = logits_case(8, 10)
    crit = TeacherFreeKD(alpha=1.0, multiplier=10.0)
    loss = crit(logits, y)
    teacher = crit.teacher(y, 10)
    batchmean = F.kl_div(F.log_softmax(logits, 1), teacher, reduction="batchmean")
    torch.testing.assert_close(loss, batchmean)
    torch.testing.assert_close(crit.last_terms["L_hard"], F.cross_entropy(logits, y))


def test_three_sgd_steps_match_the_authors_formula():
    method = Supervised(TeacherFreeKD())
    ours = train_three_steps(lambda m, x, y: method(m, Batch(x, y)).loss)
    ref = train_three_steps(lambda m, x, y: _reference(m(x), y))
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a, b)


def test_golden_values():
    logits, y = logits_case(4, 5, seed=7)
    crit = TeacherFreeKD()
    loss, grad = loss_and_grad(crit, logits, y)
    method = Supervised(TeacherFreeKD())
    weight, bias, losses = train_three_steps(lambda m, x, y: method(m, Batch(x, y)).loss)
    check_golden(
        "tfkd",
        {
            "loss": loss,
            "L_reg": crit.last_terms["L_reg"],
            "grad_logits": grad,
            "weight_after_3_steps": weight,
            "losses_3_steps": losses,
        },
    )


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"alpha": -0.1}, "alpha must be in"),
        ({"alpha": 1.5}, "alpha must be in"),
        ({"temperature": 0.0}, "temperature must be > 0"),
        ({"multiplier": -1.0}, "multiplier must be >= 0"),
        ({"correct_prob": 1.0}, "correct_prob must be in"),
    ],
)
def test_bad_arguments_are_one_line_errors(kwargs, match):
    with pytest.raises(ValueError, match=match) as e:
        TeacherFreeKD(**kwargs)
    assert "\n" not in str(e.value) and "method.module.criterion." in str(e.value)
    with pytest.raises(ValueError, match="at least 2 classes"):
        TeacherFreeKD()(torch.zeros(3, 1), torch.zeros(3, dtype=torch.long))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_logits_give_a_float32_loss(dtype: torch.dtype):
    logits, y = logits_case(6, 10, scale=20.0)
    z = logits.to(dtype).requires_grad_()
    crit = TeacherFreeKD()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = crit(z, y)
    loss.backward()
    assert loss.dtype == torch.float32 and all(t.dtype == torch.float32 for t in crit.last_terms.values())
    assert z.grad.dtype == dtype and torch.isfinite(z.grad.float()).all()
    torch.testing.assert_close(loss, _reference(z.detach().float(), y))


@pytest.mark.slow
def test_tfkd_trains_end_to_end(tmp_path):
    overrides = ["method=tfkd", "debug=fast", "trainer.batch_size=32", "trainer.epochs=1"]
    fit(compose(*overrides, f"paths.output_dir={tmp_path}"), tmp_path / "default" / "digits-digits_cnn-tfkd-s0")
    run = tmp_path / "default" / "digits-digits_cnn-tfkd-s0"
    result = json.loads((run / "result.json").read_text())
    assert result["status"] == "finished" and result["params"]["method"] == 0
    last = json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])
    assert {"train/L_hard", "train/L_reg"} <= set(last)
    assert last["train/loss"] == pytest.approx(0.9 * last["train/L_hard"] + 0.1 * last["train/L_reg"], rel=1e-5)
