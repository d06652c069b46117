"""The functional core: ``lrtrain.optim.functional.dlrt`` over explicit slots is exactly ``DLRT.step``."""
import copy
from collections import defaultdict

import pytest
import torch
from torch import nn

from lrtrain import DLRT, LowRankLinear
from lrtrain.optim.functional import LayerSlots, dlrt
from lrtrain.optim.params import Slot


def _model():
    torch.manual_seed(0)
    return nn.Sequential(LowRankLinear(12, 10, 3, max_rank=8), nn.Tanh(), nn.Linear(10, 4)).double()


@pytest.mark.parametrize("kw", [dict(), dict(base="sgd", momentum=0.9, lr=0.05), dict(refresh=2, weight_decay=1e-2)])
def test_functional_dlrt_is_the_optimizer_step(kw):
    a = _model()
    b = copy.deepcopy(a)
    opt = DLRT(a.parameters(), **kw)
    group = {k: v for k, v in opt.param_groups[0].items() if k != "params"}
    state = defaultdict(dict)
    g = torch.Generator().manual_seed(1)
    for _ in range(6):
        x, y = torch.randn(16, 12, generator=g, dtype=torch.float64), torch.randn(16, 4, generator=g, dtype=torch.float64)
        for m in (a, b):
            m.zero_grad()
            nn.functional.mse_loss(m(x), y).backward()
        opt.step()
        lr_layer, dense = b[0], b[2]
        layers = [LayerSlots(lr_layer, *(Slot(getattr(lr_layer, r), state[getattr(lr_layer, r)], full=True) for r in "USV"),
                             bias=Slot(lr_layer.bias, state[lr_layer.bias], full=False))]
        assert dlrt(layers, [Slot(p, state[p], full=False) for p in dense.parameters()], group) == 0
        assert a[0].rank == b[0].rank
    for pa, pb in zip(a.parameters(), b.parameters()):
        assert torch.equal(pa, pb)
    for pa, pb in zip(a.parameters(), b.parameters()):
        for key, v in opt.state[pa].items():
            w = state[pb][key]
            assert torch.equal(v, w) if torch.is_tensor(v) else v == w
