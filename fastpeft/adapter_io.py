"""Adapters on disk in PEFT's layout: adapter_config.json + adapter_model.safetensors.

Keys are ``base_model.model.<module path>.lora_A.weight`` etc. with the adapter name removed (PEFT's
convention); the "default" adapter sits at the root of the folder and others in ``<dir>/<adapter_name>/``.
Writes are atomic (temporary file + rename). Loading reads safetensors only, unless allow_pickle=True.
"""
from __future__ import annotations

import copy
import json
import os
import warnings
import stat
import uuid
from typing import Any, Dict, List, Optional, Tuple

import torch
import torch.nn as nn
from safetensors.torch import load_file, save_file

from .config import (AdaLoraConfig, AdapterConfig, LoHaConfig, LoKrConfig, LoraConfig, OFTConfig, VeraConfig, changes_base_weights, is_prompt_learning,
                     to_fastpeft_config)
from .distributed import barrier, full_tensor, is_sharded, rank, shard_like
from .model_state import BIAS_CONFIG_LAYERS, adapter_layers, apply_trainable, get_state, is_peft_model, root_model
from .nn import (AdaLoraLinear, IA3Linear, LohaLinear, LokrLinear, LoraEmbedding, LoraLinear, ModulesToSave, OftLinear, TrainableTokens,
                 VeraLinear)
from .nn.lycoris import LycorisLinear
from .nn import bases
from .patch import patch_checked
from . import adalora, prompt_learning

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PICKLE_WEIGHTS_NAME = "adapter_model.bin"
PEFT_PREFIX = "base_model.model."
# VeRA's shared projections in PEFT's files: one pair per adapter, under model-level names (no module path)
VERA_PROJECTION_KEYS = ("base_model.vera_A", "base_model.vera_B")
# LoHa / LoKr parameter tables (PEFT's ParameterDict names; files hold them without the adapter name)
LYCORIS_TABLES = LohaLinear.TABLES + LokrLinear.TABLES
TOKENS_KEY = "trainable_tokens_delta"  # trainable tokens' rows (PEFT: "<path>[.token_adapter].trainable_tokens_delta")


def _prefix(model: nn.Module) -> str:
    # Inside a PeftModel module paths already start with base_model.model.
    return "" if is_peft_model(model) else PEFT_PREFIX


def _wrappers_to_save(model: nn.Module) -> List[Tuple[str, nn.Module]]:
    """Our ModulesToSave and PEFT's ModulesToSaveWrapper (in a converted PeftModel)."""
    return [
        (n, m)
        for n, m in model.named_modules()
        if isinstance(m, ModulesToSave) or type(m).__name__ == "ModulesToSaveWrapper"
    ]


