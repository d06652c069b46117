"""Hugging Face transformers round trip for models converted by :func:`lrtrain.lowrank`.

``save_pretrained(model, directory)`` writes what ``model.save_pretrained`` writes (config.json, the
safetensors weights, generation_config.json) with the factorized layers stored as their factors
(``<layer>.U``, ``.S``, ``.V``, ``.active_rank``, ``.bias``), plus ``lrtrain.json``: per factorized layer its
qualified name, kind ("linear", "conv1d" for a layer converted from a transformers Conv1D, "conv2d"),
shape, rank, capacity and max_rank, and the sha256 of every weight file (each shard and the shard index).
``from_pretrained(ModelClass, directory)`` checks the weight files against those checksums, rebuilds the model
from the config, gives the recorded layers their factorized structure and loads the saved tensors strictly.

Saving is atomic per checkpoint: the files are written into a temporary directory inside ``directory``
(``.lrtrain-tmp-*``) and renamed into place, ``lrtrain.json`` first, the weight files last; a save killed on
the way leaves the old checkpoint intact (killed while writing) or a directory that ``from_pretrained`` refuses
(killed while renaming: the new ``lrtrain.json`` does not match the files still in place), never a loadable
mix of two models. Weight file names (``lrtrain.json``'s and the shard index's) must be plain file names inside
the directory: no path separator, no ``..``, not absolute, no symbolic link leading out of it.

A converted transformers model's own ``save_pretrained`` writes this checkpoint too (so do ``Trainer.save_model``,
the Trainer's checkpoints and ``push_to_hub``, which go through it): :func:`_attach`, which ``lowrank``,
``save_pretrained`` and ``from_pretrained`` apply, sets an instance attribute ``save_pretrained`` (the class's
method is untouched; once no layer is factorized, e.g. after ``densify``, it is the plain transformers save) and
a ``load_state_dict`` pre-hook that drops the markers below (so the Trainer's resume loads such a checkpoint
into the converted model without "unexpected keys"). A folder that a converted model wrote without
``lrtrain.json`` (a plain ``save_pretrained`` of a model not so attached, e.g. by an older lrtrain) is read too:
the layer records are derived from the tensors (the factors' shapes, the ``active_rank`` buffers; max_rank,
which is not state, is set to the capacity), with a warning that no checksum verifies the files.

A plain ``ModelClass.from_pretrained(directory)`` (or ``AutoModel...``) on an lrtrain checkpoint raises instead
of silently re-initializing the converted layers at random: next to the factors, each factorized layer's
``<layer>.weight`` is saved as a one-element marker tensor, so transformers finds a size mismatch for every
converted layer and refuses to load ("You set `ignore_mismatched_sizes` to `False`, thus raising an error",
after a report listing those layers; with ``ignore_mismatched_sizes=True`` it loads them re-initialized and
says so). config.json also carries an ``"lrtrain"`` entry naming the loader; ``from_pretrained`` removes it.

transformers is imported lazily, inside these functions: ``import lrtrain`` never needs it.
"""
from __future__ import annotations

import hashlib
import inspect
import json
import os
import re
import shutil
import sys
import tempfile
import warnings

import torch
from torch import nn

from . import convert
from .convert import _aliases
from .layers.factors import FactorizedMixin
from .layers.kinds import KINDS, kind_named, kind_of

__all__ = ["save_pretrained", "from_pretrained", "LAYERS_FILE"]

LAYERS_FILE = "lrtrain.json"
CONFIG_KEY = "lrtrain"
FORMAT = 2  # 2: + "files", the sha256 of each weight file; format 1 (no checksums) is still read
_READ_FORMATS = (1, 2)
TMP_PREFIX = ".lrtrain-tmp-"
_NOTE = ("low-rank checkpoint written by lrtrain: load it with lrtrain.from_pretrained(ModelClass, directory); "
         "ModelClass.from_pretrained refuses it (size mismatch for each factorized layer's .weight) rather than "
         "re-initialize those layers at random")
