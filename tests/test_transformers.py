"""Hugging Face transformers: Conv1D conversion, tied weights, the conversion report's counts, DLRT training,
densify, the lrtrain.save_pretrained / from_pretrained round trip, a plain from_pretrained refusing an lrtrain
checkpoint, and the HF Trainer with DLRT (fp32 and bf16 autocast). Models are built from tiny random configs
(no download). The first tests need no transformers."""
import json
import os
import subprocess
import sys

import pytest
import torch
from torch import nn

import lrtrain
from lrtrain import LowRankLinear

pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.one_thread

VOCAB, T = 128, 16


# ---------------------------------------------------------------- without transformers

def test_import_lrtrain_does_not_import_transformers():
    code = ("import sys, lrtrain; bad = [m for m in sys.modules if m.split('.')[0] in ('transformers', 'safetensors')]; "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


class _Custom(nn.Module):
    """A layer type lowrank does not know, with a weight matrix of its own."""

    def __init__(self):
        super().__init__()
        self.proj = nn.Parameter(torch.randn(32, 32))
        self.fc = nn.Linear(32, 32)

    def forward(self, x):
        return self.fc(x @ self.proj)


def test_report_lists_every_dense_matrix_and_shared_modules_stay_shared():
    shared = nn.Linear(32, 32)
    model = nn.Module()
    model.a, model.b, model.custom = shared, shared, _Custom()  # one Linear under two names
    model.emb, model.conv = nn.Embedding(50, 32), nn.Conv1d(32, 32, 3)
    model.mat = nn.Parameter(torch.randn(8, 8))
    n0 = sum(p.numel() for p in model.parameters())
    lrtrain.lowrank(model, rank=4)
    why = dict(model.lrtrain_summary.skipped)
    assert why["a"] == "tied to b.weight" and model.a is model.b and type(model.a) is nn.Linear
    assert why["custom"] == "module type _Custom is not converted: proj stays dense"
    assert isinstance(model.custom.fc, LowRankLinear)  # children of an unknown module are still converted
    assert why["emb"].startswith("embedding") and why["conv"] == "module type Conv1d is not converted: weight stays dense"
    assert why[""] == "parameters of the model itself (mat) are not converted"
    s = model.lrtrain_summary
    assert s.params_before == n0 == lrtrain.summary(model).params_before
    assert s.params_after == sum(p.numel() for p in model.parameters()) == n0 - 32 * 32 + 8 * (32 + 32 + 8)


# ---------------------------------------------------------------- with transformers

@pytest.fixture
def tf():
    transformers = pytest.importorskip("transformers")
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # load reports and progress noise
    yield transformers
    hf_logging.set_verbosity(level)


def _gpt2(tf):
    cfg = tf.GPT2Config(vocab_size=VOCAB, n_positions=32, n_embd=64, n_layer=2, n_head=4, bos_token_id=0,
                        eos_token_id=0, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    return tf.GPT2LMHeadModel(cfg)


def _llama(tf):
    cfg = tf.LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32, bos_token_id=0,
                         eos_token_id=0, pad_token_id=0)
    return tf.LlamaForCausalLM(cfg)


def _bert(tf):
    cfg = tf.BertConfig(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=128, max_position_embeddings=32, pad_token_id=0, hidden_dropout_prob=0.0,
                        attention_probs_dropout_prob=0.0)
    return tf.BertForMaskedLM(cfg)


BUILD = {"gpt2": _gpt2, "llama": _llama, "bert": _bert}
# The layers lowrank must factorize at rank 8 and those it must leave dense (with the reason's start).
EXPECTED = {
    "gpt2": (8, {"lm_head": "tied to transformer.wte.weight", "transformer.wte": "embedding",
                 "transformer.wpe": "embedding"}),
    "llama": (15, {"model.embed_tokens": "embedding"}),  # 7 per block + the untied lm_head
    "bert": (13, {"cls.predictions.decoder": "tied to bert.embeddings.word_embeddings.weight",
                  "bert.embeddings.word_embeddings": "embedding"}),  # 6 per block + pooler (unused by the MLM head)
}


def _batch():
    g = torch.Generator().manual_seed(1)
    return torch.randint(1, VOCAB, (4, T), generator=g)


def _ranks(model):
    return {n: m.rank for n, m in model.named_modules() if isinstance(m, lrtrain.LowRankLinear)}


def test_conv1d_becomes_a_lowrank_linear_of_the_transposed_weight(tf):
    from transformers.pytorch_utils import Conv1D

    conv = Conv1D(48, 40)  # y = x W + b, W (40, 48)
    with torch.no_grad():
        conv.weight.copy_(torch.randn(40, 6) @ torch.randn(6, 48))  # exactly rank 6
        conv.bias.normal_()
    x = torch.randn(5, 7, 40)
    new = lrtrain.lowrank(conv, rank=6)
    assert type(new) is LowRankLinear and (new.in_features, new.out_features, new.rank) == (40, 48, 6)
    torch.testing.assert_close(new(x), conv(x), rtol=1e-5, atol=2e-5)  # rank 6 holds all of W
    back = lrtrain.densify(new)
    assert type(back) is Conv1D and back.weight.shape == (40, 48)
    torch.testing.assert_close(back(x), conv(x), rtol=1e-5, atol=2e-5)

    full = Conv1D(48, 40)  # a generic weight: the layer is its best rank-4 approximation, error = tail of σ
    W = full.weight.detach().clone()
    layer = lrtrain.lowrank(full, rank=4)
    s = torch.linalg.svdvals(W)
    err = torch.linalg.norm(layer.dense_weight() - W.T)
    assert abs(err - s[4:].norm()) < 1e-4 * s.norm()


def test_gpt2_report_counts_and_tied_lm_head(tf):
    model = _gpt2(tf)
    n0 = sum(p.numel() for p in model.parameters())  # shared parameters once: lm_head.weight is wte.weight
    assert n0 == 110_336
    lrtrain.lowrank(model, rank=8)
    s = model.lrtrain_summary
    convs = [n for n, m in model.named_modules() if getattr(m, "_lrtrain_origin", None) == "conv1d"]
    assert len(convs) == 8 and [n for n, *_ in s.layers] == convs
    assert model.lm_head.weight is model.transformer.wte.weight  # never silently untied
    assert dict(s.skipped)["lm_head"] == "tied to transformer.wte.weight"
    after = sum(p.numel() for p in model.parameters())
    # each Conv1D (in x out + out) becomes U, S, V at capacity 16 (+ the same bias)
    shapes = [(64, 192), (64, 64), (64, 256), (256, 64)] * 2
    assert after == n0 - sum(i * o for i, o in shapes) + sum(16 * (i + o + 16) for i, o in shapes) == 46_848
    assert (s.params_before, s.params_after) == (n0, after)
    now = lrtrain.summary(model)
    assert (now.params_before, now.params_after, now.params_active) == (n0, after, s.params_active)
    assert s.params_active == n0 - sum(i * o for i, o in shapes) + sum(8 * (i + o + 8) for i, o in shapes)


@pytest.mark.parametrize("arch", ["gpt2", "llama", "bert"])
def test_convert_train_densify_save_load(tf, arch, tmp_path):
    model = BUILD[arch](tf)
    n0 = sum(p.numel() for p in model.parameters())
    lrtrain.lowrank(model, rank=8)
    n_layers, dense = EXPECTED[arch]
    s = model.lrtrain_summary
    assert len(s.layers) == n_layers
    why = dict(s.skipped)
    assert all(why[name].startswith(reason) for name, reason in dense.items()), s.skipped
    assert s.params_before == n0 == lrtrain.summary(model).params_before
    assert s.params_after == sum(p.numel() for p in model.parameters()) == lrtrain.summary(model).params_after

    # 20 DLRT steps on one repeated batch: the loss must fall
    x = _batch()
    opt = lrtrain.DLRT(model.parameters(), lr=2e-2, tau=0.05)
    model.train()
    losses = []
    for _ in range(20):
        loss = model(input_ids=x, labels=x).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert all(map(torch.isfinite, map(torch.tensor, losses)))
    assert losses[0] > 4.5 and losses[-1] < 0.5 * losses[0], losses  # from ~ln(128) = 4.85
    model.eval()
    with torch.no_grad():
        ref = model(input_ids=x).logits
    ranks = _ranks(model)
    assert len(ranks) == n_layers

    # densify: the same function with dense layers (GPT-2's come back as Conv1D)
    dense_model = lrtrain.densify(model, inplace=False)
    assert not any(isinstance(m, LowRankLinear) for m in dense_model.modules())
    with torch.no_grad():
        assert (dense_model(input_ids=x).logits - ref).abs().max() <= 1e-5

    # lrtrain round trip: same logits, ranks, kinds; ties kept
    lrtrain.save_pretrained(model, tmp_path)
    meta = json.loads((tmp_path / "lrtrain.json").read_text())
    assert {r["name"]: r["rank"] for r in meta["layers"]} == ranks
    assert "lrtrain" in json.loads((tmp_path / "config.json").read_text()) and not hasattr(model.config, "lrtrain")
    loaded = lrtrain.from_pretrained(type(model), tmp_path)
    assert not loaded.training and not hasattr(loaded.config, "lrtrain")
    assert _ranks(loaded) == ranks
    assert {n: m.capacity for n, m in loaded.named_modules() if isinstance(m, LowRankLinear)} == \
           {n: m.capacity for n, m in model.named_modules() if isinstance(m, LowRankLinear)}
    with torch.no_grad():
        assert (loaded(input_ids=x).logits - ref).abs().max() <= 1e-5
    if arch == "gpt2":
        assert all(r["kind"] == "conv1d" for r in meta["layers"])
        assert loaded.lm_head.weight is loaded.transformer.wte.weight
        assert type(lrtrain.densify(loaded).transformer.h[0].mlp.c_fc).__name__ == "Conv1D"
    else:
        assert all(r["kind"] == "linear" for r in meta["layers"])

    # a plain transformers load refuses the lrtrain checkpoint instead of re-initializing the layers at random
    with pytest.raises(RuntimeError, match="ignore_mismatched_sizes"):
        type(model).from_pretrained(tmp_path)
    # ... and what it refuses to do silently: forced, the converted layers come back random
    forced = type(model).from_pretrained(tmp_path, ignore_mismatched_sizes=True)
    with torch.no_grad():
        assert (forced(input_ids=x).logits - ref).abs().max() > 0.1


def test_loaded_model_keeps_training(tf, tmp_path):
    model = lrtrain.lowrank(_gpt2(tf), rank=8)
    lrtrain.save_pretrained(model, tmp_path)
    loaded = lrtrain.from_pretrained(tf.GPT2LMHeadModel, tmp_path)
    x = _batch()
    opt = lrtrain.DLRT(loaded.parameters(), lr=1e-2, refresh=1)  # a basis update at this very step
    U = loaded.transformer.h[0].attn.c_attn.U.detach().clone()
    loaded.train()
    loaded(input_ids=x, labels=x).loss.backward()
    opt.step()
    assert not torch.equal(U, loaded.transformer.h[0].attn.c_attn.U)
    assert opt.skipped_steps == 0


def test_bf16_sharded_checkpoint_round_trip(tf, tmp_path):
    model = lrtrain.lowrank(_gpt2(tf), rank=8).to(torch.bfloat16).eval()
    x = _batch()
    with torch.no_grad():
        ref = model(input_ids=x).logits
    lrtrain.save_pretrained(model, tmp_path, max_shard_size="20KB")
    meta = json.loads((tmp_path / "lrtrain.json").read_text())
    assert meta["weights"] == "model.safetensors.index.json" and len(list(tmp_path.glob("model-*.safetensors"))) > 1
    loaded = lrtrain.from_pretrained(tf.GPT2LMHeadModel, tmp_path)  # the saved dtype by default
    assert loaded.transformer.h[0].attn.c_attn.U.dtype == torch.bfloat16
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=x).logits, ref)
    up = lrtrain.from_pretrained(tf.GPT2LMHeadModel, tmp_path, dtype=torch.float32)
    assert up.transformer.h[0].attn.c_attn.U.dtype == torch.float32
    assert torch.equal(up.transformer.h[0].attn.c_attn.U, model.transformer.h[0].attn.c_attn.U.float())