def adapter_state_dict(model: nn.Module, adapter_name: str) -> Dict[str, torch.Tensor]:
    """The tensors PEFT would save for ``adapter_name``, under PEFT's key names."""
    state = get_state(model)
    cfg = state.configs[adapter_name]
    if is_prompt_learning(cfg):  # PEFT's one key, "prompt_embeddings", without a module path
        out = prompt_learning.prompt_state_dict(model, adapter_name)
        return {k: full_tensor(v.detach()).to("cpu").contiguous().clone() for k, v in out.items()}
    prefix = _prefix(model)
    out: Dict[str, torch.Tensor] = {}
    for path, layer in adapter_layers(model):
        if isinstance(layer, LoraLinear) and adapter_name in layer.adapter_names:
            out[f"{prefix}{path}.lora_A.weight"] = layer.lora_A[adapter_name].weight
            out[f"{prefix}{path}.lora_B.weight"] = layer.lora_B[adapter_name].weight
            if adapter_name in layer.lora_magnitude_vector:  # DoRA: PEFT saves it without ".weight"
                out[f"{prefix}{path}.lora_magnitude_vector"] = layer.lora_magnitude_vector[adapter_name].weight
        elif isinstance(layer, LoraEmbedding) and adapter_name in layer.adapter_names:
            out[f"{prefix}{path}.lora_embedding_A"] = layer.lora_embedding_A[adapter_name]  # PEFT: no ".weight"
            out[f"{prefix}{path}.lora_embedding_B"] = layer.lora_embedding_B[adapter_name]
        elif isinstance(layer, IA3Linear) and adapter_name in layer.adapter_names:
            out[f"{prefix}{path}.ia3_l"] = layer.ia3_l[adapter_name]
        elif isinstance(layer, OftLinear) and adapter_name in layer.adapter_names:
            out[f"{prefix}{path}.oft_R.weight"] = layer.oft_R[adapter_name].weight
        elif isinstance(layer, LycorisLinear) and adapter_name in layer.adapter_names:
            for table in layer.TABLES:  # PEFT's ParameterDicts: saved without the adapter name
                if adapter_name in getattr(layer, table):
                    out[f"{prefix}{path}.{table}"] = getattr(layer, table)[adapter_name]
        elif isinstance(layer, AdaLoraLinear) and adapter_name in layer.adapter_names:
            # PEFT's ParameterDicts, saved without the adapter name (ranknum is not saved), cut to the rank pattern
            for table, tensor in adalora.saved_tensors(layer, path, cfg, adapter_name).items():
                out[f"{prefix}{path}.{table}"] = tensor
        elif isinstance(layer, VeraLinear) and adapter_name in layer.adapter_names:
            out[f"{prefix}{path}.vera_lambda_b"] = layer.vera_lambda_b[adapter_name]
            out[f"{prefix}{path}.vera_lambda_d"] = layer.vera_lambda_d[adapter_name]
            if cfg.save_projection:  # once per model, under PEFT's model-level names
                out[VERA_PROJECTION_KEYS[0]] = layer.vera_A[adapter_name]
                out[VERA_PROJECTION_KEYS[1]] = layer.vera_B[adapter_name]
        elif isinstance(layer, TrainableTokens) and adapter_name in layer.adapter_names and (
                layer.saves_tied or not layer.tied):
            # PEFT's key (no adapter name); a tied layer's rows are the embedding's: PEFT saves them again only for
            # its standalone TrainableTokensConfig
            out[f"{prefix}{path}.{layer.delta_key}"] = layer.adapter_parameters(adapter_name)[0]
    bias_mode = getattr(cfg, "bias", "none")
    if type(cfg) in BIAS_CONFIG_LAYERS and bias_mode.endswith("_only"):
        # "lora_only" / "vera_only" / "oft_only": PEFT saves the adapted layers' biases under their base_layer names
        own_type = BIAS_CONFIG_LAYERS[type(cfg)]
        for path, layer in adapter_layers(model):
            if isinstance(layer, own_type) and adapter_name in layer.adapter_names:
                bias = bases.base_bias(layer.base_layer)
                if bias is not None:
                    out[f"{prefix}{path}.base_layer.bias"] = bias
    wrappers = _wrappers_to_save(model)
    for path, wrapper in wrappers:
        if adapter_name in wrapper.modules_to_save:
            for key, tensor in wrapper.modules_to_save[adapter_name].state_dict().items():
                out[f"{prefix}{path}.{key}"] = tensor
    if type(cfg) in BIAS_CONFIG_LAYERS and bias_mode == "all":
        # PEFT's rule: every state-dict entry named "bias" except other adapters' — so a wrapped module's bias is
        # also saved as "<path>.original_module.bias" and "<path>.modules_to_save.bias" (adapter name removed).
        own = f".modules_to_save.{adapter_name}."
        others = [f".modules_to_save.{n}." for n in state.configs if n != adapter_name]
        for name, tensor in model.state_dict(keep_vars=True).items():
            if (name == "bias" or name.endswith(".bias")) and not any(o in name for o in others):
                out[f"{prefix}{name.replace(own, '.modules_to_save.')}"] = tensor
    # FSDP2 / DTensor parameters: gather the whole value (a collective; every rank runs this in save_adapter)
    return {k: full_tensor(v.detach()).to("cpu").contiguous().clone() for k, v in out.items()}


def _remove_quietly(path: str) -> None:
    try:
        os.remove(path)
    except FileNotFoundError:
        pass


def _stage(path: str, write) -> str:
    """``write`` a temporary file next to ``path`` and return its name; on failure nothing is left behind.

    The file gets the mode open(path, "w") would give it (0o666 minus the umask): mkstemp and safetensors'
    save_file both create 0o600 files, which would make saved adapters unreadable to other users.
    """
    directory = os.path.dirname(os.path.abspath(path))
    tmp = os.path.join(directory, f".tmp-{os.getpid()}-{uuid.uuid4().hex}-{os.path.basename(path)}")
    os.close(os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666))
    try:
        mode = stat.S_IMODE(os.stat(tmp).st_mode)
        write(tmp)
        os.chmod(tmp, mode)  # save_file replaces the file with its own (0o600) one
    except BaseException:
        _remove_quietly(tmp)
        raise
    return tmp


def _atomic_write(path: str, write) -> None:
    tmp = _stage(path, write)
    try:
        os.replace(tmp, path)
    except BaseException:
        _remove_quietly(tmp)
        raise


def _makedirs(folder: str, created: List[str]) -> None:
    """os.makedirs that records the folders it made (deepest last), so a failed save can remove them."""
    missing = []
    current = os.path.abspath(folder)
    while not os.path.isdir(current):
        missing.append(current)
        current = os.path.dirname(current)
    for path in reversed(missing):
        os.makedirs(path, exist_ok=True)
        created.append(path)