# Names under which transformers writes weights (without a variant), in the order its loader prefers them.
_WEIGHT_NAMES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                 "pytorch_model.bin.index.json")
_SHA256 = re.compile(r"[0-9a-f]{64}")


def _check_directory(directory) -> str:
    if not isinstance(directory, (str, os.PathLike)):
        raise TypeError(f"directory must be a str or os.PathLike, got {type(directory).__name__}")
    return os.fspath(directory)


def _add_variant(name: str, variant: str | None) -> str:
    """transformers' file naming: model.safetensors -> model.<variant>.safetensors."""
    if variant is None:
        return name
    stem, ext = name.rsplit(".", 1)
    return f"{stem}.{variant}.{ext}"


def _weights_file(directory: str, variant: str | None) -> str:
    """The weights file (or shard index) that ``save_pretrained`` just wrote in ``directory``: the newest of the
    names transformers uses (a file left by an earlier save into the same directory is older)."""
    names = [_add_variant(n, variant) for n in _WEIGHT_NAMES]
    found = [n for n in names if os.path.isfile(os.path.join(directory, n))]
    if not found:
        raise RuntimeError(f"save_pretrained wrote no weights file that lrtrain recognizes in {directory!r} "
                           f"(found {sorted(os.listdir(directory))})")
    return max(found, key=lambda n: os.stat(os.path.join(directory, n)).st_mtime_ns)


def _is_weights_name(name: str, variant: str | None) -> bool:
    """Whether transformers would write ``name`` as (part of) a checkpoint's weights for ``variant``."""
    if name in {_add_variant(n, variant) for n in _WEIGHT_NAMES}:
        return True
    stem = "model" if variant is None else f"model.{variant}"
    return re.fullmatch(re.escape(stem) + r"-\d{5}-of-\d{5}\.safetensors", name) is not None


def _path_in(directory: str, name, what: str) -> str:
    """The path of the file ``name`` in ``directory``; ValueError unless ``name`` is a plain file name there (no
    path separator, no '..', not absolute) that is not a symbolic link leading out of the directory."""
    if not isinstance(name, str) or name in ("", ".", "..") or any(c in name for c in "/\\\0") \
            or os.path.isabs(name) or os.path.splitdrive(name)[0]:
        raise ValueError(f"{directory}: {what} {name!r} must be a plain file name inside the checkpoint directory "
                         "(no path separator, no '..', not an absolute path)")
    path = os.path.join(directory, name)
    root, real = os.path.realpath(directory), os.path.realpath(path)
    if real == root or os.path.commonpath([root, real]) != root:
        raise ValueError(f"{directory}: {what} {name!r} is a symbolic link leading out of the checkpoint "
                         f"directory (to {real!r})")
    return path


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _fsync(path: str) -> None:
    """Flush a file or directory to the disk (where the platform allows it: a rename is then durable)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _record(name: str, layer: FactorizedMixin) -> dict:
    """The json entry of one factorized layer: enough to rebuild its structure (the tensors come from the weights):
    name, rank, capacity, max_rank, bias, kind and the kind's structure fields."""
    kind = kind_of(layer)
    if kind is None:
        raise TypeError(f"{name}: factorized layer of unknown type {type(layer).__name__}")
    return {"name": name, "rank": layer.rank, "capacity": layer.capacity, "max_rank": layer.max_rank,
            "bias": layer.bias is not None, "kind": kind.name, **kind.structure(layer)}


def _check_model(model) -> None:
    if not isinstance(model, nn.Module) or not callable(getattr(model, "save_pretrained", None)) \
            or getattr(model, "config", None) is None:
        raise TypeError(f"model must be a transformers PreTrainedModel (an nn.Module with .config and .save_pretrained), "
                        f"got {type(model).__name__}")


def _original_save(model: nn.Module):
    """The class's ``save_pretrained`` bound to ``model`` (not the instance attribute :func:`_attach` sets)."""
    return type(model).save_pretrained.__get__(model, type(model))


def _factorized(model: nn.Module) -> list:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, FactorizedMixin)]


