"""Hugging Face transformers round trip for models converted by :func:`lrtrain.lowrank`.

``save_pretrained(model, directory)`` writes what ``model.save_pretrained`` writes (config.json, the
safetensors weights, generation_config.json) with the factorized layers stored as their factors
(``<layer>.U``, ``.S``, ``.V``, ``.active_rank``, ``.bias``), plus ``lrtrain.json``: per factorized layer its
qualified name, kind ("linear", "conv1d" for a layer converted from a transformers Conv1D, "conv2d"),
shape, rank, capacity and max_rank. ``from_pretrained(ModelClass, directory)`` rebuilds the model from the
config, gives the recorded layers their factorized structure and loads the saved tensors strictly.

A plain ``ModelClass.from_pretrained(directory)`` (or ``AutoModel...``) on such a checkpoint raises instead
of silently re-initializing the converted layers at random: next to the factors, each factorized layer's
``<layer>.weight`` is saved as a one-element marker tensor, so transformers finds a size mismatch for every
converted layer and refuses to load ("You set `ignore_mismatched_sizes` to `False`, thus raising an error",
after a report listing those layers; with ``ignore_mismatched_sizes=True`` it loads them re-initialized and
says so). config.json also carries an ``"lrtrain"`` entry naming the loader; ``from_pretrained`` removes it.

transformers is imported lazily, inside these functions: ``import lrtrain`` never needs it.
"""
from __future__ import annotations

import inspect
import json
import os
import re

import torch
from torch import nn

from .convert import _aliases
from .layers.factors import FactorizedMixin
from .layers.kinds import KINDS, kind_named, kind_of

__all__ = ["save_pretrained", "from_pretrained", "LAYERS_FILE"]

LAYERS_FILE = "lrtrain.json"
CONFIG_KEY = "lrtrain"
FORMAT = 1
_NOTE = ("low-rank checkpoint written by lrtrain.save_pretrained: load it with "
         "lrtrain.from_pretrained(ModelClass, directory); ModelClass.from_pretrained refuses it (size mismatch "
         "for each factorized layer's .weight) rather than re-initialize those layers at random")


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
    names = [_add_variant(n, variant) for n in
             ("model.safetensors.index.json", "model.safetensors", "pytorch_model.bin.index.json", "pytorch_model.bin")]
    found = [n for n in names if os.path.isfile(os.path.join(directory, n))]
    if not found:
        raise RuntimeError(f"save_pretrained wrote no weights file that lrtrain recognizes in {directory!r} "
                           f"(found {sorted(os.listdir(directory))})")
    return max(found, key=lambda n: os.stat(os.path.join(directory, n)).st_mtime_ns)


def _record(name: str, layer: FactorizedMixin) -> dict:
    """The json entry of one factorized layer: enough to rebuild its structure (the tensors come from the weights):
    name, rank, capacity, max_rank, bias, kind and the kind's structure fields."""
    kind = kind_of(layer)
    if kind is None:
        raise TypeError(f"{name}: factorized layer of unknown type {type(layer).__name__}")
    return {"name": name, "rank": layer.rank, "capacity": layer.capacity, "max_rank": layer.max_rank,
            "bias": layer.bias is not None, "kind": kind.name, **kind.structure(layer)}


def save_pretrained(model: nn.Module, directory, **kwargs) -> str | None:
    """Write ``model`` (a transformers PreTrainedModel, converted or not) to ``directory`` for
    :func:`from_pretrained`: ``model.save_pretrained(directory, **kwargs)`` with the factors as tensors, one
    marker ``<layer>.weight`` per factorized layer (a plain ``ModelClass.from_pretrained`` then refuses the
    checkpoint), an ``"lrtrain"`` entry in config.json, and ``lrtrain.json`` with each factorized layer's name,
    kind, shape, rank, capacity and max_rank. ``kwargs`` go to ``model.save_pretrained`` (e.g.
    ``max_shard_size``, ``variant``); ``state_dict`` and ``push_to_hub`` are refused (push the directory
    afterwards), and keys are saved as the modules name them (transformers 5's ``save_original_format=False``). ``model.config`` is not modified. Returns the path of ``lrtrain.json`` (None when
    ``is_main_process=False``: like transformers, nothing is written then).
    """
    if not isinstance(model, nn.Module) or not callable(getattr(model, "save_pretrained", None)) \
            or getattr(model, "config", None) is None:
        raise TypeError(f"model must be a transformers PreTrainedModel (an nn.Module with .config and .save_pretrained), "
                        f"got {type(model).__name__}")
    directory = _check_directory(directory)
    for bad in ("state_dict", "push_to_hub"):
        if bad in kwargs:
            raise ValueError(f"lrtrain.save_pretrained writes its own state dict and files; {bad}= is not supported "
                             "(save, then upload the directory)")
    if "save_original_format" in inspect.signature(model.save_pretrained).parameters:
        # transformers 5 renames some models' keys on save (ViT: vit.layers.0.attention.q_proj -> the older
        # vit.encoder.layer.0.attention.attention.query) and back on load; lrtrain's loader reads the keys as the
        # modules name them, so the checkpoint keeps them.
        if kwargs.get("save_original_format", False):
            raise ValueError("save_original_format=True is not supported: lrtrain checkpoints keep the module names")
        kwargs["save_original_format"] = False
    variant = kwargs.get("variant")
    if variant is not None and not isinstance(variant, str):
        raise TypeError(f"variant must be a str or None, got {variant!r}")
    layers = [_record(n, m) for n, m in model.named_modules() if isinstance(m, FactorizedMixin)]
    state = model.state_dict()
    for rec in layers:
        key = f"{rec['name']}.weight"
        if key in state:
            raise RuntimeError(f"{key} already in the state dict of a factorized layer")
        # One element, never the shape transformers expects: a plain from_pretrained reports a size mismatch.
        state[key] = torch.zeros(1, dtype=state[f"{rec['name']}.U"].dtype)
    if not kwargs.get("is_main_process", True):  # transformers writes nothing on the other processes
        model.save_pretrained(directory, state_dict=state, **kwargs)
        return None
    os.makedirs(directory, exist_ok=True)
    model.save_pretrained(directory, state_dict=state, **kwargs)

    from transformers.utils import CONFIG_NAME

    cfg_path = os.path.join(directory, CONFIG_NAME)
    with open(cfg_path) as f:
        cfg = json.load(f)
    cfg[CONFIG_KEY] = {"format": FORMAT, "layers_file": LAYERS_FILE, "note": _NOTE}
    with open(cfg_path, "w") as f:
        json.dump(cfg, f, indent=2, sort_keys=True)
        f.write("\n")
    meta = {"format": FORMAT, "model_class": type(model).__name__, "weights": _weights_file(directory, variant),
            "layers": layers}
    path = os.path.join(directory, LAYERS_FILE)
    with open(path, "w") as f:
        json.dump(meta, f, indent=2)
        f.write("\n")
    return path


