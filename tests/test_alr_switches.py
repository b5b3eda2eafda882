"""ALRLoss's switches for what §3.2 leaves open (docs/deviations.md#alrs-loss): each against plain autograd or a
hand loop, the defaults bit for bit as before, bad values named by their key, and every ablation trained."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate

from alr import ALRLoss, trainer
from alr.distributed import World
from alr.errors import RunError
from alr.methods import RunFacts
from alr.methods.alr_loss import alr_terms_reference
from alr.preempt import Interrupted
from alr.trainer import fit
from conftest import CONFIGS, compose
from faults import faulty
from frozen_alr_loss import FrozenALRLoss
from golden_values import RecordOps

KEY = "method.module.criterion"
FAST = ["debug=fast", "trainer.batch_size=16"]

# The lead's ablation experiment changes one switch at a time, for ALR and ALR-S alike.
ABLATIONS = [
    ("teach=misclassified",),
    ("teach=correct",),
    ("s_update=running_mean",),
    ("weight=constant", "weight_value=0.5"),
    ("weight=ramp",),
    ("s_lr_multiplier=0.1",),
    ("s_lr_multiplier=10",),
    ("s_init=normal",),
    ("normalisation=sum",),
    ("acc_source=batch",),
]


@pytest.fixture(autouse=True)
def _one_thread_and_nondeterministic_after():
    """One torch thread: on tensors this small a second OpenMP thread only waits (tens of ms per op on a busy CPU)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(False)  # debug=fast turns it on for the whole process


def _facts(epochs: int = 2, steps: int = 3, seed: int = 0, K: int = 10) -> RunFacts:
    return RunFacts(K, 100, True, epochs, steps, seed, torch.device("cpu"))


