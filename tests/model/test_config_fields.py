"""fastpeft configs take every PEFT field name, and the adapter_config.json fastpeft writes is the one PEFT writes.

PEFT is the reference: each test builds the same thing with PEFT and compares. The JSON-parity tests need the
PEFT release whose format fastpeft follows (fastpeft.config.PEFT_FORMAT_VERSION); with another one installed they
are skipped, and test_field_lists_are_the_installed_pefts says what to update.
"""
import copy
import dataclasses
import doctest
import json

import peft
import pytest
import torch
import transformers

import fastpeft
import fastpeft.config as C
from fastpeft import model_state

from helpers import random_ids, rel_err


SAME_PEFT = pytest.mark.skipif(
    peft.__version__ != C.PEFT_FORMAT_VERSION,
    reason=f"fastpeft writes PEFT {C.PEFT_FORMAT_VERSION}'s adapter_config.json; peft {peft.__version__} is installed",
)
PAIRS = [(fastpeft.LoraConfig, peft.LoraConfig), (fastpeft.IA3Config, peft.IA3Config),
         (fastpeft.VeraConfig, peft.VeraConfig), (fastpeft.LoHaConfig, peft.LoHaConfig),
         (fastpeft.LoKrConfig, peft.LoKrConfig), (fastpeft.OFTConfig, peft.OFTConfig),
         (fastpeft.AdaLoraConfig, peft.AdaLoraConfig)]
IDS = ["lora", "ia3", "vera", "loha", "lokr", "oft", "adalora"]
# fields without which a config cannot be built at all (PEFT refuses AdaLoraConfig(total_step=None) too)
REQUIRED = {fastpeft.AdaLoraConfig: {"total_step": 10}}
# PEFT fields fastpeft accepts only at their default, per config
UNSUPPORTED_COUNT = {fastpeft.LoraConfig: 18, fastpeft.AdaLoraConfig: 23}


def _tiny_llama(layers: int = 2, seed: int = 0):
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(hidden_size=48, intermediate_size=88, num_hidden_layers=layers,
                                   num_attention_heads=4, num_key_value_heads=2, vocab_size=97)
    return transformers.AutoModelForCausalLM.from_config(cfg).eval()


def _peft_default(f: dataclasses.Field):
    return f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default


def _peft_fields(peft_cls):
    return {f.name: f for f in dataclasses.fields(peft_cls)}


def _unsupported(ours):
    return [n for n in ours.peft_field_names() if n not in ours.field_names()]


# -- bug 3: every PEFT field name is a keyword ---------------------------------------------------------------
@pytest.mark.parametrize("ours,theirs", PAIRS, ids=IDS)
def test_every_peft_field_is_accepted_at_pefts_default(ours, theirs):
    for name, f in _peft_fields(theirs).items():
        default = _peft_default(f)
        if name in REQUIRED.get(ours, {}):
            continue  # PEFT's default is refused by PEFT itself
        cfg = ours(**{**REQUIRED.get(ours, {}), name: copy.deepcopy(default)})
        # the value kept is PEFT's, in the plain form json writes (a PEFT sub-config object becomes its dict)
        kept = getattr(cfg, name)
        expected = C._plain(default)
        if name == "peft_type":
            expected = ours.PEFT_TYPE  # PEFT's default None means "this config's type", which PEFT fills in
        assert kept == expected, (name, kept, expected)


@SAME_PEFT
@pytest.mark.parametrize("ours,theirs", PAIRS, ids=IDS)
def test_field_lists_are_the_installed_pefts(ours, theirs):
    # the field names and defaults written out in fastpeft/config.py are those of the installed PEFT
    peft_fields = _peft_fields(theirs)
    assert set(ours.peft_field_names()) == set(peft_fields)
    for f in dataclasses.fields(ours):
        if f.name in _unsupported(ours):
            assert C._default_of(f) == C._plain(_peft_default(peft_fields[f.name])), f.name
            assert f.kw_only and not f.repr, f.name
    assert len(_unsupported(ours)) == UNSUPPORTED_COUNT.get(ours, 0)