def _read_meta(directory: str) -> dict:
    path = os.path.join(directory, LAYERS_FILE)
    if not os.path.isfile(path):
        raise ValueError(f"{directory!r} is not an lrtrain checkpoint (no {LAYERS_FILE}); "
                         "a plain transformers checkpoint loads with ModelClass.from_pretrained")
    with open(path) as f:
        meta = json.load(f)
    if not isinstance(meta, dict) or meta.get("format") != FORMAT or not isinstance(meta.get("layers"), list) \
            or not all(isinstance(r, dict) for r in meta["layers"]) or not isinstance(meta.get("weights"), str):
        raise ValueError(f"{path}: not an lrtrain checkpoint description of format {FORMAT}")
    return meta


def _read_state(directory: str, weights: str) -> dict:
    """Every tensor of the checkpoint (all shards), on the CPU."""
    from safetensors.torch import load_file

    if os.path.basename(weights) != weights:
        raise ValueError(f"weights file name {weights!r} must be a plain file name")
    path = os.path.join(directory, weights)
    if weights.endswith(".json"):  # a shard index
        with open(path) as f:
            files = sorted(set(json.load(f)["weight_map"].values()))
    else:
        files = [weights]
    state = {}
    for name in files:
        p = os.path.join(directory, name)
        if name.endswith(".safetensors"):
            state.update(load_file(p, device="cpu"))
        else:
            state.update(torch.load(p, map_location="cpu", weights_only=True))
    return state


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
    """Load a model written by :func:`save_pretrained`: ``model_class`` (e.g. ``GPT2LMHeadModel``) built from the
    saved config (``config_kwargs`` override config attributes, e.g. ``attn_implementation="eager"``), the
    recorded layers replaced by factorized ones of the recorded kind, capacity and max_rank, then every saved
    tensor loaded strictly (ranks come from the saved ``active_rank``; only keys tied to a loaded parameter,
    such as GPT-2's ``lm_head.weight``, may be absent). ``dtype``: the parameters' dtype (default: the saved
    one); ``device``: where to put the model. Returns the model in eval mode, as transformers does.
    """
    if not isinstance(model_class, type) or not issubclass(model_class, nn.Module) \
            or getattr(model_class, "config_class", None) is None:
        raise TypeError(f"model_class must be a transformers PreTrainedModel class (e.g. GPT2LMHeadModel), "
                        f"got {model_class!r}")
    if dtype is not None and not isinstance(dtype, torch.dtype):
        raise TypeError(f"dtype must be a torch.dtype or None, got {dtype!r}")
    directory = _check_directory(directory)
    meta = _read_meta(directory)
    config, unused = model_class.config_class.from_pretrained(directory, return_unused_kwargs=True, **config_kwargs)
    if unused:
        raise TypeError(f"unknown config argument(s) for {model_class.config_class.__name__}: {sorted(unused)}")
    if hasattr(config, CONFIG_KEY):
        delattr(config, CONFIG_KEY)
    state = _read_state(directory, meta["weights"])
    if dtype is None:
        floats = [t.dtype for t in state.values() if t.is_floating_point()]
        dtype = max(set(floats), key=floats.count) if floats else torch.get_default_dtype()

    # Dense, default initialization (overwritten below), built as transformers builds it for this dtype (buffers
    # such as rotary frequencies keep the dtype the model code gives them).
    build = getattr(model_class, "_from_config", None)
    model = build(config, dtype=dtype) if build is not None else model_class(config).to(dtype)
    layers = {rec.get("name"): _rebuild(model, rec) for rec in meta["layers"]}
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
    if result.unexpected_keys or missing:
        raise ValueError(f"{directory}: the checkpoint (saved from {meta.get('model_class')}) does not fit "
                         f"{model_class.__name__}: unexpected keys {sorted(result.unexpected_keys)[:10]}, "
                         f"missing keys {sorted(missing)[:10]}")
    for rec in meta["layers"]:
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
    return model
