"""ALRLoss against closed forms (eq. 4–8 of the paper; docs/deviations.md#alrs-loss)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from alr import ALRLoss
from alr.methods import CrossEntropy, residual_index
from alr.methods.alr_loss import alr_terms_reference


def _residual(t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Drop each row's target column by a Python loop: an independent reference for ``residual_index``."""
    return torch.stack([torch.cat([row[:k], row[k + 1 :]]) for row, k in zip(t, y.tolist())])


def _place(res: torch.Tensor, y: torch.Tensor, K: int) -> torch.Tensor:
    """Put K−1 residual columns back at their class positions, zero at the target."""
    out = torch.zeros(len(y), K, dtype=res.dtype)
    for i, k in enumerate(y.tolist()):
        out[i, [c for c in range(K) if c != k]] = res[i]
    return out


def _batch(B: int, K: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    logits = (3 * torch.randn(B, K, generator=g, dtype=torch.float64)).float().requires_grad_()
    y = torch.randint(0, K, (B,), generator=g)
    return logits, y


@pytest.mark.parametrize("normalisation", ["mean", "sum"])
@pytest.mark.parametrize("K", [2, 3, 10, 100])
@pytest.mark.parametrize("B", [1, 7, 64])
def test_gradients_match_eq_7_8(K: int, B: int, normalisation: str):
    """∂L/∂z = (p − q) + c·w·(p_res − q_res) at non-target classes; ∂L/∂S = L_upd's closed form only: eq. 7–8,
    which print no factor (``sum``: c = 1), times eq. 4–5's c = 1/(K−1) on the residual terms (``mean``)."""
    logits, y = _batch(B, K, seed=K * B)
    crit = ALRLoss(K, normalisation=normalisation)
    c = 1 / (K - 1) if normalisation == "mean" else 1
    with torch.no_grad():
        crit.S.normal_(generator=torch.Generator().manual_seed(1))  # a non-uniform residual label
    loss = crit(logits, y)
    loss.backward()

    z = logits.detach().double()
    p, q = z.softmax(1), F.one_hot(y, K).double()
    p_res = _residual(z, y).softmax(1)
    q_res = crit.S.detach().double()[y].softmax(1)
    w = crit.last_terms["w"].double()
    expected_z = (p - q + c * w * _place(p_res - q_res, y, K)) / B
    torch.testing.assert_close(logits.grad.double(), expected_z, rtol=1e-5, atol=1e-7)

    # L_upd = −c·Σ p̂_res log q_res trains S only: ∂/∂S[k] = c·Σ_{i: y_i = k} (q_res_i − p_res_i) / B.
    expected_s = torch.zeros(K, K - 1, dtype=torch.float64).index_add_(0, y, c * (q_res - p_res)) / B
    torch.testing.assert_close(crit.S.grad.double(), expected_s, rtol=1e-5, atol=1e-7)


def test_w_equal_one_is_the_paper_L_b():
    """With acc_train = 0 (every prediction wrong), w = 1 and the summed form's gradient is exactly eq. 7–8's L_b."""
    K, B = 5, 4
    y = torch.tensor([0, 1, 2, 3])
    logits = torch.full((B, K), -1.0)
    logits[:, 4] = 2.0  # argmax is class 4, never the target
    logits.requires_grad_()
    crit = ALRLoss(K, normalisation="sum")
    crit(logits, y).backward()
    assert crit.last_terms["w"].item() == 1.0
    z = logits.detach()
    p, q = z.softmax(1), F.one_hot(y, K).float()
    p_res, q_res = _residual(z, y).softmax(1), torch.full((B, K - 1), 1 / (K - 1))
    expected = p - q + _place(p_res - q_res, y, K)  # eq. 7: target column p − q, others + residual
    torch.testing.assert_close(logits.grad, expected / B)


def test_terms_match_their_definitions():
    K, B = 10, 32
    logits, y = _batch(B, K)
    crit = ALRLoss(K, label_smoothing=0.1)
    with torch.no_grad():
        crit.S.uniform_(-2, 2, generator=torch.Generator().manual_seed(3))
    loss = crit(logits, y)
    z = logits.detach()
    log_p_res = _residual(z, y).log_softmax(1)
    log_q_res = crit.S.detach()[y].log_softmax(1)
    l_hard = F.cross_entropy(z, y, label_smoothing=0.1)
    # eq. 4–5 as printed (the default): 1/(K−1) over the residual classes, so a mean over the B×(K−1) elements
    l_res = -(log_q_res.exp() * log_p_res).mean()
    l_upd = -(log_p_res.exp() * log_q_res).mean()
    acc = (z.argmax(1) == y).float().mean()
    t = crit.last_terms
    torch.testing.assert_close(t["L_hard"], l_hard)
    torch.testing.assert_close(t["L_res"], l_res)
    torch.testing.assert_close(t["L_upd"], l_upd)
    torch.testing.assert_close(t["w"], 1 - acc)
    torch.testing.assert_close(loss.detach(), l_hard + (1 - acc) * l_res + l_upd)


def test_residual_index_matches_loop():
    y = torch.tensor([0, 3, 9, 5])
    idx = residual_index(y, 10)
    assert idx.shape == (4, 9)
    expected = _residual(torch.arange(10).expand(4, 10), y)
    assert torch.equal(idx, expected)


@pytest.mark.parametrize("K", [2, 10, 100, 1000])
def test_S_is_a_zero_parameter_of_K_times_K_minus_1(K: int):
    crit = ALRLoss(K)
    assert isinstance(crit.S, torch.nn.Parameter)
    assert crit.S.shape == (K, K - 1) and crit.S.numel() == K * (K - 1)
    assert torch.count_nonzero(crit.S) == 0
    assert [p.data_ptr() for p in crit.parameters()] == [crit.S.data_ptr()]
    assert "S" in crit.state_dict()
    R = crit.residual_labels()
    assert R.shape == (K, K)
    assert torch.all(R.diagonal() == 0)
    torch.testing.assert_close(R.sum(1), torch.ones(K))
    off = R[~torch.eye(K, dtype=torch.bool)]
    torch.testing.assert_close(off, torch.full_like(off, 1 / (K - 1)))


def test_residual_labels_place_columns_by_class():
    crit = ALRLoss(4)
    with torch.no_grad():
        crit.S[2] = torch.tensor([0.0, 0.0, 10.0])  # class 2's third residual column is class 3
    R = crit.residual_labels()
    assert R[2].argmax().item() == 3
    assert R[2, 2].item() == 0.0


@pytest.mark.parametrize("eps", [0.0, 0.1])
def test_slr_and_baseline_equal_torch_cross_entropy(eps: float):
    logits, y = _batch(16, 10)
    torch.testing.assert_close(CrossEntropy(eps)(logits, y), F.cross_entropy(logits, y, label_smoothing=eps))


def test_alr_with_frozen_zero_S():
    """§3.2 "Initialization": S = 0 makes every residual label uniform; summed, L_upd = log(K−1); L_res pushes to
    uniform."""
    K, B = 10, 16
    logits, y = _batch(B, K)
    crit = ALRLoss(K, normalisation="sum")
    crit.S.requires_grad_(False)
    loss = crit(logits, y)
    loss.backward()
    z = logits.detach()
    log_p_res = _residual(z, y).log_softmax(1)
    torch.testing.assert_close(crit.last_terms["L_upd"], torch.tensor(math.log(K - 1)))
    torch.testing.assert_close(crit.last_terms["L_res"], -log_p_res.mean(1).mean())
    # L_res = log(K−1) + KL(uniform ‖ p_res) ≥ log(K−1), with equality only for uniform residual logits
    assert crit.last_terms["L_res"] >= math.log(K - 1)
    uniform = torch.zeros(B, K)
    uniform[torch.arange(B), y] = 5.0
    crit(uniform, y)
    torch.testing.assert_close(crit.last_terms["L_res"], torch.tensor(math.log(K - 1)))
    assert crit.S.grad is None


def test_running_and_batch_accuracy():
    K = 3
    y = torch.tensor([0, 1])
    right = F.one_hot(y, K).float() * 5
    wrong = F.one_hot((y + 1) % K, K).float() * 5
    crit = ALRLoss(K)
    crit(right, y)
    assert crit.acc_train.item() == 1.0 and crit.last_terms["w"].item() == 0.0
    crit(wrong, y)
    assert crit.acc_train.item() == 0.5 and crit.last_terms["w"].item() == 0.5
    crit.reset_epoch()
    crit(wrong, y)
    assert crit.acc_train.item() == 0.0
    per_batch = ALRLoss(K, acc_source="batch")
    per_batch(right, y)
    per_batch(wrong, y)
    assert per_batch.last_terms["w"].item() == 1.0


@pytest.mark.parametrize("normalisation,hard", [("mean", 1), ("class_mean", 10)])
def test_mean_normalisations_divide_the_terms(normalisation: str, hard: int):
    """mean (the default): the residual terms averaged over the K−1 classes, as eq. 4–5 print them; class_mean: the
    literal 1/K on L_hard too; both against the summed form."""
    K = 10
    logits, y = _batch(8, K)
    a, b = ALRLoss(K, normalisation="sum"), ALRLoss(K, normalisation=normalisation)
    assert ALRLoss(K).normalisation == "mean"
    a(logits, y), b(logits, y)
    torch.testing.assert_close(b.last_terms["L_hard"], a.last_terms["L_hard"] / hard)
    torch.testing.assert_close(b.last_terms["L_res"], a.last_terms["L_res"] / (K - 1))
    torch.testing.assert_close(b.last_terms["L_upd"], a.last_terms["L_upd"] / (K - 1))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("B", [1, 5])
def test_extreme_logits_stay_finite(dtype: torch.dtype, B: int):
    K = 10
    g = torch.Generator().manual_seed(0)
    logits = (torch.randint(0, 2, (B, K), generator=g) * 2e4 - 1e4).to(dtype).requires_grad_()
    y = torch.randint(0, K, (B,), generator=g)
    crit = ALRLoss(K, label_smoothing=0.1)
    loss = crit(logits, y)
    loss.backward()
    assert loss.dtype == torch.float32
    assert torch.isfinite(loss)
    assert torch.isfinite(logits.grad).all() and torch.isfinite(crit.S.grad).all()
    assert all(torch.isfinite(v) for v in crit.last_terms.values())


def test_loss_runs_in_float32_under_autocast():
    K = 10
    lin = torch.nn.Linear(4, K)
    crit = ALRLoss(K)
    x, y = torch.randn(6, 4), torch.randint(0, K, (6,))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = lin(x)
        assert logits.dtype == torch.bfloat16
        loss = crit(logits, y)
    assert loss.dtype == torch.float32
    loss.backward()
    assert crit.S.grad.dtype == torch.float32


def test_bad_arguments_are_rejected():
    with pytest.raises(ValueError, match="num_classes"):
        ALRLoss(1)
    with pytest.raises(ValueError, match="acc_source"):
        ALRLoss(10, acc_source="epoch")
    with pytest.raises(ValueError, match="label_smoothing"):
        ALRLoss(10, label_smoothing=1.5)
    with pytest.raises(ValueError, match="normalisation must be one of mean, sum, class_mean; got 'residual_mean'"):
        ALRLoss(10, normalisation="residual_mean")


@pytest.mark.parametrize("K", [2, 10, 100, 1000])
@pytest.mark.parametrize("B", [1, 33, 128])
@pytest.mark.parametrize("eps", [0.0, 0.1])
@pytest.mark.parametrize("normalisation", ["mean", "sum", "class_mean"])
def test_fused_path_equals_the_plain_autograd_definition(K: int, B: int, eps: float, normalisation: str):
    """ALRLoss's one-node forward/backward gives the values and gradients of plain autograd on eq. 3–5."""
    logits, y = _batch(B, K, seed=K + B)
    crit = ALRLoss(K, label_smoothing=eps, normalisation=normalisation)
    with torch.no_grad():
        crit.S.normal_(0, 2, generator=torch.Generator().manual_seed(K))
    crit.correct.fill_(3)  # a running accuracy from earlier batches, so w is not a batch quantity
    crit.seen.fill_(7)
    loss = crit(logits, y)
    loss.backward()

    z, S = logits.detach().clone().requires_grad_(), crit.S.detach().clone().requires_grad_()
    c = {"sum": (1, 1, 1), "mean": (1, K - 1, K - 1), "class_mean": (K, K - 1, K - 1)}[normalisation]
    l_hard, l_res, l_upd = (t / ci for t, ci in zip(alr_terms_reference(z, S, y, eps), c))
    w = crit.last_terms["w"]
    torch.testing.assert_close(w, 1 - (3 + (z.argmax(1) == y).sum()) / (7 + B))
    expected = l_hard + w * l_res + l_upd
    expected.backward()
    tol = {"rtol": 2e-5, "atol": 1e-6}
    torch.testing.assert_close(loss, expected, **tol)
    torch.testing.assert_close(
        torch.stack([crit.last_terms[k] for k in ("L_hard", "L_res", "L_upd")]),
        torch.stack([l_hard, l_res, l_upd]).detach(),
        **tol,
    )
    torch.testing.assert_close(logits.grad, z.grad, rtol=2e-5, atol=1e-7)
    torch.testing.assert_close(crit.S.grad, S.grad, rtol=2e-5, atol=1e-7)


def test_fused_path_is_stable_when_the_target_probability_rounds_to_one():
    """p_y = 1 in float32 (target logit 60 above the rest): p_res still comes from the residual logits."""
    K = 6
    logits = torch.tensor([[60.0, 1.0, 2.0, 0.0, -1.0, 0.5]], requires_grad=True)
    y = torch.tensor([0])
    crit = ALRLoss(K, normalisation="sum")  # alr_terms_reference is eq. 3–5 without their factors
    crit(logits, y).backward()
    z = logits.detach().clone().requires_grad_()
    S = crit.S.detach().clone().requires_grad_()
    l_hard, l_res, l_upd = alr_terms_reference(z, S, y)
    (l_hard + crit.last_terms["w"] * l_res + l_upd).backward()
    torch.testing.assert_close(logits.grad, z.grad)
    torch.testing.assert_close(crit.S.grad, S.grad)
    assert crit.S.grad.abs().sum() > 0  # q_res (uniform) differs from p_res: S learns even here


def test_alr_under_a_process_group_copies_nothing_from_the_host_at_a_step(tmp_path):
    """The global counts are made on the device: no tensor from host data, no read back (a GPU sync each).

    One process in a gloo group takes the branch several processes take; every op of the forward and the
    backward is recorded. ``aten.lift_fresh`` is a tensor made from Python data (a host-to-device copy on a
    GPU), ``_local_scalar_dense`` a read back (``.item()``). The same step under CUDA's sync debug mode is a
    ``gpu`` test (tests/test_gpu.py).
    """
    import torch.distributed as dist

    from golden_values import RecordOps

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'group'}", rank=0, world_size=1)
    try:
        criterion = ALRLoss(num_classes=5)
        logits = torch.randn(8, 5, requires_grad=True)
        targets = torch.randint(0, 5, (8,))
        criterion(logits, targets)  # a first step outside the recording
        with RecordOps() as ops:
            criterion(logits, targets).backward()
    finally:
        dist.destroy_process_group()
    assert any("allreduce" in name for name in ops.names)  # the several-process branch ran
    assert not {"aten.lift_fresh", "aten._local_scalar_dense", "aten.item"} & set(ops.names), ops.names