def test_vit_patch_conv2d_round_trip(tf, tmp_path):
    cfg = tf.ViTConfig(image_size=16, patch_size=4, num_channels=3, hidden_size=64, num_hidden_layers=1,
                       num_attention_heads=4, intermediate_size=128, num_labels=3)
    model = lrtrain.lowrank(tf.ViTForImageClassification(cfg), rank=8).eval()
    patch = model.vit.embeddings.patch_embeddings.projection  # Conv2d(3, 64, 4, stride 4): W is 64 x 48
    assert isinstance(patch, lrtrain.LowRankConv2d) and patch.rank == 8
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        ref = model(pixel_values=x).logits
    lrtrain.save_pretrained(model, tmp_path)
    rec = {r["name"]: r for r in json.loads((tmp_path / "lrtrain.json").read_text())["layers"]}
    assert rec["vit.embeddings.patch_embeddings.projection"]["kind"] == "conv2d"
    loaded = lrtrain.from_pretrained(tf.ViTForImageClassification, tmp_path)
    assert loaded.vit.embeddings.patch_embeddings.projection.stride == (4, 4)
    with torch.no_grad():
        assert (loaded(pixel_values=x).logits - ref).abs().max() <= 1e-5
    with pytest.raises(RuntimeError, match="ignore_mismatched_sizes"):
        tf.ViTForImageClassification.from_pretrained(tmp_path)