def _config_dict(model: nn.Module, cfg: AdapterConfig) -> Dict[str, Any]:
    # PEFT's adapter_config.json (see AdapterConfig.to_adapter_config): it names the base model when the config
    # does not, and records the transformers model class (auto_mapping) when the config has no task_type.
    root = root_model(model)
    name = getattr(getattr(root, "config", None), "_name_or_path", None)
    return cfg.to_adapter_config(base_model_name_or_path=name or None, base_model_class=type(root))


def save_adapter(model: nn.Module, save_directory: str, adapter_name: Optional[str] = None,
                 path_initial_model_for_weight_conversion: Optional[str] = None) -> None:
    """Write adapters in PEFT's layout (all adapters when adapter_name is None).

    Where each adapter goes (as PEFT's ``save_pretrained``): the "default" adapter at the root of
    ``save_directory``, any other adapter in ``<save_directory>/<adapter_name>/`` -- also when it is the only one
    saved: ``save_adapter(model, "out", adapter_name="b")`` writes ``out/b/adapter_config.json`` and
    ``out/b/adapter_model.safetensors``. ``load_adapter(model, "out", adapter_name="b")`` looks in ``out/b/``
    first, then at the root.

    Sharded models (FSDP2 / DTensor parameters): call it on every rank; the adapter is gathered to every
    rank, rank 0 writes, and all ranks return once the files are in place. Unsharded models (one process,
    DDP): whoever calls it writes, so under DDP call it on rank 0 only (or on all ranks: the writes are
    atomic and identical).

    ``path_initial_model_for_weight_conversion`` (PEFT's argument): the folder where the adapter was saved right
    after it was created with a base-rewriting init (PiSSA, OLoRA; before any training). The adapter is then
    written as a plain LoRA adapter for the *original* base weights: ΔW = B·A − B₀·A₀ = [B | −B₀]·[A ; A₀], rank
    2r, lora_alpha doubled (×√2 with rsLoRA, so the scaling stays), rank / alpha patterns doubled,
    ``init_lora_weights`` True -- PEFT's conversion, so PEFT and vLLM load it onto the untouched model. Needs one
    LoRA adapter (not DoRA); the model itself is not changed. Unlike PEFT, the initial folder is only read (PEFT
    also rewrites its adapter_config.json), and modules_to_save copies are kept in the converted file (PEFT's
    conversion drops them).

    >>> # fastpeft.save_adapter(model, "out/");  peft.PeftModel.from_pretrained(base, "out/")
    """
    state = get_state(model)
    names = list(state.configs) if adapter_name is None else [adapter_name]
    for name in names:
        if name not in state.configs:
            raise ValueError(f"unknown adapter {name!r}; this model has {sorted(state.configs)}")
    sharded = any(is_sharded(p) for p in model.parameters())
    tensors = {name: adapter_state_dict(model, name) for name in names}  # collective when sharded
    configs = {name: state.configs[name] for name in names}
    if path_initial_model_for_weight_conversion is not None:
        if len(names) != 1:
            raise ValueError(f"path_initial_model_for_weight_conversion converts one adapter; this model has "
                             f"{sorted(state.configs)}: pass adapter_name")
        configs[names[0]], tensors[names[0]] = _as_plain_lora(
            configs[names[0]], tensors[names[0]], path_initial_model_for_weight_conversion)
    if sharded:
        try:
            if rank() == 0:
                _write_adapters(model, save_directory, configs, tensors)
        finally:
            barrier()  # the other ranks return only once rank 0's files are in place (or it failed)
        return
    _write_adapters(model, save_directory, configs, tensors)