# A value PEFT treats as "on" for each LoRA field fastpeft does not implement (PEFT's own objects where they exist).
NON_DEFAULT = {
    "megatron_config": lambda: {"tensor_model_parallel_size": 2},
    "megatron_core": lambda: "my_megatron.core",
    "eva_config": lambda: peft.EvaConfig(),
    "corda_config": lambda: {"corda_method": "kpm"},
    "lora_ga_config": lambda: {"direction": "ArB2r"},
    "velora_config": lambda: {"rank": 4},
    "alora_invocation_tokens": lambda: [5, 6],
    "use_qalora": lambda: True,
    "qalora_group_size": lambda: 32,
    "monteclora_config": lambda: {"n_samples": 2},
    "layer_replication": lambda: [(0, 1), (0, 2)],
    "runtime_config": lambda: peft.tuners.lora.config.LoraRuntimeConfig(ephemeral_gpu_offload=True),
    "lora_bias": lambda: True,
    "target_parameters": lambda: ["mlp.experts.down_proj"],
    "use_bdlora": lambda: {"nblocks": 2},
    "arrow_config": lambda: {"top_k": 2},
    "kasa_config": lambda: {"rank": 2},
    "ensure_weight_tying": lambda: True,
}


def test_non_default_table_covers_every_unsupported_field():
    assert set(NON_DEFAULT) == set(_unsupported(fastpeft.LoraConfig))


@pytest.mark.parametrize("name", sorted(NON_DEFAULT))
def test_unsupported_field_with_a_value_raises(name):
    value = NON_DEFAULT[name]()
    default = next(C._default_of(f) for f in dataclasses.fields(fastpeft.LoraConfig) if f.name == name)
    for build in (
        lambda: fastpeft.LoraConfig(r=4, **{name: value}),
        lambda: C.to_fastpeft_config({"peft_type": "LORA", "r": 4, name: C._plain(value)}),
    ):
        with pytest.raises(ValueError) as err:
            build()
        msg = str(err.value)
        assert f"does not support {name}=" in msg, msg
        assert f"{name}={default!r}" in msg and "Supported fields:" in msg and "rank_pattern" in msg, msg


@pytest.mark.parametrize("kwargs,name", [(dict(lora_bias=True), "lora_bias"),
                                         (dict(ensure_weight_tying=True), "ensure_weight_tying"),
                                         (dict(use_qalora=True), "use_qalora")])
def test_unsupported_field_of_a_peft_config_raises(kwargs, name):
    theirs = peft.LoraConfig(r=4, target_modules=["q_proj"], **kwargs)
    with pytest.raises(ValueError, match=rf"does not support {name}="):
        C.to_fastpeft_config(theirs)


@pytest.mark.parametrize("tokens", [[0, 1], {"embed_tokens": [3], "lm_head": [4, 5]}])
def test_trainable_token_indices_of_a_peft_config_convert(tokens):
    # implemented since fastpeft.TrainableTokens (tests/model/test_trainable_tokens.py): a PEFT config keeps it
    theirs = peft.LoraConfig(r=4, target_modules=["q_proj"], trainable_token_indices=tokens)
    ours = C.to_fastpeft_config(theirs)
    assert ours.trainable_token_indices == tokens
    assert ours.to_adapter_config()["trainable_token_indices"] == tokens


def test_off_values_are_stored_in_pefts_spelling():
    cfg = fastpeft.LoraConfig(loftq_config=None, eva_config={}, runtime_config={"ephemeral_gpu_offload": False})
    assert cfg.loftq_config == {} and cfg.eva_config is None
    assert cfg.runtime_config == {"ephemeral_gpu_offload": False}
    with pytest.raises(ValueError, match="does not support use_qalora=0"):
        fastpeft.LoraConfig(use_qalora=0)  # PEFT's off is False; 0 is no value PEFT writes
    with pytest.raises(ValueError, match="use_dora must be True or False"):
        fastpeft.LoraConfig(use_dora=0)