def save_pretrained(model: nn.Module, directory, **kwargs) -> str | None:
    """Write ``model`` (a transformers PreTrainedModel, converted or not) to ``directory`` for
    :func:`from_pretrained`: what ``model.save_pretrained(directory, **kwargs)`` writes, with the factors as
    tensors, one marker ``<layer>.weight`` per factorized layer (a plain ``ModelClass.from_pretrained`` then refuses
    the checkpoint), an ``"lrtrain"`` entry in config.json, and ``lrtrain.json`` with each factorized layer's name,
    kind, shape, rank, capacity and max_rank and the sha256 of every weight file. Atomic: written into a
    temporary directory inside ``directory`` and renamed into place (see the module doc); weight files of an
    earlier checkpoint in ``directory`` that this one does not use are removed. ``kwargs`` go to
    ``model.save_pretrained`` (e.g. ``max_shard_size``, ``variant``); ``state_dict``, ``push_to_hub`` and
    ``distributed_checkpoint`` are refused (``model.push_to_hub(repo)`` uploads an lrtrain checkpoint), and keys are
    saved as the modules name them (transformers 5's ``save_original_format=False``). ``model.config`` is not
    modified; afterwards ``model.save_pretrained`` writes lrtrain checkpoints too (:func:`_attach`). Returns the
    path of ``lrtrain.json`` (None when ``is_main_process=False``: like transformers, nothing is written then).
    """
    _check_model(model)
    directory = _check_directory(directory)
    for bad in ("state_dict", "push_to_hub", "distributed_checkpoint"):
        if bad in kwargs:
            raise ValueError(f"lrtrain.save_pretrained writes its own state dict and files; {bad}= is not supported "
                             "(save, then upload the directory, or call model.push_to_hub(repo_id))")
    path = _save(model, directory, None, kwargs)
    _attach(model)
    return path


def _save(model: nn.Module, directory: str, state_dict, kwargs: dict) -> str | None:
    """lrtrain's checkpoint of ``model`` in ``directory`` (the tensors: ``state_dict``, default the model's)."""
    original = _original_save(model)
    kwargs = dict(kwargs)
    if "save_original_format" in inspect.signature(original).parameters:
        # transformers 5 renames some models' keys on save (ViT: vit.layers.0.attention.q_proj -> the older
        # vit.encoder.layer.0.attention.attention.query) and back on load; lrtrain's loader reads the keys as the
        # modules name them, so the checkpoint keeps them.
        if kwargs.get("save_original_format", False):
            raise ValueError("save_original_format=True is not supported: lrtrain checkpoints keep the module names")
        kwargs["save_original_format"] = False
    variant = kwargs.get("variant")
    if variant is not None and not isinstance(variant, str):
        raise TypeError(f"variant must be a str or None, got {variant!r}")
    if os.path.exists(directory) and not os.path.isdir(directory):
        raise ValueError(f"{directory!r} exists and is not a directory")
    layers = [_record(n, m) for n, m in _factorized(model)]
    state = dict(model.state_dict() if state_dict is None else state_dict)
    for rec in layers:
        key = f"{rec['name']}.weight"
        if key in state:
            raise RuntimeError(f"{key} already in the state dict of a factorized layer")
        if f"{rec['name']}.U" in state:
            # One element, never the shape transformers expects: a plain from_pretrained reports a size mismatch.
            state[key] = torch.zeros(1, dtype=state[f"{rec['name']}.U"].dtype)
    if not kwargs.get("is_main_process", True):  # transformers writes nothing on the other processes
        original(directory, state_dict=state, **kwargs)
        return None
    os.makedirs(directory, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=TMP_PREFIX, dir=directory)
    try:
        original(tmp, state_dict=state, **kwargs)
        del state
        from transformers.utils import CONFIG_NAME

        cfg_path = os.path.join(tmp, CONFIG_NAME)
        with open(cfg_path) as f:
            cfg = json.load(f)
        cfg[CONFIG_KEY] = {"format": FORMAT, "layers_file": LAYERS_FILE, "note": _NOTE}
        with open(cfg_path, "w") as f:
            json.dump(cfg, f, indent=2, sort_keys=True)
            f.write("\n")
        weights = _weights_file(tmp, variant)
        shards = _shard_names(tmp, weights)
        files = {n: _sha256(os.path.join(tmp, n)) for n in sorted({weights, *shards})}
        meta = {"format": FORMAT, "model_class": type(model).__name__, "weights": weights, "files": files,
                "layers": layers}
        with open(os.path.join(tmp, LAYERS_FILE), "w") as f:
            json.dump(meta, f, indent=2)
            f.write("\n")
        _commit(tmp, directory, weights, shards, variant)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return os.path.join(directory, LAYERS_FILE)