def _as_plain_lora(cfg: AdapterConfig, tensors: Dict[str, torch.Tensor], initial_path: str):
    """PEFT's conversion of an adapter trained from a base-rewriting init into plain LoRA for the original base
    (see save_adapter): (config, tensors) to write."""
    if not isinstance(cfg, LoraConfig) or cfg.use_dora:
        raise ValueError("path_initial_model_for_weight_conversion converts LoRA adapters (PiSSA / OLoRA inits); "
                         f"this adapter is {'DoRA' if isinstance(cfg, LoraConfig) else cfg.peft_type}")
    if cfg.use_rslora and (cfg.rank_pattern or cfg.alpha_pattern):
        raise ValueError("path_initial_model_for_weight_conversion cannot convert an adapter that uses use_rslora "
                         "together with rank_pattern / alpha_pattern (PEFT refuses it as well)")
    if not (cfg.init_lora_weights is True or changes_base_weights(cfg.init_lora_weights)) \
            or cfg.init_lora_weights == "loftq":
        warnings.warn("path_initial_model_for_weight_conversion converts PiSSA / OLoRA adapters to LoRA; this "
                      f"adapter's init_lora_weights is {cfg.init_lora_weights!r}", stacklevel=3)
    initial_cfg, initial = read_adapter(initial_path)
    if not isinstance(initial_cfg, LoraConfig):
        raise ValueError(f"{initial_path} holds a {initial_cfg.peft_type} adapter, not the LoRA adapter's initial state")
    out = dict(tensors)
    for key, tensor in tensors.items():
        is_a, is_b = key.endswith(".lora_A.weight"), key.endswith(".lora_B.weight")
        if not (is_a or is_b):
            continue
        start = initial.get(key)
        if start is None or start.shape != tensor.shape:
            found = "missing" if start is None else f"of shape {tuple(start.shape)}"
            raise ValueError(f"the initial adapter in {initial_path} does not match this adapter: {key!r} is {found}, "
                             f"expected shape {tuple(tensor.shape)}")
        start = start.to(tensor.dtype)
        out[key] = torch.cat([tensor, start], dim=0) if is_a else torch.cat([tensor, -start], dim=1)
    new = copy.deepcopy(cfg)
    new.init_lora_weights = True
    new.r = cfg.r * 2
    new.lora_alpha = cfg.lora_alpha * (2 ** 0.5 if cfg.use_rslora else 2)
    new.rank_pattern = {k: 2 * v for k, v in (cfg.rank_pattern or {}).items()}
    new.alpha_pattern = {k: 2 * v for k, v in (cfg.alpha_pattern or {}).items()}
    return new, out


def _write_adapters(model: nn.Module, save_directory: str, configs: Dict[str, AdapterConfig], all_tensors) -> None:
    names = list(configs)
    # Every file of every adapter is written to a temporary name first and renamed into place only once all of
    # them are complete: a failure while writing leaves an existing adapter folder exactly as it was.
    staged: List[Tuple[str, str]] = []
    created: List[str] = []
    try:
        for name in names:
            folder = save_directory if name == "default" else os.path.join(save_directory, name)
            _makedirs(folder, created)
            tensors = all_tensors[name]
            weights = os.path.join(folder, WEIGHTS_NAME)
            staged.append((_stage(weights, lambda tmp: save_file(tensors, tmp, metadata={"format": "pt"})), weights))
            text = json.dumps(_config_dict(model, configs[name]), indent=2, sort_keys=True)

            def write_json(tmp: str, text: str = text) -> None:
                with open(tmp, "w") as fh:
                    fh.write(text)

            config = os.path.join(folder, CONFIG_NAME)
            staged.append((_stage(config, write_json), config))
        for tmp, final in staged:
            os.replace(tmp, final)
    except BaseException:
        for tmp, _ in staged:
            _remove_quietly(tmp)
        for folder in reversed(created):
            try:
                os.rmdir(folder)
            except OSError:
                pass
        raise


def _adapter_folder(path: str, adapter_name: str) -> str:
    # save_adapter / PEFT's save_pretrained put a non-default adapter in <dir>/<name>/ next to "default" at the
    # root, so for such a name the sub-folder wins over the root.
    nested = os.path.join(path, adapter_name)
    if adapter_name != "default" and os.path.isfile(os.path.join(nested, CONFIG_NAME)):
        return nested
    if os.path.isfile(os.path.join(path, CONFIG_NAME)):
        return path
    if os.path.isfile(os.path.join(nested, CONFIG_NAME)):
        return nested
    raise FileNotFoundError(f"no {CONFIG_NAME} in {path!r} (nor in {nested!r})")


def read_adapter(path: str, adapter_name: str = "default", allow_pickle: bool = False):
    """(config, tensors) of a saved adapter, validated for format but not yet against a model."""
    folder = _adapter_folder(path, adapter_name)
    config_path = os.path.join(folder, CONFIG_NAME)
    try:
        with open(config_path) as fh:
            raw = json.load(fh)
    except json.JSONDecodeError as err:
        raise ValueError(f"{config_path} is not valid JSON: {err}") from err
    if not isinstance(raw, dict):
        raise ValueError(f"{config_path} must hold a JSON object")
    cfg = to_fastpeft_config(raw)
    weights = os.path.join(folder, WEIGHTS_NAME)
    pickled = os.path.join(folder, PICKLE_WEIGHTS_NAME)
    if os.path.isfile(weights):
        try:
            tensors = load_file(weights)
        except Exception as err:  # safetensors raises its own error types for truncated / corrupt files
            raise ValueError(f"{weights} is not a readable safetensors file: {err}") from err
    elif os.path.isfile(pickled):
        if not allow_pickle:
            raise ValueError(
                f"{folder} has only {PICKLE_WEIGHTS_NAME} (a pickle, which can run code when loaded); "
                "pass allow_pickle=True if you trust it"
            )
        tensors = torch.load(pickled, map_location="cpu", weights_only=True)
    else:
        raise FileNotFoundError(f"no {WEIGHTS_NAME} in {folder!r}")
    return cfg, tensors


