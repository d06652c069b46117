"""Hugging Face checkpoints of converted models (issue 20 items 8, 9, 13): lrtrain.save_pretrained is atomic (a save
killed while writing leaves the old checkpoint, one killed while renaming leaves a refused directory, never a
loadable mix), lrtrain.json's sha256 per weight file refuses corrupted or mixed files, shard names must stay inside
the checkpoint directory, and a converted model's own save_pretrained (Trainer.save_model, the Trainer's
checkpoints) writes lrtrain's checkpoint; a folder a converted model wrote without lrtrain.json loads from its
tensors. Models are built from tiny random configs (no download)."""
import copy
import hashlib
import json
import os
import pickle
import shutil
import signal
import subprocess
import sys
import textwrap

import pytest
import torch

import lrtrain
from lrtrain.hf import _SavePretrained, _attach
from test_transformers import BUILD, VOCAB, T, _gpt2, tf  # noqa: F401  (tf: the fixture, shared with the round-trip tests)

pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.one_thread

SHARD = "20KB"  # a tiny GPT-2 at rank 8 in 12 shards




def _lowrank(model):
    """lrtrain.lowrank at rank 8; one layer brought to rank 5 (the ranks differ between layers)."""
    model = lrtrain.lowrank(model, rank=8)
    if not isinstance(vars(model).get("save_pretrained"), _SavePretrained):
        _attach(model)  # until lrtrain/convert.py's lowrank calls lrtrain.hf._attach itself (see the test below)
    layer = next(m for m in model.modules() if isinstance(m, lrtrain.LowRankLinear))
    with torch.no_grad():
        U, S, V = (t.detach().clone() for t in layer.factors())
        layer.write_factors(U[:, :5], S[:5, :5], V[:, :5])
    return model.eval()


def _x():
    return torch.randint(1, VOCAB, (4, T), generator=torch.Generator().manual_seed(1))


def _logits(model):
    model.eval()
    with torch.no_grad():
        return model(input_ids=_x()).logits


def _ranks(model):
    return {n: (m.rank, m.capacity) for n, m in model.named_modules() if isinstance(m, lrtrain.LowRankLinear)}


def _files(directory):
    """Every file under ``directory`` (relative path -> bytes): what a refused call must leave as it was."""
    out = {}
    for root, _, names in os.walk(directory):
        for n in names:
            p = os.path.join(root, n)
            with open(p, "rb") as f:
                out[os.path.relpath(p, directory)] = f.read()
    return out