def _commit(tmp: str, directory: str, weights: str, shards: list, variant: str | None) -> None:
    """Move the checkpoint written in ``tmp`` into ``directory``, each file by an atomic rename: ``lrtrain.json``
    first (from then on the old files no longer match it), the weight files last (the shard index or the single
    weights file at the very end), then remove the weight files of an earlier checkpoint that this one does not
    use. A reader sees the old checkpoint, a refused one (checksums) or the new one."""
    names = os.listdir(tmp)
    for n in names:
        if not os.path.isfile(os.path.join(tmp, n)):
            raise RuntimeError(f"save_pretrained wrote {n!r}, not a file: lrtrain checkpoints hold files only")
        _fsync(os.path.join(tmp, n))
    old = set()
    try:  # the files of the checkpoint being replaced, as its lrtrain.json names them
        with open(os.path.join(directory, LAYERS_FILE)) as f:
            prev = json.load(f)
        old = {n for n in [prev.get("weights"), *(prev.get("files") or {})] if isinstance(n, str)}
    except (OSError, ValueError, AttributeError):
        pass
    new = {weights, *shards}
    order = [LAYERS_FILE, *sorted(n for n in names if n not in new and n != LAYERS_FILE),
             *sorted(n for n in shards if n != weights), weights]
    for n in order:
        os.replace(os.path.join(tmp, n), os.path.join(directory, n))
    _fsync(directory)
    for n in os.listdir(directory):
        if n not in new and (n in old or _is_weights_name(n, variant)):
            p = os.path.join(directory, n)
            if os.path.isfile(p) and not os.path.islink(p):
                os.remove(p)


# ---------------------------------------------------------------- the converted model's own save_pretrained

class _SavePretrained:
    """``model.save_pretrained`` of a converted transformers model (an instance attribute set by :func:`_attach`):
    :func:`save_pretrained`'s checkpoint, so that ``Trainer.save_model``, the Trainer's checkpoints and
    ``push_to_hub`` write one. Accepts the arguments of the class's ``save_pretrained``; ``state_dict`` (FSDP /
    DeepSpeed hand in the gathered one) gives the tensors; ``push_to_hub=True``, ``distributed_checkpoint=True``
    and ``save_original_format=True`` are refused. Once the model holds no factorized layer (``densify``), this
    is the class's plain save (a stale ``lrtrain.json`` in the directory is removed first)."""

    def __init__(self, model: nn.Module):
        self.__self__ = model

    def __repr__(self) -> str:
        return f"<lrtrain save_pretrained of {type(self.__self__).__name__}>"

    def __call__(self, *args, **kwargs):
        model = self.__self__
        original = _original_save(model)
        sig = inspect.signature(original)
        bound = sig.bind(*args, **kwargs)
        call = {}
        for name, value in bound.arguments.items():
            kind = sig.parameters[name].kind
            if kind is inspect.Parameter.VAR_KEYWORD:
                call.update(value)
            elif kind is inspect.Parameter.VAR_POSITIONAL:
                if value:
                    raise TypeError(f"save_pretrained: unexpected positional arguments {value!r}")
            else:
                call[name] = value
        directory = _check_directory(call.pop(next(iter(sig.parameters))))
        if not _factorized(model):  # densified: a plain transformers checkpoint, not described by lrtrain.json
            stale = os.path.join(directory, LAYERS_FILE)
            if call.get("is_main_process", True) and os.path.isfile(stale):
                os.remove(stale)
            return original(*args, **kwargs)
        for bad in ("push_to_hub", "distributed_checkpoint"):
            if call.get(bad):
                raise ValueError(f"{bad}=True is not supported for a model converted by lrtrain: save, then upload "
                                 "the directory, or call model.push_to_hub(repo_id) (it writes lrtrain's checkpoint)")
            call.pop(bad, None)
        _save(model, directory, call.pop("state_dict", None), call)


