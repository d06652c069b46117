"""The importance rank rule (lrtrain.update.importance) and the options that select it."""
import pytest
import torch

import lrtrain
from lrtrain.update import RULES, Importance, importance_selection
from lrtrain.validation import RANK_RULES


def _core(r=4, extra=2):
    """Ŝ diagonal: σ = 3, 2, 1, 0.5 on the old basis (r = 4) and 0.2, 0.1 on two augmented directions."""
    sigma = torch.tensor([3.0, 2.0, 1.0, 0.5, 0.2, 0.1], dtype=torch.float64)
    eye = torch.eye(r + extra, dtype=torch.float64)
    return sigma, eye, eye


def _moments(v_diag, m_diag):
    return torch.diag(torch.tensor(m_diag, dtype=torch.float64)), torch.diag(torch.tensor(v_diag, dtype=torch.float64))


def test_keeps_what_the_loss_uses_not_the_largest_singular_values():
    sigma, P, Q = _core()
    # direction 1 (σ = 2, the second largest) has no sensitivity: a random start's direction
    m, v = _moments([1.0, 0.0, 1.0, 1e-6], [0.0, 0.0, 0.0, 0.0])
    keep = importance_selection(sigma, P, Q, Importance(m, v, reservoir=0.0), tau=0.2, min_rank=1, max_rank=6)
    # scores 3, 0, 1, 5e-4: the tail after {0, 2} is 5e-4 <= 0.2·‖s‖
    assert keep.tolist() == [0, 2]
    keep = importance_selection(sigma, P, Q, Importance(m, v, reservoir=0.0), tau=0.4, min_rank=1, max_rank=6)
    assert keep.tolist() == [0]  # tail 1/√10 = 0.316 <= 0.4


def test_pushed_directions_and_the_reservoir():
    sigma, P, Q = _core()
    # direction 3: gradient -1 on σ with RMS 1: the loss asks it to grow
    m, v = _moments([1.0, 0.0, 0.0, 1.0], [0.0, 0.0, 0.0, -1.0])
    keep = importance_selection(sigma, P, Q, Importance(m, v, push=0.5, reservoir=0.0), tau=0.5, min_rank=1, max_rank=6)
    assert keep.tolist() == [0, 3]  # 3 is not important (score 0.5, tail 0.164 <= 0.5) but pushed: -(-1)/1 > 0.5
    # a reservoir of ⌈0.5·2⌉ = 1 more: the largest remaining σ (direction 1)
    keep = importance_selection(sigma, P, Q, Importance(m, v, push=0.5, reservoir=0.5), tau=0.5, min_rank=1, max_rank=6)
    assert keep.tolist() == [0, 1, 3]
    # max_rank limits by priority (important, pushed, reservoir), min_rank fills by σ
    keep = importance_selection(sigma, P, Q, Importance(m, v, push=0.5, reservoir=0.5), tau=0.5, min_rank=1, max_rank=1)
    assert keep.tolist() == [0]
    keep = importance_selection(sigma, P, Q, Importance(m, v, push=9.0, reservoir=0.0), tau=0.9, min_rank=3, max_rank=6)
    assert keep.tolist() == [0, 1, 2]


def test_moments_are_read_in_the_rotated_basis():
    """The core's singular vectors mix the old basis: v_j = ((P_r∘P_r)ᵀ v̂ (Q_r∘Q_r))_jj."""
    c, s = 0.6, 0.8
    R = torch.tensor([[c, -s], [s, c]], dtype=torch.float64)
    sigma = torch.tensor([2.0, 1.0], dtype=torch.float64)
    m = torch.zeros(2, 2, dtype=torch.float64)
    v = torch.diag(torch.tensor([0.0, 1.0], dtype=torch.float64))  # only the old second direction is sensitive
    # P = Q = R: new direction 0 holds 0.64 of old direction 1's variance, direction 1 holds 0.36 of it
    keep = importance_selection(sigma, R, R, Importance(m, v, reservoir=0.0), tau=0.0, min_rank=1, max_rank=2)
    assert keep.tolist() == [0, 1]
    scores = sigma * torch.tensor([s ** 4, c ** 4], dtype=torch.float64).sqrt()  # 2·0.64, 1·0.36
    assert scores.tolist() == pytest.approx([1.28, 0.36])
    keep = importance_selection(sigma, R, R, Importance(m, v, reservoir=0.0), tau=0.3, min_rank=1, max_rank=2)
    assert keep.tolist() == [0]  # tail 0.36 / ‖(1.28, 0.36)‖ = 0.27 <= 0.3