@pytest.mark.parametrize(
    "cls,kwargs,typo,hint",
    [
        (fastpeft.LoraConfig, dict(use_dorra=False), "use_dorra", "use_dora"),
        (fastpeft.LoraConfig, dict(lora_alhpa=16), "lora_alhpa", "lora_alpha"),
        (fastpeft.LoraConfig, dict(frobnicate=1), "frobnicate", None),
        (fastpeft.IA3Config, dict(feedforward_module=["down_proj"]), "feedforward_module", "feedforward_modules"),
        (fastpeft.IA3Config, dict(use_dora=False), "use_dora", None),  # a LoRA field is no IA3 field
    ],
)
def test_a_name_that_is_no_peft_field_is_a_type_error(cls, kwargs, typo, hint):
    with pytest.raises(TypeError) as err:
        cls(**kwargs)
    msg = str(err.value)
    assert repr(typo) in msg and f"peft.{cls.__name__}" in msg, msg
    if hint is not None:
        assert f"did you mean {hint!r}" in msg, msg


def test_positional_keyword_use_and_validation_unchanged():
    cfg = fastpeft.LoraConfig(16, 32, 0.1, ["q_proj"])
    assert (cfg.r, cfg.lora_alpha, cfg.lora_dropout, cfg.target_modules) == (16, 32, 0.1, ["q_proj"])
    assert fastpeft.LoraConfig(r=16, lora_alpha=32).scaling_for("x.q_proj") == 2.0
    with pytest.raises(TypeError):
        fastpeft.LoraConfig(*([8, 8, 0.0, None, None, "none", False, None, False, True, {}, {}, None, None,
                               None, None, None, False, "LORA"]))  # PEFT's extra fields are keyword-only
    for bad, match in [(dict(r=0), "r must be a positive integer"), (dict(lora_dropout=1.0), "lora_dropout"),
                       (dict(bias="some"), "bias must be one of"), (dict(init_lora_weights="eva"),
                                                                    "init_lora_weights must be True, False,"),
                       (dict(peft_type="IA3"), r"peft_type must be 'LORA' \(or None\)"),
                       (dict(task_type="CAUSAL"), "task_type must be None or one of"),
                       (dict(target_modules=".*q_proj", layers_to_transform=[0]), "layers_to_transform")]:
        with pytest.raises(ValueError, match=match):
            fastpeft.LoraConfig(**bad)
    with pytest.raises(ValueError, match=r"peft_type must be 'IA3'"):
        fastpeft.IA3Config(peft_type="LORA")
    with pytest.raises(ValueError, match="subset of target_modules"):
        fastpeft.IA3Config(target_modules=["k_proj"], feedforward_modules=["down_proj"])


def test_enums_and_repr_fields_to_dict():
    cfg = fastpeft.LoraConfig(r=4, task_type=peft.TaskType.CAUSAL_LM, peft_type=peft.PeftType.LORA)
    assert type(cfg.task_type) is str and cfg.task_type == "CAUSAL_LM" and type(cfg.peft_type) is str
    text = repr(cfg)
    assert "r=4" in text and "task_type='CAUSAL_LM'" in text
    assert "use_qalora" not in text  # fields fastpeft does not implement stay out
    assert "use_qalora" not in fastpeft.LoraConfig.field_names() and "rank_pattern" in fastpeft.LoraConfig.field_names()
    assert "use_dora" in fastpeft.LoraConfig.field_names()
    data = cfg.to_dict()
    assert data["use_dora"] is False and data["peft_type"] == "LORA"
    assert "peft_version" not in data and "auto_mapping" not in data  # save-time metadata, not a setting
    assert fastpeft.LoraConfig(r=4, peft_version="0.13.0") == fastpeft.LoraConfig(r=4)