def _drop_markers(module, state_dict, prefix, *args) -> None:
    """``load_state_dict`` pre-hook of a converted model: lrtrain's one-element ``<layer>.weight`` markers are no
    tensors of the model (the Trainer's resume and best-model loads read the checkpoint with strict=False)."""
    for name, layer in _factorized(module):
        key = f"{prefix}{name}.weight" if name else f"{prefix}weight"
        t = state_dict.get(key)
        if torch.is_tensor(t) and t.numel() == 1 and "weight" not in layer._parameters \
                and "weight" not in layer._buffers:
            del state_dict[key]


def _is_pretrained_model(model) -> bool:
    mod = sys.modules.get("transformers.modeling_utils")  # a transformers model has imported it
    base = getattr(mod, "PreTrainedModel", None) if mod is not None else None
    return isinstance(base, type) and isinstance(model, base)


def _attach(model: nn.Module) -> nn.Module:
    """Make a transformers model's own ``save_pretrained`` write lrtrain's checkpoint (:class:`_SavePretrained`,
    an instance attribute: the class is untouched, a deepcopy or a pickle keeps it) and its ``load_state_dict``
    ignore lrtrain's markers (:func:`_drop_markers`). Idempotent; any other module is returned unchanged.
    ``lowrank`` applies it to the model it converts, ``save_pretrained`` / ``from_pretrained`` to theirs."""
    if not _is_pretrained_model(model):
        return model
    if not isinstance(model.__dict__.get("save_pretrained"), _SavePretrained):
        model.__dict__["save_pretrained"] = _SavePretrained(model)
    if not model.__dict__.get("_lrtrain_marker_hook", False):
        model.register_load_state_dict_pre_hook(_drop_markers)
        model.__dict__["_lrtrain_marker_hook"] = True
    return model


convert.CONVERTED_HOOKS.append(_attach)


# ---------------------------------------------------------------- loading

def _read_meta(directory: str) -> dict | None:
    """``lrtrain.json``, checked; None when there is none."""
    path = os.path.join(directory, LAYERS_FILE)
    if not os.path.lexists(path):
        return None
    path = _path_in(directory, LAYERS_FILE, "the layers file")
    with open(path) as f:
        meta = json.load(f)
    if not isinstance(meta, dict) or isinstance(meta.get("format"), bool) or meta.get("format") not in _READ_FORMATS \
            or not isinstance(meta.get("layers"), list) \
            or not all(isinstance(r, dict) for r in meta["layers"]) or not isinstance(meta.get("weights"), str):
        formats = " or ".join(map(str, _READ_FORMATS))
        raise ValueError(f"{path}: not an lrtrain checkpoint description of format {formats}")
    if meta["format"] >= 2:
        files = meta.get("files")
        if not isinstance(files, dict) or not files or not all(
                isinstance(k, str) and isinstance(v, str) and _SHA256.fullmatch(v) for k, v in files.items()):
            raise ValueError(f"{path}: 'files' must map each weight file to its sha256 (64 hex digits)")
    return meta


def _shard_names(directory: str, weights: str) -> list:
    """The files holding the tensors: the shards a shard index names (each a plain file name in ``directory``),
    or ``[weights]``."""
    path = _path_in(directory, weights, "weights file")
    if not weights.endswith(".json"):
        return [weights]
    with open(path) as f:
        index = json.load(f)
    wmap = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(wmap, dict) or not wmap:
        raise ValueError(f"{path}: not a shard index (no weight_map)")
    names = sorted(set(wmap.values()), key=str)
    for n in names:
        _path_in(directory, n, f"shard (in {weights})")
    return names