def _resign(ck):
    """Record the current sha256 of every weight file in ck/lrtrain.json (a checkpoint edited consistently)."""
    import hashlib

    meta = json.loads((ck / "lrtrain.json").read_text())
    meta["files"] = {n: hashlib.sha256((ck / n).read_bytes()).hexdigest() for n in meta["files"]}
    (ck / "lrtrain.json").write_text(json.dumps(meta))


def test_save_and_load_refuse_bad_input(tf, tmp_path):
    model = lrtrain.lowrank(_gpt2(tf), rank=8)
    with pytest.raises(TypeError, match="PreTrainedModel"):
        lrtrain.save_pretrained(nn.Linear(4, 4), tmp_path)
    with pytest.raises(TypeError, match="directory must be a str"):
        lrtrain.save_pretrained(model, 3)
    with pytest.raises(ValueError, match="push_to_hub"):
        lrtrain.save_pretrained(model, tmp_path, push_to_hub=True)
    plain = tmp_path / "plain"
    _gpt2(tf).save_pretrained(plain)
    with pytest.raises(ValueError, match="not an lrtrain checkpoint"):
        lrtrain.from_pretrained(tf.GPT2LMHeadModel, plain)
    ck = tmp_path / "ck"
    lrtrain.save_pretrained(model, ck)
    with pytest.raises(TypeError, match="PreTrainedModel class"):
        lrtrain.from_pretrained("GPT2LMHeadModel", ck)
    with pytest.raises(TypeError, match="dtype must be a torch.dtype"):
        lrtrain.from_pretrained(tf.GPT2LMHeadModel, ck, dtype="float32")
    with pytest.raises(TypeError, match="unknown config argument"):
        lrtrain.from_pretrained(tf.GPT2LMHeadModel, ck, no_such_option=1)
    with pytest.raises(ValueError, match="does not exist in GPT2Model"):  # the base model has no "transformer."
        lrtrain.from_pretrained(tf.GPT2Model, ck)
    from safetensors.torch import load_file, save_file

    weights = load_file(ck / "model.safetensors")
    save_file({k: v for k, v in weights.items() if k != "transformer.ln_f.weight"}, ck / "model.safetensors",
              metadata={"format": "pt"})
    # an edited weights file no longer matches its sha256 in lrtrain.json; re-signed, it is checked for what it holds
    with pytest.raises(ValueError, match=r"model.safetensors: its sha256 does not match lrtrain.json"):
        lrtrain.from_pretrained(tf.GPT2LMHeadModel, ck)
    _resign(ck)
    with pytest.raises(ValueError, match=r"missing keys \['transformer.ln_f.weight'\]"):
        lrtrain.from_pretrained(tf.GPT2LMHeadModel, ck)
    save_file({**weights, "transformer.extra": torch.zeros(2)}, ck / "model.safetensors", metadata={"format": "pt"})
    _resign(ck)
    with pytest.raises(ValueError, match=r"unexpected keys \['transformer.extra'\]"):
        lrtrain.from_pretrained(tf.GPT2LMHeadModel, ck)
    save_file(weights, ck / "model.safetensors", metadata={"format": "pt"})
    _resign(ck)
    meta = json.loads((ck / "lrtrain.json").read_text())
    meta["layers"][0]["rank"] += 1
    (ck / "lrtrain.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="rank 8 in the weights but 9"):
        lrtrain.from_pretrained(tf.GPT2LMHeadModel, ck)


def _bf16_ok():
    try:
        from transformers.utils import is_torch_bf16_available_on_device

        return is_torch_bf16_available_on_device("cpu")
    except ImportError:
        return False


@pytest.mark.parametrize("bf16", [False, True], ids=["fp32", "bf16"])
def test_hf_trainer_with_dlrt(tf, bf16, tmp_path):
    pytest.importorskip("accelerate")
    if bf16 and not _bf16_ok():
        pytest.skip("this CPU has no bf16 support")
    model = lrtrain.lowrank(_gpt2(tf), rank=8)
    layer = model.transformer.h[1].mlp.c_fc
    U0, S0 = layer.U.detach().clone(), layer.S.detach().clone()
    g = torch.Generator().manual_seed(2)
    data = [{"input_ids": t, "labels": t} for t in torch.randint(1, VOCAB, (16, T), generator=g)]
    args = tf.TrainingArguments(output_dir=str(tmp_path), use_cpu=True, bf16=bf16, report_to=[], max_steps=5,
                                per_device_train_batch_size=4, logging_steps=1, save_strategy="no",
                                dataloader_num_workers=0, disable_tqdm=True)
    opt = lrtrain.DLRT(model.parameters(), lr=1e-2)
    dtypes = set()  # the output dtype of a factorized layer: bf16 under the Trainer's autocast
    hook = layer.register_forward_hook(lambda mod, inp, y: dtypes.add(y.dtype))
    trainer = tf.Trainer(model=model, args=args, train_dataset=data, optimizers=(opt, None))
    out = trainer.train()
    hook.remove()
    assert dtypes == {torch.bfloat16 if bf16 else torch.float32}
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert trainer.state.global_step == 5 and len(losses) == 5
    assert all(torch.isfinite(torch.tensor(losses))) and torch.isfinite(torch.tensor(out.training_loss))
    assert not torch.equal(layer.U, U0) and not torch.equal(layer.S, S0)  # the factors were stepped
    assert model.lm_head.weight is model.transformer.wte.weight
    assert opt.skipped_steps == 0 and layer.U.dtype == torch.float32
    r = layer.rank
    eye = torch.eye(r)
    assert (layer.U[:, :r].T @ layer.U[:, :r] - eye).abs().max() < 1e-4  # still orthonormal
