"""Checkpoints saved after ranks changed load into a freshly built model and continue bitwise-identically."""
import io

import torch
import torch.nn.functional as F

import lrtrain
import lrtrain.cli.data
import lrtrain.cli.train
from lrtrain.cli.models import mlp


def _build():
    torch.manual_seed(0)
    model = lrtrain.lowrank(mlp(64, [96, 96], 10), rank=24)
    opt = lrtrain.DLRT(model.parameters(), lr=3e-3, weight_decay=1e-3, tau=0.15)
    return model, opt


def _train(model, opt, batches):
    losses = []
    for x, y in batches:
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return losses


def test_resume_from_checkpoint_at_other_ranks_is_bitwise_identical(digits):
    gen = torch.Generator().manual_seed(1)
    batches = list(lrtrain.cli.data.batches(digits.train_x, digits.train_y, 64, gen))[:40]
    model, opt = _build()
    initial = lrtrain.cli.train.ranks(model)
    _train(model, opt, batches[:20])
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buf)
    saved_ranks = lrtrain.cli.train.ranks(model)
    assert saved_ranks != initial  # the checkpoint really is at other ranks
    reference = _train(model, opt, batches[20:])

    fresh, fresh_opt = _build()
    assert lrtrain.cli.train.ranks(fresh) == initial
    buf.seek(0)
    ckpt = torch.load(buf, weights_only=True)
    fresh.load_state_dict(ckpt["model"])
    fresh_opt.load_state_dict(ckpt["opt"])
    assert lrtrain.cli.train.ranks(fresh) == saved_ranks
    resumed = _train(fresh, fresh_opt, batches[20:])
    assert resumed == reference  # bitwise: exact float equality of all 20 losses
    assert lrtrain.cli.train.ranks(fresh) == lrtrain.cli.train.ranks(model)