def _plan_load(model: nn.Module, adapter_name: str, tensors: Dict[str, torch.Tensor]):
    """Map every saved key to its parameter and check shapes; raises before anything is written."""
    if is_prompt_learning(get_state(model).configs[adapter_name]):
        return prompt_learning.plan_load(model, adapter_name, tensors)
    prefix = _prefix(model)
    # remove_duplicate=False: a tied layer's rows are listed under its own name too (PEFT's standalone trainable
    # tokens save them there)
    params = dict(model.named_parameters(remove_duplicate=False))
    params.update({n: b for n, b in model.named_buffers()})
    wrappers = [p for p, _ in _wrappers_to_save(model)]
    plan, expected, vera = [], set(), None
    for path, layer in adapter_layers(model):
        if isinstance(layer, LoraLinear) and adapter_name in layer.adapter_names:
            expected.update({f"{path}.lora_A.{adapter_name}.weight", f"{path}.lora_B.{adapter_name}.weight"})
            if adapter_name in layer.lora_magnitude_vector:
                expected.add(f"{path}.lora_magnitude_vector.{adapter_name}.weight")
        elif isinstance(layer, LoraEmbedding) and adapter_name in layer.adapter_names:
            expected.update({f"{path}.lora_embedding_A.{adapter_name}", f"{path}.lora_embedding_B.{adapter_name}"})
        elif isinstance(layer, IA3Linear) and adapter_name in layer.adapter_names:
            expected.add(f"{path}.ia3_l.{adapter_name}")
        elif isinstance(layer, OftLinear) and adapter_name in layer.adapter_names:
            expected.add(f"{path}.oft_R.{adapter_name}.weight")
        elif isinstance(layer, TrainableTokens) and adapter_name in layer.adapter_names and not layer.tied:
            expected.add(f"{path}.{layer.delta_key}.{adapter_name}")
        elif isinstance(layer, LycorisLinear) and adapter_name in layer.adapter_names:
            expected.update(f"{path}.{table}.{adapter_name}" for table in layer.TABLES
                            if adapter_name in getattr(layer, table))
        elif isinstance(layer, AdaLoraLinear) and adapter_name in layer.adapter_names:
            expected.update(f"{path}.{table}.{adapter_name}" for table in layer.TABLES)
        elif isinstance(layer, VeraLinear) and adapter_name in layer.adapter_names:
            expected.update({f"{path}.vera_lambda_b.{adapter_name}", f"{path}.vera_lambda_d.{adapter_name}"})
            vera = layer
    cfg = get_state(model).configs[adapter_name]
    if isinstance(cfg, VeraConfig):
        plan.extend(_plan_vera_projections(vera, cfg, adapter_name, tensors))
        tensors = {k: v for k, v in tensors.items() if k not in VERA_PROJECTION_KEYS}
    local_prefix = PEFT_PREFIX if prefix == "" else ""
    for key, tensor in tensors.items():
        local = local_prefix + (key[len(PEFT_PREFIX):] if key.startswith(PEFT_PREFIX) else key)
        if local.endswith((".vera_lambda_b", ".vera_lambda_d")) or local.endswith(
                tuple("." + t for t in LYCORIS_TABLES + AdaLoraLinear.TABLES)):
            target = f"{local}.{adapter_name}"
        elif local.endswith(".lora_magnitude_vector"):
            target = f"{local}.{adapter_name}.weight"
        elif local.endswith((".lora_A.weight", ".lora_B.weight", ".oft_R.weight")):
            target = f"{local[: -len('.weight')]}.{adapter_name}.weight"
        elif local.endswith((".ia3_l", ".lora_embedding_A", ".lora_embedding_B", "." + TOKENS_KEY)):
            target = f"{local}.{adapter_name}"
        else:
            owner = next((w for w in wrappers if local.startswith(w + ".")), None)
            rest = None if owner is None else local[len(owner) + 1:]
            if owner is None or rest.startswith("original_module."):
                target = local  # PEFT's bias="all" also saves "<wrapper>.original_module.bias"; it loads as named
            else:
                rest = rest[len("modules_to_save."):] if rest.startswith("modules_to_save.") else rest
                target = f"{owner}.modules_to_save.{adapter_name}.{rest}"
        if target not in params:
            raise ValueError(f"adapter key {key!r} has no matching parameter in the model (looked for {target!r})")
        param = params[target]
        if tuple(param.shape) != tuple(tensor.shape):
            raise ValueError(
                f"adapter key {key!r} has shape {tuple(tensor.shape)} but the model's {target!r} has shape "
                f"{tuple(param.shape)}"
            )
        if not (tensor.is_floating_point()):
            raise ValueError(f"adapter key {key!r} has dtype {tensor.dtype}; expected a floating-point tensor")
        plan.append((param, tensor))
        expected.discard(target)
    if expected:
        missing = sorted(expected)
        raise ValueError(f"the adapter file lacks {len(missing)} tensors the model needs, e.g. {missing[:3]}")
    return plan