@pytest.mark.parametrize(
    "theirs",
    [
        peft.LoraConfig(r=4, lora_alpha=16, target_modules={"q_proj", "v_proj"}, lora_dropout=0.1, use_rslora=True,
                        rank_pattern={"v_proj": 2}, modules_to_save=["lm_head"], task_type="CAUSAL_LM"),
        peft.LoraConfig(target_modules="all-linear", exclude_modules=["o_proj"]),
        peft.IA3Config(target_modules=["k_proj", "down_proj"], feedforward_modules=["down_proj"]),
        peft.IA3Config(),
    ],
    ids=["lora-set", "lora-all-linear", "ia3-list", "ia3-defaults"],
)
def test_to_fastpeft_config_of_a_peft_config(theirs):
    ours = C.to_fastpeft_config(theirs)
    assert type(ours).__name__ == type(theirs).__name__ and ours.peft_type == theirs.peft_type.value
    for name in ours.field_names():
        want = getattr(theirs, name)
        want = sorted(want) if isinstance(want, set) else getattr(want, "value", want)
        assert getattr(ours, name) == want, name
    assert ours.peft_version == theirs.peft_version


def test_dict_path_keeps_its_rules():
    # adapter_config.json dicts: peft_type is read case-blind, a key of another PEFT release is accepted only unset
    cfg = C.to_fastpeft_config({"peft_type": "lora", "r": 4, "target_modules": ["q_proj"], "old_peft_field": None})
    assert cfg.peft_type == "LORA" and cfg.r == 4
    with pytest.raises(ValueError, match="does not support old_peft_field=3"):
        C.to_fastpeft_config({"peft_type": "LORA", "old_peft_field": 3})
    with pytest.raises(ValueError, match=r"peft_type must be 'LORA'"):
        fastpeft.LoraConfig.from_dict({"peft_type": "IA3"})


def test_config_docstrings_run():
    result = doctest.testmod(C, optionflags=doctest.ELLIPSIS)
    assert result.attempted >= 8 and result.failed == 0


# -- bug 6: adapter_config.json is what PEFT writes -------------------------------------------------------------
def _peft_json(tmp_path, theirs, layers=2):
    folder = tmp_path / "peft"
    peft.get_peft_model(_tiny_llama(layers), theirs).save_pretrained(str(folder))
    return json.loads((folder / "adapter_config.json").read_text())


def _our_json(tmp_path, ours, layers=2):
    folder = tmp_path / "ours"
    model = fastpeft.patch(_tiny_llama(layers), ours)
    fastpeft.save_adapter(model, str(folder))
    return json.loads((folder / "adapter_config.json").read_text())


def _assert_same_json(ours, theirs):
    assert set(ours) == set(theirs), (sorted(set(ours) - set(theirs)), sorted(set(theirs) - set(ours)))
    assert ours["peft_version"] == C.PEFT_FORMAT_VERSION
    for key in sorted(theirs):
        if key in C._SET_FIELDS and isinstance(theirs[key], list):
            # PEFT writes a set in hash order; fastpeft writes the same set sorted
            assert isinstance(ours[key], list) and ours[key] == sorted(ours[key]), (key, ours[key])
            assert set(ours[key]) == set(theirs[key]), (key, sorted(ours[key]), sorted(theirs[key]))
        else:
            assert ours[key] == theirs[key], (key, ours[key], theirs[key])


LORA_CASES = {
    "list": dict(r=4, lora_alpha=16, target_modules=["q_proj", "v_proj", "o_proj"], rank_pattern={"o_proj": 2},
                 use_rslora=True, modules_to_save=["lm_head"]),
    "list-task-type": dict(r=4, target_modules=["q_proj", "down_proj"], task_type="CAUSAL_LM",
                           exclude_modules=["model.layers.1.mlp.down_proj"]),
    "regex": dict(r=4, target_modules=r".*\.(q|v)_proj"),
    "none": dict(r=4),
    "all-linear": dict(r=4, target_modules="all-linear"),
    "all-linear-exclude": dict(r=4, target_modules="all-linear", exclude_modules=".*mlp.*"),
}
IA3_CASES = {
    "defaults": dict(),
    "list": dict(target_modules=["k_proj", "v_proj", "down_proj"], feedforward_modules=["down_proj"],
                 init_ia3_weights=False),
    "all-linear": dict(target_modules="all-linear", feedforward_modules=["down_proj"]),
}