def _verify(directory: str, name: str, digest: str) -> None:
    path = _path_in(directory, name, "weight file")
    if not os.path.isfile(path):
        raise ValueError(f"{path}: missing, though {LAYERS_FILE} lists it (an interrupted save?)")
    if _sha256(path) != digest:
        raise ValueError(f"{path}: its sha256 does not match {LAYERS_FILE}: the file is corrupted or belongs to "
                         "another save (an interrupted save?)")


def _checked_files(directory: str, meta: dict) -> list:
    """The weight files of an lrtrain.json checkpoint, every name checked before any weight file is read, and each
    file checked against its sha256 (format 2)."""
    weights, sums = meta["weights"], (meta.get("files") if meta["format"] >= 2 else None)
    _path_in(directory, weights, "weights file")
    if sums is not None:
        for n in sums:
            _path_in(directory, n, "weight file")
        if weights not in sums:
            raise ValueError(f"{directory}: {LAYERS_FILE} gives no sha256 for its weights file {weights!r}")
        _verify(directory, weights, sums[weights])  # the index (before it is parsed) or the single weights file
    shards = _shard_names(directory, weights)
    if sums is not None:
        if set(sums) != {weights, *shards}:
            raise ValueError(f"{directory}: {LAYERS_FILE} lists the weight files {sorted(sums)}, the checkpoint has "
                             f"{sorted({weights, *shards})}")
        for n in shards:
            if n != weights:
                _verify(directory, n, sums[n])
    return shards


def _find_weights(directory: str) -> str:
    """The weights file of a directory without lrtrain.json, as transformers' loader picks it."""
    for n in _WEIGHT_NAMES:
        if os.path.isfile(os.path.join(directory, n)):
            return n
    raise ValueError(f"{directory!r} is not an lrtrain checkpoint: it holds neither {LAYERS_FILE} nor a weights "
                     f"file ({', '.join(_WEIGHT_NAMES)})")


def _load_files(directory: str, names: list) -> dict:
    """Every tensor of the files ``names`` (checked by the caller), on the CPU."""
    from safetensors.torch import load_file

    state = {}
    for name in names:
        p = os.path.join(directory, name)
        if name.endswith(".safetensors"):
            state.update(load_file(p, device="cpu"))
        else:
            state.update(torch.load(p, map_location="cpu", weights_only=True))
    return state


def _factor_prefixes(state: dict) -> list:
    """Names of the factorized layers whose tensors ``state`` holds (those with an ``active_rank``)."""
    return sorted(k[: -len(".active_rank")] for k in state if k.endswith(".active_rank"))


def _derived_records(model: nn.Module, state: dict, directory: str) -> list:
    """lrtrain.json's layer records of a converted model's checkpoint written without it, from the tensors: the
    kind and structure of the dense module the model has at each factorized layer's name, the capacity from U,
    the rank from active_rank, the bias from its presence; max_rank (not state) = the capacity."""
    records = []
    for name in _factor_prefixes(state):
        try:
            dense = model.get_submodule(name)
        except AttributeError:
            raise ValueError(f"{directory}: the checkpoint holds the factors of a layer {name!r}, which does not "
                             f"exist in {type(model).__name__} (keys renamed by transformers' save_original_format? "
                             "such a folder cannot be read: save the converted model again, with "
                             "lrtrain.save_pretrained or its own save_pretrained)") from None
        kind = kind_of(dense)
        U, rank = state.get(f"{name}.U"), state[f"{name}.active_rank"]
        if kind is None or isinstance(dense, FactorizedMixin) or U is None or U.dim() != 2 or rank.numel() != 1:
            raise ValueError(f"{directory}: the factors of {name!r} (U {None if U is None else tuple(U.shape)}) do not "
                             f"fit the model's {dense!r}")
        records.append({"name": name, "rank": int(rank.reshape(())), "capacity": U.shape[1],
                        "max_rank": U.shape[1], "bias": f"{name}.bias" in state, "kind": kind.name,
                        **kind.dense_structure(dense)})
    return records