def _plan_vera_projections(layer: VeraLinear, cfg: VeraConfig, adapter_name: str, tensors) -> list:
    """The file's VeRA projections (``base_model.vera_A`` / ``vera_B``) against the model's, as PEFT reads them:
    required when save_projection is true; without them the projections drawn from projection_prng_key stay (PEFT
    warns that another platform's generator could draw others; so does fastpeft)."""
    present = [k for k in VERA_PROJECTION_KEYS if k in tensors]
    if not present:
        if cfg.save_projection:
            raise ValueError("the adapter's config has save_projection=true but its file lacks "
                             f"{' and '.join(VERA_PROJECTION_KEYS)}")
        warnings.warn("this VeRA adapter was saved without its projections (save_projection=false): they are drawn "
                      f"again from projection_prng_key={cfg.projection_prng_key}, which another platform's random "
                      "generator may draw differently", stacklevel=4)
        return []
    if len(present) == 1:
        raise ValueError(f"the adapter file has {present[0]} but not its pair")
    plan = []
    for key, table in zip(VERA_PROJECTION_KEYS, (layer.vera_A, layer.vera_B)):
        current, value = table[adapter_name], tensors[key]
        if tuple(value.shape) != tuple(current.shape):
            raise ValueError(f"adapter key {key!r} has shape {tuple(value.shape)} but the model's VeRA projection has "
                             f"shape {tuple(current.shape)} (r and the largest adapted layer decide it)")
        if not value.is_floating_point():
            raise ValueError(f"adapter key {key!r} has dtype {value.dtype}; expected a floating-point tensor")
        plan.append((current, value))
    return plan


def load_adapter(
    model: nn.Module,
    path: str,
    adapter_name: str = "default",
    is_trainable: bool = False,
    allow_pickle: bool = False,
) -> nn.Module:
    """Load a PEFT-format adapter (saved by fastpeft or PEFT) into ``model``; patches it if needed.

    ``is_trainable=False`` freezes the adapter (inference). Tensors may be fp32, bf16 or fp16; adapter
    parameters stay fp32. On any error the model is left exactly as it was.

    >>> # model = fastpeft.load_adapter(model, "out/", is_trainable=True)
    """
    cfg, tensors = read_adapter(path, adapter_name, allow_pickle=allow_pickle)
    cfg.inference_mode = not is_trainable
    if is_prompt_learning(cfg):
        prompt_learning.check_loadable(cfg, is_trainable)
    state = get_state(model, required=False)
    if state is not None and adapter_name in state.configs:
        return _load_into_existing(model, cfg, adapter_name, tensors, is_trainable)
    plan = []
    # the file is checked against the new layers inside the patch: a bad file undoes it all (base weights an
    # init like PiSSA rewrote included)

    def check() -> None:
        if isinstance(cfg, AdaLoraConfig) and cfg.rank_pattern:
            # saved after rank allocation: the layers shrink to the kept triplets first, as PEFT's load does
            adalora.resize_by_rank_pattern(model, get_state(model).configs[adapter_name], adapter_name)
        plan.extend(_plan_load(model, adapter_name, tensors))

    if is_prompt_learning(cfg):
        # TEXT / SAMPLE_VOCAB initialisation is skipped: the values come from the file (and the tokenizer named in
        # the config need not exist here)
        prompt_learning.add_prompt_adapter(model, cfg, adapter_name, initialize=False, check=check)
    else:
        patch_checked(model, cfg, adapter_name, check=check)
    _copy_plan(plan)
    return model


def _copy_plan(plan) -> None:
    with torch.no_grad():
        for param, tensor in plan:
            # a sharded (FSDP2) parameter takes the shard this rank owns, cut from the full tensor every rank read
            param.copy_(shard_like(param, tensor.to(dtype=param.dtype)).to(device=param.device))


def _comparable(cfg: AdapterConfig) -> Dict[str, Any]:
    data = cfg.to_dict()
    for key in ("inference_mode", "base_model_name_or_path", "revision"):
        data.pop(key, None)
    return data