def test_rule_names_and_default_tolerances():
    assert set(RULES) == set(RANK_RULES)
    model = torch.nn.Sequential(lrtrain.LowRankLinear(16, 16, rank=4))
    assert lrtrain.DLRT(model.parameters()).defaults["tau"] == RULES["importance"]
    assert lrtrain.DLRT(model.parameters(), rank_rule="tolerance").defaults["tau"] == RULES["tolerance"]
    assert lrtrain.DLRT(model.parameters(), rank_rule="tolerance", tau=0.3).defaults["tau"] == 0.3


@pytest.mark.parametrize("kw, exc", [({"rank_rule": "magnitude"}, ValueError), ({"rank_rule": 1}, TypeError),
                                     ({"s_direction": "both"}, ValueError)])
def test_bad_rule_options_are_refused_and_leave_nothing(kw, exc):
    model = torch.nn.Sequential(lrtrain.LowRankLinear(16, 16, rank=4))
    with pytest.raises(exc):
        lrtrain.DLRT(model.parameters(), **kw)
    opt = lrtrain.DLRT(model.parameters())
    extra = torch.nn.Linear(3, 3)
    with pytest.raises(exc):
        opt.add_param_group({"params": extra.parameters(), **kw})
    assert len(opt.param_groups) == 1


@pytest.mark.skipif(not lrtrain.update.available()["cpu"], reason="CPU extension not built")
def test_a_fused_backend_refuses_the_importance_rule_and_changes_nothing():
    torch.manual_seed(0)
    model = torch.nn.Sequential(lrtrain.LowRankLinear(16, 16, rank=4), lrtrain.LowRankLinear(16, 16, rank=4))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    opt = lrtrain.DLRT(model.parameters(), backend="cpu")
    model(torch.randn(8, 16)).square().sum().backward()
    with pytest.raises(ValueError, match="tolerance"):
        opt.step()
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert not opt.state and all(l.rank == 4 for l in model)
    lrtrain.DLRT(model.parameters(), backend="cpu", rank_rule="tolerance").step()  # the fused backend's rule
    assert any(not torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_sgd_moments_are_scaled_to_means():
    """SGD keeps a momentum buffer Σ μᵏ (1 - dampening) g: the rule reads buf·(1 - μ)/(1 - dampening), a mean of g."""
    from lrtrain.optim.functional import s_moments

    g = torch.full((2, 2), 3.0)
    state = {"momentum_buffer": torch.full((2, 2), 30.0)}  # a steady buffer of g = 3 at μ = 0.9
    imp = s_moments(state, g, {"momentum": 0.9, "dampening": 0.0})
    assert torch.allclose(imp.m, g) and torch.equal(imp.v, g.square())
    imp = s_moments({"momentum_buffer": torch.full((2, 2), 15.0)}, g, {"momentum": 0.9, "dampening": 0.5})
    assert torch.allclose(imp.m, g)
    imp = s_moments({}, g, {"momentum": 0.0, "dampening": 0.0})
    assert torch.equal(imp.m, g)
    adam = {"exp_avg": torch.full((2, 2), 0.5), "exp_avg_sq": torch.full((2, 2), 0.02),
            "bias_mass": torch.stack([torch.full((2, 2), 0.25), torch.full((2, 2), 0.01)])}
    imp = s_moments(adam, g, {"momentum": 0.0, "dampening": 0.0})
    assert torch.allclose(imp.m, torch.full((2, 2), 2.0)) and torch.allclose(imp.v, torch.full((2, 2), 2.0))