def _state(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _same_state(model, state):
    now = model.state_dict()
    return now.keys() == state.keys() and all(torch.equal(now[k], v) for k, v in state.items())


def _resign(ck):
    meta = json.loads((ck / "lrtrain.json").read_text())
    meta["files"] = {n: hashlib.sha256((ck / n).read_bytes()).hexdigest() for n in meta["files"]}
    (ck / "lrtrain.json").write_text(json.dumps(meta))


def _two_models(tf, tmp_path):
    """Model A saved in 12 shards at tmp_path/ck, and model B (other weights, the same shard names)."""
    a = _lowrank(_gpt2(tf))
    ck = tmp_path / "ck"
    lrtrain.save_pretrained(a, ck, max_shard_size=SHARD)
    torch.manual_seed(1)
    b = _lowrank(_gpt2(tf))
    return a, b, ck


# ---------------------------------------------------------------- item 8: atomic save, checksums

def test_checksums_of_every_weight_file_are_recorded(tf, tmp_path):
    model = _lowrank(_gpt2(tf))
    lrtrain.save_pretrained(model, tmp_path, max_shard_size=SHARD)
    meta = json.loads((tmp_path / "lrtrain.json").read_text())
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    shards = set(index["weight_map"].values())
    assert len(shards) > 2 and set(meta["files"]) == shards | {"model.safetensors.index.json"}
    assert all(meta["files"][n] == hashlib.sha256((tmp_path / n).read_bytes()).hexdigest() for n in meta["files"])
    assert not [n for n in os.listdir(tmp_path) if n.startswith(".lrtrain-tmp")]  # the temporary directory is gone


def test_save_killed_while_writing_shards_leaves_the_old_checkpoint(tf, tmp_path, monkeypatch):
    import transformers.modeling_utils as mu

    a, b, ck = _two_models(tf, tmp_path)
    before, ref = _files(ck), _logits(a)
    real, calls = mu.safe_save_file, []

    def killed_after_one(*args, **kwargs):
        if calls:
            raise KeyboardInterrupt("killed between shards")
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(mu, "safe_save_file", killed_after_one)
    with pytest.raises(KeyboardInterrupt):
        lrtrain.save_pretrained(b, ck, max_shard_size=SHARD)
    monkeypatch.setattr(mu, "safe_save_file", real)
    assert calls and _files(ck) == before  # nothing of B reached the checkpoint
    assert torch.equal(_logits(lrtrain.from_pretrained(tf.GPT2LMHeadModel, ck)), ref)
    lrtrain.save_pretrained(b, ck, max_shard_size=SHARD)  # an uninterrupted save: B
    assert torch.equal(_logits(lrtrain.from_pretrained(tf.GPT2LMHeadModel, ck)), _logits(b))


def test_save_killed_while_renaming_is_refused_never_a_mix(tf, tmp_path, monkeypatch):
    a, b, ck = _two_models(tf, tmp_path)
    ref_a, ref_b = _logits(a), _logits(b)
    pristine = tmp_path / "pristine"
    shutil.copytree(ck, pristine)
    real = os.replace
    n_files = len(os.listdir(pristine))
    outcomes = []
    for k in range(n_files):  # killed after k renames: 0 (the old checkpoint) ... all but the last
        shutil.rmtree(ck)
        shutil.copytree(pristine, ck)
        done = []

        def replace(src, dst, *args, **kwargs):
            if os.path.dirname(os.fspath(dst)) == os.fspath(ck) and len(done) == k:
                raise KeyboardInterrupt(f"killed after {k} renames")
            done.append(dst)
            return real(src, dst, *args, **kwargs)

        monkeypatch.setattr(os, "replace", replace)
        with pytest.raises(KeyboardInterrupt):
            lrtrain.save_pretrained(b, ck, max_shard_size=SHARD)
        monkeypatch.setattr(os, "replace", real)
        try:
            logits = _logits(lrtrain.from_pretrained(tf.GPT2LMHeadModel, ck))
        except ValueError as e:
            assert "lrtrain.json" in str(e)
            outcomes.append("refused")
        else:
            same_a, same_b = torch.equal(logits, ref_a), torch.equal(logits, ref_b)
            assert same_a or same_b, f"killed after {k} renames: a mix of the two models loads"
            outcomes.append("old" if same_a else "new")
    # lrtrain.json is renamed first, the shard index last (B's index is A's, byte for byte: then B is whole)
    assert outcomes[0] == "old" and outcomes[1:-1] == ["refused"] * (n_files - 2), outcomes
    assert outcomes[-1] in ("refused", "new"), outcomes
    lrtrain.save_pretrained(b, ck, max_shard_size=SHARD)
    assert torch.equal(_logits(lrtrain.from_pretrained(tf.GPT2LMHeadModel, ck)), ref_b)


@pytest.mark.parametrize("when", ["writing", "renaming"])
def test_save_killed_by_sigkill(tf, tmp_path, when):
    a, b, ck = _two_models(tf, tmp_path)
    before, ref = _files(ck), _logits(a)
    torch.save(b.state_dict(), tmp_path / "b.pt")
    script = textwrap.dedent(f"""
        import os, signal, torch, transformers, transformers.modeling_utils as mu, lrtrain
        cfg = transformers.GPT2Config.from_pretrained({str(ck)!r})
        model = lrtrain.lowrank(transformers.GPT2LMHeadModel(cfg), rank=8)
        model.load_state_dict(torch.load({str(tmp_path / "b.pt")!r}))
        real_save, real_replace, n = mu.safe_save_file, os.replace, [0]
        def kill_after(k):
            n[0] += 1
            if n[0] > k:
                os.kill(os.getpid(), signal.SIGKILL)
        def save(*a, **kw):
            kill_after(1)
            return real_save(*a, **kw)
        def replace(*a, **kw):
            kill_after(3)
            return real_replace(*a, **kw)
        if {when!r} == "writing":
            mu.safe_save_file = save
        else:
            os.replace = replace
        lrtrain.save_pretrained(model, {str(ck)!r}, max_shard_size={SHARD!r})
    """)
    proc = subprocess.run([sys.executable, "-c", script], timeout=300, capture_output=True, text=True,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    left = _files(ck)
    tmp = {p for p in left if p.startswith(".lrtrain-tmp-")}  # what the killed save had written
    assert tmp
    if when == "writing":  # the checkpoint itself is untouched and loads as A exactly
        assert {p: v for p, v in left.items() if p not in tmp} == before
        assert torch.equal(_logits(lrtrain.from_pretrained(tf.GPT2LMHeadModel, ck)), ref)
    else:  # lrtrain.json and two more files renamed: the old shards do not match the new lrtrain.json
        with pytest.raises(ValueError, match="does not match lrtrain.json"):
            lrtrain.from_pretrained(tf.GPT2LMHeadModel, ck)
    lrtrain.save_pretrained(b, ck, max_shard_size=SHARD)  # saving again repairs it
    assert torch.equal(_logits(lrtrain.from_pretrained(tf.GPT2LMHeadModel, ck)), _logits(b))


def test_single_file_save_replaces_by_rename_and_stale_shards_go(tf, tmp_path, monkeypatch):
    a, b, ck = _two_models(tf, tmp_path)
    inode = os.stat(ck / "lrtrain.json").st_ino
    lrtrain.save_pretrained(b, ck)  # one file now: the 12 shards and their index are removed
    assert sorted(os.listdir(ck)) == ["config.json", "generation_config.json", "lrtrain.json", "model.safetensors"]
    assert os.stat(ck / "lrtrain.json").st_ino != inode  # a new file renamed into place, not overwritten
    assert torch.equal(_logits(lrtrain.from_pretrained(tf.GPT2LMHeadModel, ck)), _logits(b))
    # killed while writing the single file: the old file stays whole
    import transformers.modeling_utils as mu

    before = _files(ck)

    def killed(*args, **kwargs):
        raise KeyboardInterrupt("killed while writing")

    monkeypatch.setattr(mu, "safe_save_file", killed)
    with pytest.raises(KeyboardInterrupt):
        lrtrain.save_pretrained(a, ck)
    assert _files(ck) == before
    monkeypatch.undo()
    lrtrain.save_pretrained(a, ck, max_shard_size=SHARD)  # and back to shards: model.safetensors goes
    assert "model.safetensors" not in os.listdir(ck)
    assert torch.equal(_logits(lrtrain.from_pretrained(tf.GPT2LMHeadModel, ck)), _logits(a))


def test_corrupted_missing_or_unlisted_weight_files_are_refused(tf, tmp_path):
    model = _lowrank(_gpt2(tf))
    lrtrain.save_pretrained(model, tmp_path / "ck", max_shard_size=SHARD)
    pristine = tmp_path / "ck"
    shard = "model-00003-of-00012.safetensors"

    def case(edit):
        ck = tmp_path / f"case{len(os.listdir(tmp_path))}"
        shutil.copytree(pristine, ck)
        edit(ck)
        before = _files(ck)
        with pytest.raises(ValueError) as err:
            lrtrain.from_pretrained(tf.GPT2LMHeadModel, ck)
        assert _files(ck) == before  # a refused load changes nothing
        return str(err.value)

    def flip(name, where):
        def edit(ck):
            data = bytearray((ck / name).read_bytes())
            data[where(len(data))] ^= 0x10  # one bit
            (ck / name).write_bytes(bytes(data))
        return edit

    msg = case(flip(shard, lambda n: n - 7))  # in the tensor data
    assert f"{shard}: its sha256 does not match lrtrain.json" in msg
    assert f"{shard}: its sha256" in case(flip(shard, lambda n: 20))  # in the header
    assert "model.safetensors.index.json: its sha256" in case(flip("model.safetensors.index.json", lambda n: 40))
    assert f"{shard}: missing" in case(lambda ck: os.remove(ck / shard))

    def unlisted(ck):
        meta = json.loads((ck / "lrtrain.json").read_text())
        del meta["files"][shard]
        (ck / "lrtrain.json").write_text(json.dumps(meta))

    assert "lists the weight files" in case(unlisted)

    def bad_sum(ck):
        meta = json.loads((ck / "lrtrain.json").read_text())
        meta["files"][shard] = "0" * 63
        (ck / "lrtrain.json").write_text(json.dumps(meta))

    assert "64 hex digits" in case(bad_sum)
    assert torch.equal(_logits(lrtrain.from_pretrained(tf.GPT2LMHeadModel, pristine)), _logits(model))


def test_refused_saves_change_nothing(tf, tmp_path):
    model = _lowrank(_gpt2(tf))
    ck = tmp_path / "ck"
    lrtrain.save_pretrained(model, ck)
    before, state = _files(ck), _state(model)
    for call in (lambda: lrtrain.save_pretrained(model, ck, push_to_hub=True),
                 lambda: lrtrain.save_pretrained(model, ck, state_dict=model.state_dict()),
                 lambda: lrtrain.save_pretrained(model, ck, distributed_checkpoint=True),
                 lambda: lrtrain.save_pretrained(model, ck, save_original_format=True),
                 lambda: lrtrain.save_pretrained(model, ck, variant=3),
                 lambda: model.save_pretrained(ck, push_to_hub=True),
                 lambda: model.save_pretrained(ck, save_original_format=True),
                 lambda: model.save_pretrained(ck, distributed_checkpoint=True)):
        with pytest.raises((ValueError, TypeError)):
            call()
        assert _files(ck) == before and _same_state(model, state)
    fresh = lrtrain.lowrank(_gpt2(tf), rank=8)
    vars(fresh).pop("save_pretrained", None)
    with pytest.raises(ValueError, match="push_to_hub"):
        lrtrain.save_pretrained(fresh, ck, push_to_hub=True)
    assert "save_pretrained" not in vars(fresh) and _files(ck) == before  # not even attached


def test_format_1_checkpoints_without_checksums_still_load(tf, tmp_path):
    model = _lowrank(_gpt2(tf))
    lrtrain.save_pretrained(model, tmp_path, max_shard_size=SHARD)
    meta = json.loads((tmp_path / "lrtrain.json").read_text())
    del meta["files"]
    (tmp_path / "lrtrain.json").write_text(json.dumps({**meta, "format": 1}))  # as lrtrain wrote it before sha256
    assert torch.equal(_logits(lrtrain.from_pretrained(tf.GPT2LMHeadModel, tmp_path)), _logits(model))
    (tmp_path / "lrtrain.json").write_text(json.dumps({**meta, "format": True}))
    with pytest.raises(ValueError, match="format 1 or 2"):
        lrtrain.from_pretrained(tf.GPT2LMHeadModel, tmp_path)


def test_other_processes_write_nothing_and_positional_arguments_bind(tf, tmp_path):
    model = _lowrank(_gpt2(tf))
    model.save_pretrained(tmp_path / "rank1", is_main_process=False)
    assert not os.listdir(tmp_path / "rank1")  # as transformers: the directory, nothing in it
    assert lrtrain.save_pretrained(model, tmp_path / "rank1", is_main_process=False) is None
    assert not os.listdir(tmp_path / "rank1")
    model.save_pretrained(str(tmp_path / "pos"), True, None, False, SHARD)  # is_main_process, state_dict, hub, shard
    assert len(json.loads((tmp_path / "pos" / "lrtrain.json").read_text())["files"]) > 2
    with pytest.raises(TypeError):
        model.save_pretrained()


# ---------------------------------------------------------------- item 9: shard names stay inside the directory

@pytest.mark.parametrize("how", ["dotdot", "absolute", "subdir", "backslash", "symlink_out"])
@pytest.mark.parametrize("with_json", [True, False], ids=["lrtrain.json", "no-lrtrain.json"])
def test_shard_names_outside_the_directory_are_refused_before_reading(tf, tmp_path, monkeypatch, how, with_json):
    model = _lowrank(_gpt2(tf))
    ck = tmp_path / "ck"
    if with_json:
        lrtrain.save_pretrained(model, ck, max_shard_size=SHARD)
    else:  # what a plain save_pretrained of a converted model wrote (read from its tensors)
        type(model).save_pretrained(model, ck, max_shard_size=SHARD)
    index_path = ck / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    victim = sorted(set(index["weight_map"].values()))[1]
    outside = tmp_path / "outside.safetensors"
    shutil.copy(ck / victim, outside)  # the same tensors: followed, the load would succeed
    name = {"dotdot": "../outside.safetensors", "absolute": str(outside), "subdir": "sub/outside.safetensors",
            "backslash": "sub\\outside.safetensors", "symlink_out": "link.safetensors"}[how]
    (ck / "sub").mkdir()
    shutil.copy(outside, ck / "sub" / "outside.safetensors")
    if how == "symlink_out":
        os.symlink(outside, ck / name)
    elif how == "backslash" and os.sep == "/":
        shutil.copy(outside, ck / name)  # on POSIX a file of that name
    index["weight_map"] = {k: name if v == victim else v for k, v in index["weight_map"].items()}
    index_path.write_text(json.dumps(index))
    os.remove(ck / victim)
    if with_json:
        meta = json.loads((ck / "lrtrain.json").read_text())
        meta["files"] = {(name if n == victim else n): s for n, s in meta["files"].items()}
        (ck / "lrtrain.json").write_text(json.dumps(meta))
        _resign(ck)  # consistent: the names, not the checksums, must refuse it

    import safetensors.torch

    def no_reading(*args, **kwargs):
        raise AssertionError("a weight file was read before the shard names were checked")

    monkeypatch.setattr(safetensors.torch, "load_file", no_reading)
    before = _files(ck)
    match = "symbolic link leading out" if how == "symlink_out" else "must be a plain file name"
    with pytest.raises(ValueError, match=match):
        lrtrain.from_pretrained(tf.GPT2LMHeadModel, ck)
    assert _files(ck) == before


def test_names_in_lrtrain_json_must_be_plain_and_inner_symlinks_are_fine(tf, tmp_path):
    model = _lowrank(_gpt2(tf))
    ck = tmp_path / "ck"
    lrtrain.save_pretrained(model, ck)
    meta = json.loads((ck / "lrtrain.json").read_text())
    for bad in ("../ck/model.safetensors", str(ck / "model.safetensors"), ".."):
        (ck / "lrtrain.json").write_text(json.dumps({**meta, "weights": bad}))
        with pytest.raises(ValueError, match="must be a plain file name"):
            lrtrain.from_pretrained(tf.GPT2LMHeadModel, ck)
        (ck / "lrtrain.json").write_text(json.dumps({**meta, "files": {**meta["files"], bad: "0" * 64}}))
        with pytest.raises(ValueError, match="must be a plain file name"):
            lrtrain.from_pretrained(tf.GPT2LMHeadModel, ck)
    # a symbolic link that stays inside the directory is a file of the checkpoint
    os.rename(ck / "model.safetensors", ck / "weights.bin.real")
    os.symlink("weights.bin.real", ck / "model.safetensors")
    (ck / "lrtrain.json").write_text(json.dumps(meta))
    assert torch.equal(_logits(lrtrain.from_pretrained(tf.GPT2LMHeadModel, ck)), _logits(model))


# ---------------------------------------------------------------- item 13: the converted model's own save_pretrained

def test_lowrank_attaches_lrtrain_save_pretrained(tf):
    model = lrtrain.lowrank(_gpt2(tf), rank=8)
    if not isinstance(vars(model).get("save_pretrained"), _SavePretrained):
        pytest.skip("lrtrain/convert.py: lowrank does not call lrtrain.hf._attach yet (the lead's change)")
    assert type(model).save_pretrained is tf.PreTrainedModel.save_pretrained  # the class is untouched
    plain = lrtrain.lowrank(torch.nn.Sequential(torch.nn.Linear(32, 32)), rank=4)
    assert "save_pretrained" not in vars(plain)  # not a transformers model: nothing attached


@pytest.mark.parametrize("arch", ["gpt2", "llama", "bert"])
def test_models_own_save_pretrained_writes_lrtrain_checkpoint(tf, arch, tmp_path):
    model = _lowrank(BUILD[arch](tf))
    ref, ranks = _logits(model), _ranks(model)
    model.save_pretrained(tmp_path)  # plain transformers API, as Trainer.save_model calls it
    meta = json.loads((tmp_path / "lrtrain.json").read_text())
    assert {r["name"]: (r["rank"], r["capacity"]) for r in meta["layers"]} == ranks
    loaded = lrtrain.from_pretrained(type(model), tmp_path)
    assert _ranks(loaded) == ranks and torch.equal(_logits(loaded), ref)
    # a plain ModelClass.from_pretrained refuses it, as it refuses lrtrain.save_pretrained's checkpoints
    with pytest.raises(RuntimeError, match="ignore_mismatched_sizes"):
        type(model).from_pretrained(tmp_path)
    # the loaded model's save_pretrained writes lrtrain's checkpoint too; so do a deepcopy and an unpickled copy
    for other in (loaded, copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
        d = tmp_path / f"again{len(os.listdir(tmp_path))}"
        other.save_pretrained(d, max_shard_size=SHARD)
        assert torch.equal(_logits(lrtrain.from_pretrained(type(model), d)), ref)
    # and load_state_dict of such a checkpoint (what the Trainer's resume does) ignores lrtrain's markers
    from safetensors.torch import load_file

    fresh = _lowrank(BUILD[arch](tf))
    result = fresh.load_state_dict(load_file(tmp_path / "model.safetensors"), strict=False)
    assert not result.unexpected_keys and torch.equal(_logits(fresh), ref)


def test_trainer_save_model_and_checkpoints_are_lrtrain_checkpoints(tf, tmp_path):
    pytest.importorskip("accelerate")
    model = _lowrank(_gpt2(tf))
    g = torch.Generator().manual_seed(2)
    data = [{"input_ids": t, "labels": t} for t in torch.randint(1, VOCAB, (16, T), generator=g)]

    def trainer(m, **kw):
        args = tf.TrainingArguments(output_dir=str(tmp_path / "run"), use_cpu=True, report_to=[], max_steps=4,
                                    per_device_train_batch_size=4, dataloader_num_workers=0, disable_tqdm=True,
                                    **kw)
        return tf.Trainer(model=m, args=args, train_dataset=data,
                          optimizers=(lrtrain.DLRT(m.parameters(), lr=1e-2), None))

    t = trainer(model, save_strategy="steps", save_steps=2)
    t.train()
    ref = _logits(model)
    for step in (2, 4):
        ck = tmp_path / "run" / f"checkpoint-{step}"
        assert (ck / "lrtrain.json").is_file()
        with pytest.raises(RuntimeError, match="ignore_mismatched_sizes"):
            tf.GPT2LMHeadModel.from_pretrained(ck)
    assert torch.equal(_logits(lrtrain.from_pretrained(tf.GPT2LMHeadModel, tmp_path / "run" / "checkpoint-4")), ref)
    t.save_model(str(tmp_path / "final"))
    assert torch.equal(_logits(lrtrain.from_pretrained(tf.GPT2LMHeadModel, tmp_path / "final")), ref)
    # resuming from checkpoint-2 into a freshly converted model reaches the same model
    torch.manual_seed(0)
    again = _lowrank(_gpt2(tf))
    trainer(again, save_strategy="no").train(resume_from_checkpoint=str(tmp_path / "run" / "checkpoint-2"))
    assert torch.equal(_logits(again), ref)


@pytest.mark.parametrize("arch", ["gpt2", "llama", "bert"])
def test_folder_written_without_lrtrain_json_loads_from_its_tensors(tf, arch, tmp_path):
    model = _lowrank(BUILD[arch](tf))
    ref, ranks = _logits(model), _ranks(model)
    type(model).save_pretrained(model, tmp_path)  # the plain transformers save (what a save without lrtrain wrote)
    assert not (tmp_path / "lrtrain.json").exists()
    before = _files(tmp_path)
    with pytest.warns(UserWarning, match="no lrtrain.json"):
        loaded = lrtrain.from_pretrained(type(model), tmp_path)
    assert _ranks(loaded) == ranks and torch.equal(_logits(loaded), ref)
    assert all(m.max_rank == m.capacity for m in loaded.modules() if isinstance(m, lrtrain.LowRankLinear))
    assert _files(tmp_path) == before
    # saved again, it is a complete lrtrain checkpoint
    loaded.save_pretrained(tmp_path / "again")
    assert torch.equal(_logits(lrtrain.from_pretrained(type(model), tmp_path / "again")), ref)


def test_refusals_recommend_the_plain_route_only_for_plain_checkpoints(tf, tmp_path):
    model = _lowrank(_gpt2(tf))
    ck = tmp_path / "ck"
    model.save_pretrained(ck)
    os.remove(ck / "lrtrain.json")  # lrtrain's checkpoint without its lrtrain.json: refused, not read as plain
    with pytest.raises(ValueError) as err:
        lrtrain.from_pretrained(tf.GPT2LMHeadModel, ck)
    assert "lrtrain.json is missing" in str(err.value) and "ModelClass.from_pretrained" not in str(err.value)
    plain = tmp_path / "plain"
    _gpt2(tf).save_pretrained(plain)
    with pytest.raises(ValueError, match="not an lrtrain checkpoint.*ModelClass.from_pretrained"):
        lrtrain.from_pretrained(tf.GPT2LMHeadModel, plain)
    (tmp_path / "empty").mkdir()
    shutil.copy(plain / "config.json", tmp_path / "empty")
    with pytest.raises(ValueError, match="neither lrtrain.json nor a weights file"):
        lrtrain.from_pretrained(tf.GPT2LMHeadModel, tmp_path / "empty")


def test_densified_model_saves_a_plain_checkpoint(tf, tmp_path):
    model = _lowrank(_gpt2(tf))
    ref = _logits(model)
    model.save_pretrained(tmp_path)
    lrtrain.densify(model)  # no factorized layer left: the plain transformers save, over the lrtrain checkpoint
    model.save_pretrained(tmp_path)
    assert not (tmp_path / "lrtrain.json").exists()
    dense = tf.GPT2LMHeadModel.from_pretrained(tmp_path)
    assert (_logits(dense) - ref).abs().max() <= 1e-5
