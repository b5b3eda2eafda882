"""LS++ against a transcription of its authors' formula (s-chh/LSPP, lspp.py), golden values and one tiny run."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from alr.data import Batch
from alr.methods import LabelSmoothingPP, RunFacts, Supervised
from alr.trainer import fit
from conftest import compose
from golden_values import check_golden, train_three_steps


def _c_full(C: torch.Tensor) -> torch.Tensor:
    """softmax of each row of C with a zero put in at the diagonal, row by row: K×K."""
    K = C.shape[0]
    rows = torch.softmax(C, dim=1)
    return torch.stack([torch.cat([rows[k, :k], rows.new_zeros(1), rows[k, k:]]) for k in range(K)])


def _reference(logits, C, y, alpha=0.1, eps=1e-6):
    """The authors' loss written out: q = (1−α)·onehot + α·C[y]; ½[−Σ p̂ log(q+ε) − Σ q̂ log(p+ε)], batch mean."""
    B, K = logits.shape
    full = _c_full(C)
    q = torch.stack([(1 - alpha) * torch.eye(K)[int(y[i])] + alpha * full[int(y[i])] for i in range(B)])
    p = torch.softmax(logits, dim=1)
    fwd = sum(-(p[i].detach() * torch.log(q[i] + eps)).sum() for i in range(B)) / B
    bck = sum(-(q[i].detach() * torch.log(p[i] + eps)).sum() for i in range(B)) / B
    return (fwd + bck) / 2, fwd, bck


def _case(B: int, K: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    logits = 3 * torch.randn(B, K, generator=g)
    C = 2 * torch.randn(K, K - 1, generator=g)
    y = torch.randint(0, K, (B,), generator=g)
    return logits, C, y


@pytest.mark.parametrize("K", [2, 5, 10])
@pytest.mark.parametrize("B", [1, 7])
def test_loss_and_gradients_match_the_authors_formula(B: int, K: int):
    logits, C, y = _case(B, K, seed=B * K)
    crit = LabelSmoothingPP(K)
    with torch.no_grad():
        crit.C.copy_(C)
    z = logits.clone().requires_grad_()
    loss = crit(z, y)
    loss.backward()

    z_ref, C_ref = logits.clone().requires_grad_(), C.clone().requires_grad_()
    ref, fwd, bck = _reference(z_ref, C_ref, y)
    ref.backward()
    torch.testing.assert_close(loss, ref)
    torch.testing.assert_close(crit.last_terms["L_C"], fwd.detach())
    torch.testing.assert_close(crit.last_terms["L_tgt"], bck.detach())
    torch.testing.assert_close(crit.last_terms["L_hard"], F.cross_entropy(logits, y))
    torch.testing.assert_close(z.grad, z_ref.grad)
    torch.testing.assert_close(crit.C.grad, C_ref.grad)
    assert all(not t.requires_grad and t.dim() == 0 for t in crit.last_terms.values())


def test_the_backbone_gets_half_the_target_cross_entropy_gradient_and_C_half_its_own():
    """∂L/∂z = ½·∂CE(p, q̂)/∂z (C's term reaches only C), ∂L/∂C = ½·∂CE(q, p̂)/∂C; rows of unseen labels get none."""
    logits, C, y = _case(6, 5, seed=1)
    y = torch.tensor([0, 0, 1, 3, 3, 3])  # class 2 and 4 absent
    crit = LabelSmoothingPP(5)
    with torch.no_grad():
        crit.C.copy_(C)
    z = logits.clone().requires_grad_()
    crit(z, y).backward()
    z_ref, C_ref = logits.clone().requires_grad_(), C.clone().requires_grad_()
    _, fwd, bck = _reference(z_ref, C_ref, y)
    (g_z,) = torch.autograd.grad(bck, z_ref, retain_graph=True)
    (g_c,) = torch.autograd.grad(fwd, C_ref)
    torch.testing.assert_close(z.grad, g_z / 2)
    torch.testing.assert_close(crit.C.grad, g_c / 2)
    assert torch.count_nonzero(crit.C.grad[[2, 4]]) == 0


def _train_three_steps(crit_or_ref, seed: int = 0):
    """A linear classifier and C trained by 3 SGD steps as the authors' solver.py does (one optimizer, weight
    decay on C too: --apply_wd 1); returns the final weight, bias, C and the three losses."""
    if crit_or_ref == "reference":
        C = torch.nn.Parameter(torch.zeros(5, 4))
        extra, step = [C], lambda model, x, y: _reference(model(x), C, y)[0]
    else:
        method = Supervised(LabelSmoothingPP(5))
        C = method.criterion.C
        extra, step = list(method.parameters()), lambda model, x, y: method(model, Batch(x, y)).loss
    weight, bias, losses = train_three_steps(step, seed, extra)
    return weight, bias, C.detach().clone(), losses


def test_three_sgd_steps_match_the_authors_formula():
    ours, ref = _train_three_steps("ours"), _train_three_steps("reference")
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a, b)
    assert torch.count_nonzero(ours[2]) > 0  # C has moved