def _load_into_existing(model: nn.Module, cfg: AdapterConfig, adapter_name: str, tensors, is_trainable: bool):
    """Values of a saved adapter into an adapter the model already holds (same config): the way to load into a
    model that was patched and then sharded with FSDP2 (its parameters are DTensors, which patch() cannot build).
    Trainability follows ``is_trainable`` as for a fresh load."""
    state = get_state(model)
    have = _comparable(state.configs[adapter_name])
    want = _comparable(cfg)
    if have != want:
        diff = sorted(k for k in set(have) | set(want) if have.get(k) != want.get(k))
        raise ValueError(
            f"adapter {adapter_name!r} already exists with another config (differs in {diff}); load under another "
            f"adapter_name, or fastpeft.delete_adapter(model, {adapter_name!r}) first"
        )
    if is_prompt_learning(cfg) and state.trainable.get(adapter_name) != is_trainable:
        # a frozen prompt-learning adapter has another encoder structure (only the output table, as in PEFT)
        raise ValueError(f"adapter {adapter_name!r} is loaded with is_trainable={state.trainable.get(adapter_name)}; "
                         f"a prompt-learning adapter cannot be reloaded with is_trainable={is_trainable} in place "
                         "(fastpeft.unpatch(model) first)")
    plan = _plan_load(model, adapter_name, tensors)
    _copy_plan(plan)
    if state.trainable.get(adapter_name) != is_trainable:
        state.configs[adapter_name].inference_mode = not is_trainable
        state.trainable[adapter_name] = is_trainable
        apply_trainable(model, state)
    return model


# -- hot-swap ------------------------------------------------------------------------------------------------
def _file_key(prefix_local: str, path: str, suffix: str) -> str:
    return f"{prefix_local}{path}.{suffix}"