@SAME_PEFT
@pytest.mark.parametrize("kwargs", list(LORA_CASES.values()), ids=list(LORA_CASES))
def test_lora_adapter_config_json_is_pefts(tmp_path, kwargs):
    _assert_same_json(_our_json(tmp_path, fastpeft.LoraConfig(**kwargs)),
                      _peft_json(tmp_path, peft.LoraConfig(**kwargs)))


@SAME_PEFT
@pytest.mark.parametrize("kwargs", list(IA3_CASES.values()), ids=list(IA3_CASES))
def test_ia3_adapter_config_json_is_pefts(tmp_path, kwargs):
    _assert_same_json(_our_json(tmp_path, fastpeft.IA3Config(**kwargs)),
                      _peft_json(tmp_path, peft.IA3Config(**kwargs)))


@SAME_PEFT
def test_all_linear_with_20_or_more_layers_is_written_condensed(tmp_path):
    # 3 layers x 7 linear layers = 21 targets: PEFT stores the 7 leaf names instead of 21 full names
    _assert_same_json(_our_json(tmp_path, fastpeft.LoraConfig(r=4, target_modules="all-linear"), layers=3),
                      _peft_json(tmp_path, peft.LoraConfig(r=4, target_modules="all-linear"), layers=3))


@SAME_PEFT
def test_peft_config_object_saved_by_fastpeft_writes_pefts_json(tmp_path):
    # a PEFT config given to fastpeft.patch (the common porting path) writes the same file as PEFT
    kwargs = dict(r=4, lora_alpha=8, target_modules={"v_proj", "q_proj", "up_proj"}, init_lora_weights=False)
    _assert_same_json(_our_json(tmp_path, peft.LoraConfig(**kwargs)), _peft_json(tmp_path, peft.LoraConfig(**kwargs)))


@SAME_PEFT
@pytest.mark.parametrize("peft_type,layers", [("LORA", 2), ("LORA", 3), ("IA3", 3)])
def test_peft_stored_targets_matches_pefts_all_linear(tmp_path, peft_type, layers):
    # The config side of "all-linear": given the full names of the linear layers PEFT resolves (output head
    # excluded), peft_stored_targets gives the list PEFT writes (full names below 20 targets, condensed for LoRA
    # from 20 on, never condensed for IA3).
    theirs = (peft.LoraConfig(target_modules="all-linear") if peft_type == "LORA"
              else peft.IA3Config(target_modules="all-linear", feedforward_modules=[]))
    written = _peft_json(tmp_path, theirs, layers=layers)["target_modules"]
    model = _tiny_llama(layers)
    names = [n for n, _ in model.named_modules()]
    linear = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and m is not model.lm_head]
    assert len(linear) == 7 * layers
    stored = C.peft_stored_targets(peft_type, linear, names)
    assert stored == sorted(written)
    condensed = peft_type == "LORA" and len(linear) >= C.PEFT_CONDENSE_MIN_TARGETS
    assert stored == (sorted({n.rsplit(".", 1)[1] for n in linear}) if condensed else sorted(linear))


def test_peft_stored_targets_keeps_suffixes_that_other_modules_share():
    # "dense" also names a module that is no target, so the targets need a longer suffix
    targets = [f"enc.{i}.attn.dense" for i in range(20)] + [f"enc.{i}.mlp.fc" for i in range(5)]
    others = [f"enc.{i}.out.dense" for i in range(20)]
    assert C.peft_stored_targets("LORA", targets, ["", "enc"] + targets + others) == ["attn.dense", "fc"]
    with pytest.raises(ValueError, match="empty name"):
        C.peft_stored_targets("LORA", targets + [""], targets)