def _batch(B: int, K: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    logits = (3 * torch.randn(B, K, generator=g, dtype=torch.float64)).float().requires_grad_()
    return logits, torch.randint(0, K, (B,), generator=g)


def _residual_rows(z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Each row without its target column, by a Python loop."""
    return torch.stack([torch.cat([row[:k], row[k + 1 :]]) for row, k in zip(z, y.tolist())])


# The switches at their defaults, as the ablation's experiment names them.
DEFAULTS = {
    "teach": "all",
    "s_update": "gradient",
    "weight": "one_minus_acc",
    "weight_value": None,
    "s_lr_multiplier": 1.0,
    "s_init": "zeros",
}
# The three normalisations, each named explicitly on both sides: the live key -> the frozen loss's booleans.
NORMALISATIONS = {
    "sum": {"residual_mean": False, "class_mean": False},
    "mean": {"residual_mean": True, "class_mean": False},
    "class_mean": {"residual_mean": False, "class_mean": True},
}
CASES = [(K, e, n, a) for K in (2, 10, 100) for e in (0.0, 0.1) for n in NORMALISATIONS for a in ("running", "batch")]


def _three_steps(crit: torch.nn.Module, K: int) -> list[torch.Tensor]:
    """Loss, terms and both gradients of three steps on one seeded stream of logits, with ``S`` drawn first."""
    g = torch.Generator().manual_seed(K)
    with torch.no_grad():
        crit.S.normal_(0, 2, generator=g)
    parts = []
    for _ in range(3):
        z = (3 * torch.randn(16, K, generator=g)).requires_grad_()
        y = torch.randint(0, K, (16,), generator=g)
        crit.S.grad = None
        loss = crit(z, y)
        loss.backward()
        parts += [loss, *crit.last_terms.values(), z.grad, crit.S.grad]
    return [t.detach() for t in parts]


@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(map(str, c)))
def test_the_defaults_give_the_loss_of_before_the_switches_bit_for_bit(case):
    """Against the loss as it was before the switches (tests/frozen_alr_loss.py), computed here in this process."""
    K, eps, norm, acc = case
    before = _three_steps(FrozenALRLoss(K, eps, acc, **NORMALISATIONS[norm]), K)
    for switches in ({}, DEFAULTS):
        now = _three_steps(ALRLoss(K, eps, acc, normalisation=norm, **switches), K)
        assert len(now) == len(before)
        for i, (a, b) in enumerate(zip(now, before)):
            assert a.dtype == b.dtype and torch.equal(a, b), f"part {i} differs ({norm}, switches={switches})"


def test_default_state_is_unchanged_and_each_mode_adds_only_its_own():
    assert set(ALRLoss(5).state_dict()) == {"S", "correct", "seen"}
    assert set(ALRLoss(5, weight="ramp").state_dict()) == {"S", "correct", "seen", "ramp_step"}
    running = ALRLoss(5, s_update="running_mean")
    assert set(running.state_dict()) == {"S", "correct", "seen"}  # the sums are per-rank, not persistent
    assert set(running.partial_sums()) == {"res_sums", "res_counts"} and ALRLoss(5).partial_sums() == {}
    assert [p for p in running.parameters() if p.requires_grad] == []  # what the trainer hands its optimizer
    assert [p.shape for p in ALRLoss(5).parameters() if p.requires_grad] == [(5, 4)]


SWITCHES = [
    {"teach": "misclassified"},
    {"teach": "correct"},
    {"s_lr_multiplier": 0.1},
    {"s_lr_multiplier": 10.0},
    {"weight": "constant", "weight_value": 0.5},
    {"weight": "ramp"},
    {"s_update": "running_mean"},
    {"s_update": "running_mean", "teach": "misclassified", "weight": "ramp"},
    {"teach": "correct", "s_lr_multiplier": 10.0, "weight": "constant", "weight_value": 0.25},
]


@pytest.mark.parametrize("switches", SWITCHES, ids=lambda s: ",".join(f"{k}={v}" for k, v in s.items()))
@pytest.mark.parametrize("K", [2, 10, 100])
@pytest.mark.parametrize("B", [1, 33])
@pytest.mark.parametrize("eps,normalisation", [(0.0, "sum"), (0.1, "mean")])
def test_each_switch_equals_the_plain_autograd_definition(switches, K, B, eps, normalisation):
    """Values and gradients of the fused path against eq. 3–5 in plain autograd, with w worked out by hand."""
    logits, y = _batch(B, K, seed=K + B)
    crit = ALRLoss(K, label_smoothing=eps, normalisation=normalisation, **switches)
    crit.setup(_facts(epochs=2, steps=3))  # a ramp over 6 steps: w = step / 5
    with torch.no_grad():
        crit.S.normal_(0, 2, generator=torch.Generator().manual_seed(K))
    crit.correct.fill_(3)  # a running accuracy from earlier batches
    crit.seen.fill_(7)
    if crit.weight == "ramp":
        crit.ramp_step.fill_(2)
    S0 = crit.S.detach().clone()
    loss = crit(logits, y)
    loss.backward()

    z = logits.detach().clone().requires_grad_()
    S = S0.clone().requires_grad_(crit.s_update == "gradient")
    hits = z.argmax(1) == y
    teach = {"all": None, "misclassified": (~hits).float(), "correct": hits.float()}[crit.teach]
    scale = K - 1 if normalisation == "mean" else 1
    l_hard, l_res, l_upd = alr_terms_reference(z, S, y, eps, teach=teach)
    l_res, l_upd = l_res / scale, l_upd / scale
    w = {
        "one_minus_acc": 1 - (3 + hits.sum()) / (7 + B),
        "constant": torch.tensor(switches.get("weight_value", 0.0)),
        "ramp": torch.tensor(2 / 5),
    }[crit.weight].float()
    torch.testing.assert_close(crit.last_terms["w"], w)
    expected = l_hard + w * l_res + l_upd
    expected.backward()
    tol = {"rtol": 2e-5, "atol": 1e-6}
    torch.testing.assert_close(loss, expected, **tol)
    for name, term in zip(("L_hard", "L_res", "L_upd"), (l_hard, l_res, l_upd)):
        torch.testing.assert_close(crit.last_terms[name], term.detach(), **tol)
    torch.testing.assert_close(logits.grad, z.grad, rtol=2e-5, atol=1e-7)
    if crit.s_update == "gradient":
        torch.testing.assert_close(crit.S.grad, S.grad, rtol=2e-5, atol=1e-7)
    else:
        assert crit.S.grad is None and S.grad is None


def test_teach_selects_rows_and_a_batch_without_one_leaves_S_alone():
    """All predictions wrong: teach=correct has no teaching row (L_upd 0, no step for S), L_res unchanged."""
    K, B = 5, 4
    y = torch.tensor([0, 1, 2, 3])
    logits = torch.full((B, K), -1.0)
    logits[:, 4] = 2.0  # argmax 4, never the target
    full, none = ALRLoss(K), ALRLoss(K, teach="correct")
    full(logits, y).backward()
    none(logits, y).backward()
    assert none.last_terms["L_upd"].item() == 0.0 and torch.count_nonzero(none.S.grad) == 0
    torch.testing.assert_close(none.last_terms["L_res"], full.last_terms["L_res"])
    wrong = ALRLoss(K, teach="misclassified")
    wrong(logits, y).backward()
    torch.testing.assert_close(wrong.S.grad, full.S.grad)  # every row misclassified: the same as teach=all
    torch.testing.assert_close(wrong.last_terms["L_upd"], full.last_terms["L_upd"])


def test_the_multiplier_leaves_the_loss_and_gradients_alone_and_marks_S():
    logits, y = _batch(8, 10)
    a, b = ALRLoss(10), ALRLoss(10, s_lr_multiplier=10)
    a(logits, y).backward()
    grad_z = logits.grad.clone()
    logits.grad = None
    b(logits, y).backward()
    assert torch.equal(b.S.grad, a.S.grad) and torch.equal(logits.grad, grad_z)
    assert (a.S.lr_multiplier, b.S.lr_multiplier) == (1.0, 10.0)


@pytest.mark.parametrize("optim", ["sgd_nesterov", "adam_step"])
def test_the_trainer_trains_S_at_the_runs_learning_rate_times_the_multiplier(optim: str):
    """S's parameter group: lr × 10 at the start and after each scheduled drop, under SGD and Adam alike."""
    from alr.trainer import Parts

    cfg = compose("method=alr", f"optim={optim}", "method.module.criterion.s_lr_multiplier=10", "debug=fast")
    parts = Parts(cfg, World(torch.device("cpu")))
    backbone, s_group = parts.optimizer.param_groups
    assert s_group["params"] == [parts.method.criterion.S] and s_group["weight_decay"] == 0.0
    for _ in range(3):
        assert s_group["lr"] == pytest.approx(10 * backbone["lr"]) and backbone["lr"] > 0
        parts.optimizer.step()
        for _ in range(100):
            parts.scheduler.step()  # past the schedule's drops
    default = Parts(compose("method=alr", f"optim={optim}", "debug=fast"), World(torch.device("cpu")))
    assert [g["lr"] for g in default.optimizer.param_groups] == [default.optimizer.param_groups[0]["lr"]] * 2


@pytest.mark.parametrize("teach", ["all", "misclassified"])
def test_running_mean_sets_S_to_the_epoch_mean_of_p_res(teach: str):
    """S after an epoch against a hand loop: softmax(S[k]) = the mean p_res of class k's teaching samples."""
    K = 5
    crit = ALRLoss(K, s_update="running_mean", teach=teach)
    keep = torch.tensor([4.0, -1.0, 0.5, 2.0])
    with torch.no_grad():
        crit.S[4] = keep  # class 4 has no sample this epoch: its row must stay
    crit.start_epoch(0)
    g = torch.Generator().manual_seed(1)
    rows: dict[int, list[torch.Tensor]] = {k: [] for k in range(K)}
    for _ in range(4):
        z = 2 * torch.randn(6, K, generator=g)
        y = torch.randint(0, 4, (6,), generator=g)
        crit(z, y)
        for row, k, hit in zip(_residual_rows(z.double(), y), y.tolist(), (z.argmax(1) == y).tolist()):
            if teach == "all" or not hit:
                rows[k].append(row.softmax(0))
    assert torch.equal(crit.S[:4], torch.zeros(4, K - 1))  # no optimizer, no change during the epoch
    crit.end_epoch(0, World(torch.device("cpu")))
    for k in range(4):
        assert rows[k], "every class of 0-3 has a teaching sample in this draw"
        torch.testing.assert_close(crit.S[k].double().softmax(0), torch.stack(rows[k]).mean(0), rtol=1e-5, atol=1e-7)
    assert torch.equal(crit.S[4], keep)


def test_running_mean_starts_uniform_and_logs_L_upd():
    """First epoch: S = 0, q_res uniform, so L_upd = log(K − 1) / (K − 1) whatever the logits; it trains nothing."""
    K = 7
    crit = ALRLoss(K, s_update="running_mean")
    logits, y = _batch(9, K)
    crit(logits, y).backward()
    torch.testing.assert_close(crit.last_terms["L_upd"], torch.tensor(math.log(K - 1) / (K - 1)))
    assert crit.S.grad is None and logits.grad is not None


def test_running_mean_stays_finite_when_p_res_underflows():
    """Residual probabilities of exactly 0 (logit gaps of 1e4) give a finite log-mean, so the next step is finite."""
    K = 4
    crit = ALRLoss(K, s_update="running_mean")
    z = torch.tensor([[1e4, 0.0, -1e4, 5.0], [0.0, 1e4, -1e4, 1.0]])
    y = torch.tensor([0, 1])
    crit(z, y)
    crit.end_epoch(0, World(torch.device("cpu")))
    assert torch.isfinite(crit.S).all() and crit.S[0, 1] < -80  # class 2's share of class 0's errors is 0
    logits = z.clone().requires_grad_()
    loss = crit(logits, y)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(logits.grad).all()


def test_ramp_goes_from_0_at_the_first_step_to_1_at_the_last_and_resumes():
    crit = ALRLoss(4, weight="ramp")
    crit.setup(_facts(epochs=1, steps=5, K=4))  # 5 steps: w = 0, 0.25, 0.5, 0.75, 1
    logits, y = _batch(3, 4)
    seen = []
    for _ in range(3):
        crit(logits, y)
        seen.append(crit.last_terms["w"].item())
    assert seen == [0.0, 0.25, 0.5]
    resumed = ALRLoss(4, weight="ramp")
    resumed.setup(_facts(epochs=1, steps=5, K=4))
    resumed.load_state_dict(crit.state_dict())  # a mid-epoch checkpoint
    assert resumed.ramp_step.item() == 3
    for expected in (0.75, 1.0, 1.0):  # the last step, then held (never above 1)
        resumed(logits, y)
        assert resumed.last_terms["w"].item() == expected


@pytest.mark.parametrize(
    "switches",
    [
        {"weight": "ramp"},
        {"weight": "constant", "weight_value": 0.5},
        {"teach": "misclassified"},
        {"s_update": "running_mean", "teach": "correct"},
        {"s_lr_multiplier": 10.0},
    ],
    ids=str,
)
def test_a_switched_step_reads_nothing_back_from_the_device(switches):
    """No ``.item()`` (``_local_scalar_dense``) and no tensor from host data (``lift_fresh``) in forward or backward."""

    crit = ALRLoss(5, **switches)
    crit.setup(_facts(K=5))
    logits, y = _batch(8, 5)
    crit(logits, y)
    with RecordOps() as ops:
        crit(logits, y).backward()
    assert not {"aten.lift_fresh", "aten._local_scalar_dense", "aten.item"} & set(ops.names), ops.names


def test_s_init_normal_has_std_0_01_and_follows_the_seed():
    K = 100
    draws = {}
    for seed in (0, 0, 1):
        crit = ALRLoss(K, s_init="normal")
        crit.setup(_facts(seed=seed, K=K))
        draws.setdefault(seed, []).append(crit.S.detach().clone())
    S = draws[0][0]
    assert 0.0095 < S.std().item() < 0.0105 and abs(S.mean().item()) < 5e-4  # 9,900 draws
    assert torch.equal(draws[0][0], draws[0][1]) and not torch.equal(draws[0][0], draws[1][0])
    zeros = ALRLoss(K)
    zeros.setup(_facts(seed=3, K=K))
    assert torch.count_nonzero(zeros.S) == 0
    with pytest.raises(RuntimeError, match=r"needs setup\(facts\)"):
        ALRLoss(K, s_init="normal")(*_batch(2, K))


@pytest.mark.parametrize(
    "switches,key",
    [
        ({"teach": "wrong"}, "teach"),
        ({"s_update": "sgd"}, "s_update"),
        ({"weight": "linear"}, "weight"),
        ({"weight": "constant"}, "weight_value"),
        ({"weight": "constant", "weight_value": -0.5}, "weight_value"),
        ({"weight": "constant", "weight_value": "half"}, "weight_value"),
        ({"weight_value": 0.5}, "weight_value"),
        ({"s_lr_multiplier": 0}, "s_lr_multiplier"),
        ({"s_lr_multiplier": float("nan")}, "s_lr_multiplier"),
        ({"s_lr_multiplier": True}, "s_lr_multiplier"),
        ({"s_update": "running_mean", "s_lr_multiplier": 10}, "s_lr_multiplier"),
        ({"s_init": "uniform"}, "s_init"),
        ({"acc_source": "epoch"}, "acc_source"),
        ({"label_smoothing": 1.5}, "label_smoothing"),
    ],
)
def test_bad_values_name_their_key_in_one_line(switches, key):
    with pytest.raises(ValueError) as err:
        ALRLoss(10, **switches)
    message = str(err.value)
    assert message.startswith(f"{KEY}.{key} ") and "\n" not in message


def test_the_trainer_reports_a_bad_switch_in_one_line():
    """What a run prints when it builds the method (``trainer._build``, as ``fit`` calls it)."""
    with pytest.raises(RunError) as err:
        trainer._build(compose(f"{KEY}.teach=sometimes").method.module, "method 'alr'")
    assert str(err.value) == f"method 'alr': {KEY}.teach must be one of all, misclassified, correct; got 'sometimes'"


def test_run_folders_made_before_the_switches_compare_as_their_defaults():
    """A saved config without the new keys equals today's defaults (so it resumes) and differs from a switch."""
    from alr.run_folder import config_differences

    target = {"_target_": "alr.ALRLoss"}
    old = {"method": {"name": "alr", "module": {"criterion": {**target, "class_mean": False, "residual_mean": False}}}}
    now = {"method": {"name": "alr_sum", "module": {"criterion": {**target, "normalisation": "sum", **DEFAULTS}}}}
    assert config_differences(old, now) == []  # the summed form, alr_sum since the average became alr's default
    now["method"]["module"]["criterion"]["teach"] = "correct"
    assert config_differences(old, now) == [f"{KEY}.teach ('all' -> 'correct')"]
    cfg = compose("method=alr").method.module.criterion
    assert {k: cfg[k] for k in DEFAULTS} == DEFAULTS  # the config's defaults are the ones old runs had


@pytest.mark.parametrize("method", sorted(p.stem for p in (CONFIGS / "method").glob("alr*.yaml")))
def test_every_alr_method_config_builds_and_takes_a_step(method: str):
    """ALR, ALR-S, their summed forms and the ablation's variants (configs/method/alr_*.yaml)."""
    criterion = instantiate(compose(f"method={method}").method.module).criterion
    assert isinstance(criterion, ALRLoss)
    criterion.setup(_facts())
    logits, y = _batch(16, 10)
    loss = criterion(logits, y)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(logits.grad).all()
    assert (criterion.S.grad is not None) == (criterion.s_update == "gradient")


@pytest.mark.parametrize("ablation", ABLATIONS, ids=" ".join)
def test_each_ablation_composes_and_trains_for_alr_s(ablation: tuple[str, ...], tmp_path: Path):
    """One short epoch of each ablation, as overrides of ALR-S, through the real trainer (every switch applies to
    ALR-S too; ALR's variants are method configs, built above)."""
    overrides = [*FAST, "method=alr_s", "trainer.epochs=1", "trainer.limit_train_batches=2"]
    cfg = compose(
        *overrides, "trainer.limit_test_batches=1", *(f"{KEY}.{o}" for o in ablation), f"paths.output_dir={tmp_path}"
    )
    assert cfg.method.module.criterion.label_smoothing == 0.1
    assert fit(cfg, tmp_path)["status"] == "finished"
    (record,) = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert all(math.isfinite(record[f"train/{k}"]) for k in ("L_hard", "L_res", "L_upd", "w"))
    if "weight=constant" in ablation:
        assert record["train/w"] == 0.5
    if "weight=ramp" in ablation:
        assert record["train/w"] == 0.5  # two steps: w = 0, then 1


def _state(run_dir: Path) -> dict:
    return torch.load(run_dir / "last.pt", weights_only=True)


def test_running_mean_ramp_and_teach_resume_mid_epoch_bit_for_bit(tmp_path: Path, monkeypatch):
    """A run stopped after step 2 of epoch 2 and resumed ends as the run that was not stopped: the ramp's step
    and the running mean's per-rank sums come back with the checkpoint."""
    switches = [f"{KEY}.s_update=running_mean", f"{KEY}.weight=ramp", f"{KEY}.teach=misclassified"]
    overrides = [*FAST, *switches, *faulty("alr.ALRLoss")]
    straight, stopped = tmp_path / "straight", tmp_path / "stopped"
    fit(compose(*overrides, f"paths.output_dir={straight}"), straight)
    monkeypatch.setenv("ALR_FAULT", "term@2:1")
    with pytest.raises(Interrupted):
        fit(compose(*overrides, f"paths.output_dir={stopped}"), stopped)
    ckpt = _state(stopped)
    assert (ckpt["epoch"], ckpt["step"]) == (1, 2) and ckpt["method"]["criterion.criterion.ramp_step"] == 5
    assert ckpt["method_sums"][0]["res_counts"].sum() > 0  # this epoch's sums so far, saved per rank
    monkeypatch.delenv("ALR_FAULT")
    fit(compose(*overrides, f"paths.output_dir={stopped}"), stopped)
    a, b = _state(straight), _state(stopped)
    for part in ("model", "method"):
        assert a[part].keys() == b[part].keys()
        for name in a[part]:
            assert torch.equal(a[part][name], b[part][name]), f"{part}.{name}"
    assert (stopped / "metrics.jsonl").read_text() != ""
    lines = [[json.loads(x) for x in (d / "metrics.jsonl").read_text().splitlines()] for d in (straight, stopped)]
    assert [{k: v for k, v in m.items() if "seconds" not in k and "per_s" not in k} for m in lines[0]] == [
        {k: v for k, v in m.items() if "seconds" not in k and "per_s" not in k} for m in lines[1]
    ]


def test_a_running_mean_run_end_to_end(tmp_path: Path):
    """The trainer with s_update=running_mean: S leaves the optimizer and is the epochs' mean p_res."""
    run_dir = tmp_path / "default" / "digits-digits_cnn-alr-s0"
    fit(compose(*FAST, f"{KEY}.s_update=running_mean", f"paths.output_dir={tmp_path}"), run_dir)
    ckpt = _state(run_dir)
    assert len(ckpt["optimizer"]["param_groups"]) == 1  # the backbone's only: S is not the optimizer's
    S = ckpt["method"]["criterion.S"]
    assert torch.count_nonzero(S) == S.numel() and torch.isfinite(S).all()
    torch.testing.assert_close(S.softmax(1).sum(1), torch.ones(10))
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [m["epoch"] for m in metrics] == [1, 2]
    assert metrics[0]["train/L_upd"] == pytest.approx(math.log(9) / 9, rel=1e-6)  # epoch 1: q_res uniform
    assert abs(metrics[1]["train/L_upd"] - math.log(9) / 9) > 1e-4  # epoch 2: q_res is epoch 1's mean p_res
    assert json.loads((run_dir / "result.json").read_text())["status"] == "finished"