def hotswap_adapter(model: nn.Module, path: str, adapter_name: str = "default", allow_pickle: bool = False) -> None:
    """Replace the values of loaded adapter ``adapter_name`` in place with the adapter saved at ``path`` (PEFT's
    ``hotswap_adapter``): no module, parameter or shape changes, so a ``torch.compile``-d model keeps its graphs
    (no recompilation) and optimizers / CUDA graphs keep their tensors.

    The saved adapter must adapt the same layers with the same method (LoRA with or without DoRA, or IA3). A LoRA
    rank may be smaller than the loaded one: the extra rows of A / columns of B are zeroed (B·A unchanged). A
    different alpha or rank changes the scaling: the ratio new / old is folded into B, so the layers' scaling
    (a constant of compiled graphs) stays; saving afterwards writes the loaded adapter's r / alpha with that B (the
    same adapter, numerically). modules_to_save copies are overwritten too. Nothing is written unless every
    tensor fits. Load the adapter of the largest rank first (``load_adapter``), then swap the others in.

    >>> # fastpeft.load_adapter(model, "adapters/sql"); model = torch.compile(model)
    >>> # fastpeft.hotswap_adapter(model, "adapters/chat")   # same graphs, new weights
    """
    state = get_state(model)
    if adapter_name not in state.configs:
        raise ValueError(f"no adapter {adapter_name!r} to swap into; loaded: {sorted(state.configs)} (load one first "
                         "with fastpeft.load_adapter)")
    new_cfg, tensors = read_adapter(path, adapter_name, allow_pickle=allow_pickle)
    old_cfg = state.configs[adapter_name]
    if is_prompt_learning(old_cfg):
        raise NotImplementedError(f"hot-swap of prompt-learning adapters ({old_cfg.peft_type}) is not implemented; "
                                  "fastpeft.load_adapter the new one into a fresh model")
    if new_cfg.peft_type != old_cfg.peft_type:
        raise ValueError(f"cannot hot-swap a {new_cfg.peft_type} adapter into {adapter_name!r}, a {old_cfg.peft_type} "
                         "adapter")
    if isinstance(old_cfg, (VeraConfig, LoHaConfig, LoKrConfig, OFTConfig, AdaLoraConfig)):
        raise ValueError(f"hot-swap of {old_cfg.peft_type} adapters is not supported (LoRA and IA3 adapters can be "
                         "hot-swapped); "
                         "load the adapter under another name and set_adapter instead")
    is_lora = isinstance(old_cfg, LoraConfig)
    if is_lora:
        if new_cfg.use_dora != old_cfg.use_dora:
            raise ValueError(f"cannot hot-swap: use_dora={new_cfg.use_dora} in {path!r} but {old_cfg.use_dora} in "
                             f"the loaded adapter {adapter_name!r}")
        if new_cfg.bias != "none" or old_cfg.bias != "none":
            raise ValueError("hot-swap of LoRA adapters that train biases (bias='all' / 'lora_only') is not supported")
    prefix = _prefix(model)
    local_prefix = PEFT_PREFIX if prefix == "" else ""
    files = {local_prefix + (k[len(PEFT_PREFIX):] if k.startswith(PEFT_PREFIX) else k): v for k, v in tensors.items()}
    used, writes = set(), []

    def take(key: str, like: torch.Tensor, what: str) -> torch.Tensor:
        if key not in files:
            raise ValueError(f"cannot hot-swap: {path!r} has no {key!r} ({what} of a layer the loaded adapter "
                             f"{adapter_name!r} adapts); the two adapters must target the same layers")
        if not files[key].is_floating_point():
            raise ValueError(f"adapter key {key!r} has dtype {files[key].dtype}; expected a floating-point tensor")
        used.add(key)
        return files[key].to(device=like.device, dtype=torch.float32)

    for lpath, layer in adapter_layers(model):
        if adapter_name not in layer.adapter_names:
            continue
        if isinstance(layer, LoraEmbedding):
            raise ValueError(f"cannot hot-swap {lpath}: hot-swapping LoRA on embedding layers is not supported "
                             "(load_adapter under another name, then set_adapter)")
        if isinstance(layer, TrainableTokens):
            raise ValueError(f"cannot hot-swap {lpath}: hot-swapping trainable tokens is not supported "
                             "(load_adapter under another name, then set_adapter)")
        if isinstance(layer, LoraLinear):
            A, B = layer.lora_A[adapter_name].weight, layer.lora_B[adapter_name].weight
            a_new = take(_file_key("", lpath, "lora_A.weight"), A, "lora_A")
            b_new = take(_file_key("", lpath, "lora_B.weight"), B, "lora_B")
            r_new, r_old = a_new.shape[0], A.shape[0]
            if a_new.shape[1:] != A.shape[1:] or b_new.shape != (B.shape[0], r_new):
                raise ValueError(f"cannot hot-swap {lpath}: lora_A {tuple(a_new.shape)} / lora_B {tuple(b_new.shape)} "
                                 f"do not fit the layer ({A.shape[1]} in, {B.shape[0]} out)")
            if r_new > r_old:
                raise ValueError(f"cannot hot-swap {lpath}: rank {r_new} > the loaded adapter's rank {r_old} there; "
                                 "load the adapter of the largest rank first, then swap the others in")
            new_scaling = new_cfg.scaling_for(lpath)
            if new_cfg.rank_for(lpath) != r_new:
                raise ValueError(f"{path!r}: {lpath}'s lora_A has rank {r_new} but its config gives "
                                 f"{new_cfg.rank_for(lpath)}")
            ratio = new_scaling / layer.scaling[adapter_name]
            a_full = torch.zeros_like(A, dtype=torch.float32)
            a_full[:r_new] = a_new
            b_full = torch.zeros_like(B, dtype=torch.float32)
            b_full[:, :r_new] = b_new * ratio
            writes += [(A, a_full), (B, b_full)]
            if adapter_name in layer.lora_magnitude_vector:
                mag = layer.lora_magnitude_vector[adapter_name].weight
                m_new = take(f"{lpath}.lora_magnitude_vector", mag, "the DoRA magnitude")
                if m_new.shape != mag.shape:
                    raise ValueError(f"cannot hot-swap {lpath}: magnitude {tuple(m_new.shape)} vs {tuple(mag.shape)}")
                writes.append((mag, m_new))
        elif isinstance(layer, IA3Linear):
            vec = layer.ia3_l[adapter_name]
            v_new = take(f"{lpath}.ia3_l", vec, "ia3_l")
            if v_new.shape != vec.shape:
                raise ValueError(f"cannot hot-swap {lpath}: ia3_l {tuple(v_new.shape)} vs {tuple(vec.shape)} (the "
                                 "two IA3 adapters must agree on feedforward_modules)")
            writes.append((vec, v_new))
    for wpath, wrapper in _wrappers_to_save(model):
        if adapter_name not in wrapper.modules_to_save:
            continue
        for key, param in wrapper.modules_to_save[adapter_name].named_parameters():
            value = take(f"{wpath}.{key}", param, "a modules_to_save tensor")
            if value.shape != param.shape:
                raise ValueError(f"cannot hot-swap {wpath}.{key}: {tuple(value.shape)} vs {tuple(param.shape)}")
            writes.append((param, value))
    extra = sorted(set(files) - used)
    if extra:
        raise ValueError(f"cannot hot-swap: {path!r} holds {len(extra)} tensors the loaded adapter {adapter_name!r} "
                         f"has no place for, e.g. {extra[:3]}")
    with torch.no_grad():
        for param, value in writes:
            param.copy_(shard_like(param, value.to(param.dtype)).to(param.device))
    for _, layer in adapter_layers(model):
        if isinstance(layer, LoraLinear):
            layer._dora_norms.pop(adapter_name, None)