def _int(rec: dict, key: str, lo: int = 1) -> int:
    v = rec.get(key)
    if isinstance(v, bool) or not isinstance(v, int) or v < lo:
        raise ValueError(f"{LAYERS_FILE}: layer {rec.get('name')!r}: {key} must be an int >= {lo}, got {v!r}")
    return v


def _rebuild(model: nn.Module, rec: dict) -> FactorizedMixin:
    """Replace the dense layer named in ``rec`` by a factorized one of the recorded structure (rank 1 until the
    state dict sets it) and return it; its type and shape must match the dense layer's."""
    name, kind_name = rec.get("name"), rec.get("kind")
    if not isinstance(name, str) or not name:
        raise ValueError(f"{LAYERS_FILE}: bad layer name {name!r}")
    try:
        old = model.get_submodule(name)
    except AttributeError as e:
        raise ValueError(f"{LAYERS_FILE}: layer {name!r} does not exist in {type(model).__name__} ({e})") from None
    capacity, max_rank = _int(rec, "capacity"), _int(rec, "max_rank")
    bias = rec.get("bias")
    if not isinstance(bias, bool):
        raise ValueError(f"{LAYERS_FILE}: layer {name!r}: bias must be true or false, got {bias!r}")
    kind = kind_named(kind_name)
    if kind is None:
        known = ", ".join(k.name for k in KINDS)
        raise ValueError(f"{LAYERS_FILE}: layer {name!r}: unknown kind {kind_name!r} ({known})")
    structure = {k: rec.get(k) for k in kind.fields}
    if not kind.covers(old) or kind.dense_structure(old) != structure:
        raise ValueError(f"{LAYERS_FILE}: layer {name!r} was a {kind.name} {structure}; the model has {old!r}")
    dev, dt = next(old.parameters()).device, next(old.parameters()).dtype
    # Built in float32 and cast: the layers' random init (a QR) has no bfloat16 / float16 kernel on the CPU.
    new = kind.build(kind.dense_structure(old), bias=bias, max_rank=max_rank, capacity=capacity, device=dev,
                     dtype=torch.float32 if dt in (torch.bfloat16, torch.float16) else dt)
    new.to(dtype=dt)
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, new)
    return new


def _ignored_on_save(model: nn.Module) -> list:
    """Regex patterns of keys the model class leaves out of its checkpoints (``_keys_to_ignore_on_save``)."""
    pats = getattr(model, "_keys_to_ignore_on_save", None) or []
    return [re.compile(p) for p in pats]


