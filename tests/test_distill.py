"""KD and DML: losses and gradients against closed forms, the teacher frozen and unsaved, the peer trained and saved."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from hydra.errors import InstantiationException
from hydra.utils import instantiate

from alr.errors import RunError
from alr.methods.distill import DeepMutualLearning, KnowledgeDistillation, dml_loss, kd_loss
from alr.trainer import fit
from conftest import compose

FAST = ["debug=fast", "trainer.batch_size=32"]


def _batch(B: int = 6, K: int = 5, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return (
        torch.randn(B, K, generator=g) * 3,
        torch.randn(B, K, generator=g) * 3,
        torch.randint(0, K, (B,), generator=g),
    )


@pytest.mark.parametrize("alpha,T", [(0.9, 4.0), (0.5, 1.0), (0.0, 2.0), (1.0, 3.0)])
def test_kd_loss_and_gradient_match_the_closed_form(alpha: float, T: float):
    z_s, z_t, y = _batch()
    z_s.requires_grad_(True)
    loss, terms = kd_loss(z_s, z_t, y, alpha, T)
    B, K = z_s.shape
    p_t, log_p_s = torch.softmax(z_t / T, 1), torch.log_softmax(z_s / T, 1)
    kl = (p_t * (p_t.log() - log_p_s)).sum(1).mean()
    ce = -torch.log_softmax(z_s, 1)[torch.arange(B), y].mean()
    assert torch.allclose(loss, (1 - alpha) * ce + alpha * T * T * kl, atol=1e-5)
    assert torch.allclose(terms["L_kd"], kl, atol=1e-6) and torch.allclose(terms["L_hard"], ce, atol=1e-6)
    (grad,) = torch.autograd.grad(loss, z_s)
    onehot = F.one_hot(y, K).float()
    expected = ((1 - alpha) * (torch.softmax(z_s, 1) - onehot) + alpha * T * (log_p_s.exp() - p_t)) / B
    assert torch.allclose(grad, expected.detach(), atol=1e-6)


def test_dml_loss_and_gradients_match_the_closed_form():
    z1, z2, y = _batch(B=8, K=7, seed=1)
    z1.requires_grad_(True)
    z2.requires_grad_(True)
    loss, terms = dml_loss(z1, z2, y)
    p1, p2 = torch.softmax(z1, 1), torch.softmax(z2, 1)

    def kl(p, q):  # KL(p ‖ q), torch's reference
        return F.kl_div(q.log(), p, reduction="batchmean")

    expected = F.cross_entropy(z1, y) + kl(p2, p1) + F.cross_entropy(z2, y) + kl(p1, p2)
    assert torch.allclose(loss, expected, atol=1e-5)
    assert torch.allclose(terms["L_kl"], kl(p2, p1), atol=1e-6)
    assert torch.allclose(terms["peer_L_kl"], kl(p1, p2), atol=1e-6)
    g1, g2 = torch.autograd.grad(loss, (z1, z2))
    onehot = F.one_hot(y, 7).float()
    # Each network's gradient is its own L_i's: CE's plus KL(p_j ‖ p_i)'s, with the peer held fixed.
    assert torch.allclose(g1, ((p1 - onehot) + (p1 - p2)).detach() / 8, atol=1e-6)
    assert torch.allclose(g2, ((p2 - onehot) + (p2 - p1)).detach() / 8, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_losses_run_in_float32_under_autocast(dtype: torch.dtype):
    z1, z2, y = _batch()
    with torch.autocast("cpu", dtype=dtype):
        assert kd_loss(z1.to(dtype), z2.to(dtype), y, 0.9, 4.0)[0].dtype == torch.float32
        assert dml_loss(z1.to(dtype), z2.to(dtype), y)[0].dtype == torch.float32


def test_dml_config_builds_a_peer_of_the_backbone_with_its_weight_decay():
    cfg = compose("method=dml")
    method, model = instantiate(cfg.method.module), instantiate(cfg.model)
    assert isinstance(method, DeepMutualLearning) and type(method.peer) is type(model)
    assert sum(p.numel() for p in method.parameters()) == sum(p.numel() for p in model.parameters())
    assert cfg.method.weight_decay == cfg.optim.weight_decay == 5e-4


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("teacher") / "run"
    fit(compose("method=baseline", *FAST, "trainer.epochs=1"), run_dir)
    yield run_dir
    torch.use_deterministic_algorithms(False)  # debug=fast turns it on for the whole process


def test_kd_teacher_is_the_finished_run_frozen_and_outside_the_state(teacher):
    cfg = compose("method=kd", f"method.teacher_run={teacher}")
    kd = instantiate(cfg.method.module)
    assert isinstance(kd, KnowledgeDistillation) and (kd.alpha, kd.temperature) == (0.9, 4.0)
    weights = torch.load(teacher / "last.pt", weights_only=True)["model"]
    for name, value in kd.teacher.state_dict().items():
        assert torch.equal(value, weights[name]), name
    assert not kd.teacher.training and not any(p.requires_grad for p in kd.teacher.parameters())
    assert list(kd.parameters()) == [] and kd.state_dict() == {}  # not optimised, not counted, not saved
    kd.train()
    assert not kd.teacher.training


def test_kd_and_dml_train_end_to_end(tmp_path, teacher):
    result = fit(compose("method=kd", f"method.teacher_run={teacher}", *FAST), tmp_path / "kd")
    assert result["status"] == "finished" and result["params"]["method"] == 0
    ckpt = torch.load(tmp_path / "kd" / "last.pt", weights_only=True)
    assert ckpt["method"] == {} and len(ckpt["optimizer"]["param_groups"]) == 1

    result = fit(compose("method=dml", *FAST), tmp_path / "dml")
    assert result["params"]["method"] == result["params"]["backbone"]
    ckpt = torch.load(tmp_path / "dml" / "last.pt", weights_only=True)
    assert all(k.startswith("peer.") for k in ckpt["method"]) and ckpt["method"]
    (_, peer_group) = ckpt["optimizer"]["param_groups"]
    assert peer_group["weight_decay"] == 5e-4
    last = json.loads((tmp_path / "dml" / "metrics.jsonl").read_text().splitlines()[-1])
    assert {"train/L_kl", "train/peer_L_hard", "train/peer_L_kl"} <= set(last)


def test_a_run_that_keeps_no_checkpoint_is_skipped_when_finished_and_is_no_teacher(tmp_path):
    """trainer.keep_checkpoint=false (the smoke grids): last.pt goes once result.json is written; the finished
    run is skipped on resume, also with the key changed back, and a KD run cannot take it as its teacher."""
    run_dir = tmp_path / "run"
    result = fit(compose("method=baseline", *FAST, "trainer.epochs=1", "trainer.keep_checkpoint=false"), run_dir)
    assert result["status"] == "finished" and not (run_dir / "last.pt").exists()
    assert json.loads((run_dir / "result.json").read_text())["final_test_acc"] == result["final_test_acc"]
    metrics = (run_dir / "metrics.jsonl").read_text()
    again = fit(compose("method=baseline", *FAST, "trainer.epochs=1"), run_dir)
    assert again["final_test_acc"] == result["final_test_acc"] and (run_dir / "metrics.jsonl").read_text() == metrics
    no_weights = r"finished but kept no weights \(no last.pt; it ran with trainer.keep_checkpoint=false\)"
    with pytest.raises((RunError, InstantiationException), match=no_weights):
        instantiate(compose("method=kd", f"method.teacher_run={run_dir}").method.module)
    torch.use_deterministic_algorithms(False)