def test_adapter_config_keeps_a_loaded_peft_version_and_mapping():
    loaded = C.to_fastpeft_config({"peft_type": "LORA", "r": 4, "target_modules": ["q_proj"],
                                   "peft_version": "0.13.0", "task_type": "CAUSAL_LM",
                                   "auto_mapping": {"base_model_class": "X", "parent_library": "y"}})
    data = loaded.to_adapter_config("base", transformers.LlamaForCausalLM)
    # PEFT keeps the version a config was made with, and the class only when task_type is None
    assert data["peft_version"] == "0.13.0" and data["auto_mapping"] == {"base_model_class": "X", "parent_library": "y"}
    fresh = fastpeft.LoraConfig(r=4, target_modules=["q_proj"]).to_adapter_config("base", transformers.LlamaForCausalLM)
    assert fresh["peft_version"] == C.PEFT_FORMAT_VERSION and fresh["base_model_name_or_path"] == "base"
    assert fresh["auto_mapping"] == {"base_model_class": "LlamaForCausalLM",
                                     "parent_library": "transformers.models.llama.modeling_llama"}
    assert "runtime_config" not in fresh and fresh["inference_mode"] is True


# -- loading: PEFT's file into fastpeft, fastpeft's into fastpeft and into PEFT --------------------------------
def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


@pytest.mark.parametrize("targets", [["q_proj", "v_proj", "down_proj"], "all-linear"])
def test_round_trips_through_the_new_json(tmp_path, targets):
    ids = random_ids()
    base_logits = _logits(_tiny_llama(), ids)
    cfg = fastpeft.LoraConfig(r=4, lora_alpha=8, target_modules=targets, init_lora_weights=False)
    ours = fastpeft.patch(_tiny_llama(), cfg)
    want = _logits(ours, ids)
    assert rel_err(want, base_logits) > 1e-3  # the adapter really changes the outputs
    fastpeft.save_adapter(ours, str(tmp_path / "ours"))
    written = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())

    # fastpeft reads its own file back: same outputs, and re-saving writes the same file
    loaded = fastpeft.load_adapter(_tiny_llama(), str(tmp_path / "ours"))
    assert rel_err(_logits(loaded, ids), want) < 1e-6
    fastpeft.save_adapter(loaded, str(tmp_path / "again"))
    assert json.loads((tmp_path / "again" / "adapter_config.json").read_text()) == written

    # PEFT reads fastpeft's file: same outputs, and the fields fastpeft does not implement are PEFT's off values
    theirs = peft.PeftModel.from_pretrained(_tiny_llama(), str(tmp_path / "ours"))
    assert rel_err(_logits(theirs, ids), want) < 1e-5
    config = theirs.peft_config["default"]
    assert config.use_dora is False and config.lora_bias is False and config.peft_version == written["peft_version"]


@pytest.mark.parametrize("kind", ["lora", "ia3"])
def test_fastpeft_reads_pefts_json(tmp_path, kind):
    ids = random_ids()
    theirs_cfg = (peft.LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False) if kind == "lora"
                  else peft.IA3Config(init_ia3_weights=False))
    theirs = peft.get_peft_model(_tiny_llama(), theirs_cfg)
    theirs.save_pretrained(str(tmp_path))
    written = json.loads((tmp_path / "adapter_config.json").read_text())
    ours = fastpeft.load_adapter(_tiny_llama(), str(tmp_path))
    assert rel_err(_logits(ours, ids), _logits(theirs, ids)) < 1e-5
    cfg = model_state.get_state(ours).configs["default"]
    assert set(cfg.target_modules) == set(written["target_modules"])
    assert cfg.peft_version == written["peft_version"]