def from_pretrained(model_class, directory, *, dtype: torch.dtype | None = None, device=None, **config_kwargs):
    """Load a model written by :func:`save_pretrained` (or by a converted model's own ``save_pretrained``):
    ``model_class`` (e.g. ``GPT2LMHeadModel``) built from the saved config (``config_kwargs`` override config
    attributes, e.g. ``attn_implementation="eager"``), the recorded layers replaced by factorized ones of the
    recorded kind, capacity and max_rank, then every saved tensor loaded strictly (ranks come from the saved
    ``active_rank``; only keys tied to a loaded parameter, such as GPT-2's ``lm_head.weight``, may be absent).
    Before anything is loaded, every weight file name must be a plain file name in ``directory`` and every weight
    file must match its sha256 in ``lrtrain.json`` (ValueError naming the file otherwise). A converted model's
    checkpoint without ``lrtrain.json`` loads with records derived from its tensors (max_rank = capacity), with a
    warning; a directory holding no factorized layer is refused (a plain transformers checkpoint: load it with
    ``model_class.from_pretrained``). ``dtype``: the parameters' dtype (default: the saved one); ``device``: where
    to put the model. Returns the model in eval mode, as transformers does; its ``save_pretrained`` writes lrtrain
    checkpoints.
    """
    if not isinstance(model_class, type) or not issubclass(model_class, nn.Module) \
            or getattr(model_class, "config_class", None) is None:
        raise TypeError(f"model_class must be a transformers PreTrainedModel class (e.g. GPT2LMHeadModel), "
                        f"got {model_class!r}")
    if dtype is not None and not isinstance(dtype, torch.dtype):
        raise TypeError(f"dtype must be a torch.dtype or None, got {dtype!r}")
    directory = _check_directory(directory)
    meta = _read_meta(directory)
    files = _checked_files(directory, meta) if meta is not None else _shard_names(directory, _find_weights(directory))
    config, unused = model_class.config_class.from_pretrained(directory, return_unused_kwargs=True, **config_kwargs)
    if unused:
        raise TypeError(f"unknown config argument(s) for {model_class.config_class.__name__}: {sorted(unused)}")
    marked_config = hasattr(config, CONFIG_KEY)
    if marked_config:
        delattr(config, CONFIG_KEY)
    state = _load_files(directory, files)
    if meta is None:
        names = _factor_prefixes(state)
        if not names:
            raise ValueError(f"{directory!r} is not an lrtrain checkpoint: no {LAYERS_FILE} and no factorized layer "
                             "in its weights (a plain transformers checkpoint loads with ModelClass.from_pretrained)")
        marked = [n for n in names if f"{n}.weight" in state]
        if marked or marked_config:
            raise ValueError(f"{directory}: written by lrtrain (config.json's \"{CONFIG_KEY}\" entry, the layers' "
                             f".weight markers) but {LAYERS_FILE} is missing: an interrupted save or a removed file; "
                             "save the model again")
    if dtype is None:
        floats = [t.dtype for t in state.values() if t.is_floating_point()]
        dtype = max(set(floats), key=floats.count) if floats else torch.get_default_dtype()

    # Dense, default initialization (overwritten below), built as transformers builds it for this dtype (buffers
    # such as rotary frequencies keep the dtype the model code gives them).
    build = getattr(model_class, "_from_config", None)
    model = build(config, dtype=dtype) if build is not None else model_class(config).to(dtype)
    if meta is None:
        records = _derived_records(model, state, directory)
        warnings.warn(f"{directory}: no {LAYERS_FILE} (saved by a plain save_pretrained of a converted model): the "
                      f"{len(records)} factorized layers are rebuilt from the tensors (max_rank = capacity) and no "
                      "checksum verifies the files; lrtrain.save_pretrained writes a complete checkpoint", UserWarning,
                      stacklevel=2)
    else:
        records = meta["layers"]
    layers = {rec.get("name"): _rebuild(model, rec) for rec in records}
    if meta is not None:
        for name in layers:
            marker = state.pop(f"{name}.weight", None)
            if marker is None or marker.numel() != 1:
                raise ValueError(f"{directory}: {name}.weight is not lrtrain's marker (absent or not one element): "
                                 "the weights do not belong to this lrtrain.json")
    result = model.load_state_dict(state, strict=False)  # a factorized layer's bad entries raise here
    by_name = {n: names for names in _aliases(model).values() for n in names}
    ignored = _ignored_on_save(model)
    missing = [k for k in result.missing_keys
               if not any(a in state for a in by_name.get(k, [])) and not any(p.search(k) for p in ignored)]
    saved_from = meta.get("model_class") if meta is not None else getattr(config, "architectures", None)
    if result.unexpected_keys or missing:
        raise ValueError(f"{directory}: the checkpoint (saved from {saved_from}) does not fit "
                         f"{model_class.__name__}: unexpected keys {sorted(result.unexpected_keys)[:10]}, "
                         f"missing keys {sorted(missing)[:10]}")
    for rec in records:
        layer = layers[rec["name"]]
        if layer.rank != rec.get("rank"):
            raise ValueError(f"{directory}: layer {rec['name']!r} has rank {layer.rank} in the weights but "
                             f"{rec.get('rank')!r} in {LAYERS_FILE}")
    if device is not None:
        model.to(device)
    model.eval()
    gen_path = os.path.join(directory, "generation_config.json")
    if os.path.isfile(gen_path) and getattr(model, "generation_config", None) is not None:
        from transformers import GenerationConfig

        model.generation_config = GenerationConfig.from_pretrained(directory)
    return _attach(model)