def test_golden_values():
    logits, C, y = _case(4, 5, seed=7)
    crit = LabelSmoothingPP(5)
    with torch.no_grad():
        crit.C.copy_(C)
    z = logits.clone().requires_grad_()
    loss = crit(z, y)
    loss.backward()
    weight, bias, C3, losses = _train_three_steps("ours")
    check_golden(
        "lspp",
        {
            "loss": loss,
            "L_C": crit.last_terms["L_C"],
            "L_tgt": crit.last_terms["L_tgt"],
            "grad_logits": z.grad,
            "grad_C": crit.C.grad,
            "C_after_3_steps": C3,
            "losses_3_steps": losses,
        },
    )


@pytest.mark.parametrize("K", [2, 5, 100])
def test_C_starts_at_zero_and_its_snapshot_is_K_by_K_with_a_zero_diagonal(K: int):
    crit = LabelSmoothingPP(K)
    assert isinstance(crit.C, torch.nn.Parameter) and crit.C.shape == (K, K - 1)
    assert torch.count_nonzero(crit.C) == 0 and list(crit.parameters()) == [crit.C] and "C" in crit.state_dict()
    (name, M), *rest = crit.snapshots().items()
    assert name == "c_matrix" and not rest and M.shape == (K, K)
    torch.testing.assert_close(M, (1 - torch.eye(K)) / (K - 1))
    y = torch.arange(K)
    q = crit.targets(y)  # zero C: label smoothing over the other classes only
    torch.testing.assert_close(q, 0.9 * torch.eye(K) + 0.1 * (1 - torch.eye(K)) / (K - 1))


def test_snapshot_places_each_column_at_its_class():
    crit = LabelSmoothingPP(4)
    with torch.no_grad():
        crit.C[2] = torch.tensor([0.0, 0.0, 10.0])  # class 2's third residual column is class 3
        crit.C[0] = torch.tensor([10.0, 0.0, 0.0])  # class 0's first is class 1
    M = crit.c_matrix()
    assert M[2].argmax().item() == 3 and M[0].argmax().item() == 1
    assert torch.all(M.diagonal() == 0)
    torch.testing.assert_close(M, _c_full(crit.C.detach()))


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"num_classes": 1}, "num_classes >= 2"),
        ({"num_classes": 5, "alpha": 0.0}, "alpha must be in"),
        ({"num_classes": 5, "alpha": 1.0}, "alpha must be in"),
        ({"num_classes": 5, "eps": 0.0}, "eps must be > 0"),
    ],
)
def test_bad_arguments_are_one_line_errors(kwargs, match):
    with pytest.raises(ValueError, match=match) as e:
        LabelSmoothingPP(**kwargs)
    assert "\n" not in str(e.value)


def test_setup_refuses_another_class_count():
    facts = RunFacts(
        num_classes=100, num_train=10, indexed=True, epochs=1, steps_per_epoch=1, seed=0, device=torch.device("cpu")
    )
    with pytest.raises(ValueError, match="built for 10 classes but the data set has 100") as e:
        Supervised(LabelSmoothingPP(10)).setup(facts)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_logits_give_a_float32_loss(dtype: torch.dtype):
    logits, _, y = _case(6, 10)
    z = logits.to(dtype).requires_grad_()
    crit = LabelSmoothingPP(10)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = crit(z, y)
    loss.backward()
    assert loss.dtype == torch.float32 and all(t.dtype == torch.float32 for t in crit.last_terms.values())
    assert z.grad.dtype == dtype and torch.isfinite(z.grad.float()).all() and crit.C.grad.dtype == torch.float32
    torch.testing.assert_close(loss, _reference(z.detach().float(), crit.C.detach(), y)[0])


@pytest.mark.slow
def test_lspp_trains_end_to_end(tmp_path):
    overrides = ["method=lspp", "debug=fast", "trainer.batch_size=32", "trainer.epochs=1"]
    fit(compose(*overrides, f"paths.output_dir={tmp_path}"), tmp_path / "default" / "digits-digits_cnn-lspp-s0")
    run = tmp_path / "default" / "digits-digits_cnn-lspp-s0"
    assert json.loads((run / "result.json").read_text())["status"] == "finished"
    last = json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])
    assert {"train/L_hard", "train/L_tgt", "train/L_C"} <= set(last)
    assert last["train/loss"] == pytest.approx((last["train/L_tgt"] + last["train/L_C"]) / 2, rel=1e-5)
    ckpt = torch.load(run / "last.pt", weights_only=True)
    C = ckpt["method"]["criterion.C"]
    assert C.shape == (10, 9) and torch.count_nonzero(C) > 0
    assert ckpt["optimizer"]["param_groups"][1]["weight_decay"] == 5e-4  # the authors' --apply_wd 1
    M = np.load(run / "c_matrix" / "epoch_001.npy")
    assert M.shape == (10, 10) and (np.diagonal(M) == 0).all() and np.allclose(M.sum(1), 1, atol=1e-6)
