"""Multitask prompt tuning (fastpeft.MultitaskPromptTuningConfig) against PEFT's: the same initial values from the
same seed, loss / logits / gradients (fp32 <= 1e-5) with per-row task_ids on a causal LM and on T5, greedy
generate(), PEFT's three-tensor file both ways, initialisation from a trained source prompt, and the errors."""
import copy
import json
import warnings

import peft
import pytest
import torch
from safetensors.torch import load_file, save_file

import fastpeft
from helpers import (assert_same_snapshot, peft_and_fastpeft, random_ids, rel_err, seq2seq_model, state_snapshot,
                     tiny_model)

TOL = 1e-5
KW = dict(num_virtual_tokens=4, num_tasks=3, num_ranks=2)


def _pair(arch="llama", **more):
    seq2seq = arch == "t5"
    base = seq2seq_model("t5") if seq2seq else tiny_model(arch, seed=1)
    kw = dict(task_type="SEQ_2_SEQ_LM" if seq2seq else "CAUSAL_LM", **KW, **more)
    return (base, *peft_and_fastpeft(base, "MultitaskPromptTuningConfig", 3, **kw))


def _params(model, peft_model=False):
    return {n: p for n, p in model.named_parameters() if (n.startswith("prompt_encoder.") if peft_model
                                                           else p.requires_grad)}


def _batch():
    ids = random_ids(batch=3, seq=9)
    mask = torch.ones_like(ids)
    mask[0, :3] = 0
    return ids, mask, torch.tensor([0, 2, 1])


@pytest.mark.parametrize("arch", ["llama", "gpt2", "t5"])
def test_same_init_loss_logits_and_gradients_as_peft(arch):
    _, theirs, ours = _pair(arch)
    tp, op = _params(theirs, True), _params(ours)
    assert tp.keys() == op.keys() == {"prompt_encoder.default.embedding.weight",
                                      "prompt_encoder.default.prefix_task_cols", "prompt_encoder.default.prefix_task_rows"}
    for name in op:  # the same draws in the same order from the same seed
        assert torch.equal(op[name], tp[name]), name
    ids, mask, tasks = _batch()
    labels = ids if arch != "t5" else torch.randint(3, 97, (3, 5))
    want = theirs(input_ids=ids, attention_mask=mask, labels=labels, task_ids=tasks)
    got = ours(input_ids=ids, attention_mask=mask, labels=labels, task_ids=tasks)
    assert rel_err(got.logits, want.logits) <= TOL
    assert abs(got.loss.item() - want.loss.item()) <= TOL * abs(want.loss.item())
    want.loss.backward()
    got.loss.backward()
    for name in op:
        assert rel_err(op[name].grad, tp[name].grad) <= TOL, name
    # each row's task decides its prompt: other task ids, other logits
    with torch.no_grad():
        other = ours(input_ids=ids, attention_mask=mask, labels=labels, task_ids=tasks.flip(0)).logits
    assert rel_err(other, got.logits) > 1e-6


def test_greedy_generate_gives_pefts_tokens():
    _, theirs, ours = _pair()
    with torch.no_grad():
        for p in list(_params(theirs, True).values()) + list(_params(ours).values()):
            p.mul_(30)  # a prompt strong enough to change the generated tokens
    for model in (theirs, ours):
        model.generation_config.eos_token_id = None
    ids, mask, tasks = _batch()
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        # PEFT 0.21.2's cached generate adds the prompt at every step with transformers 5.x; uncached it is right
        want = theirs.generate(input_ids=ids, attention_mask=mask, max_new_tokens=5, do_sample=False, task_ids=tasks,
                               use_cache=False)
        got = ours.generate(input_ids=ids, attention_mask=mask, max_new_tokens=5, do_sample=False, task_ids=tasks)
        plain = ours.generate(input_ids=ids, attention_mask=mask, max_new_tokens=5, do_sample=False,
                              task_ids=tasks.flip(0))
    assert torch.equal(got, want) and not torch.equal(plain, got)


@pytest.mark.parametrize("arch", ["llama", "t5"])
def test_files_both_ways(tmp_path, arch):
    base, theirs, ours = _pair(arch)
    with torch.no_grad():
        for name, p in _params(ours).items():
            p.add_(0.01 * torch.randn_like(p))
            _params(theirs, True)[name].copy_(p)
    theirs.save_pretrained(str(tmp_path / "peft"))
    fastpeft.save_adapter(ours, str(tmp_path / "ours"))
    assert json.loads((tmp_path / "ours" / "adapter_config.json").read_text()) == \
        json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    got = load_file(str(tmp_path / "ours" / "adapter_model.safetensors"))
    want = load_file(str(tmp_path / "peft" / "adapter_model.safetensors"))
    assert got.keys() == want.keys() == {"prompt_embeddings", "prefix_task_cols", "prefix_task_rows"}
    for key in want:
        assert torch.equal(got[key], want[key]), key
    ids, mask, tasks = _batch()
    labels = ids if arch != "t5" else torch.randint(3, 97, (3, 5))
    with torch.no_grad():
        expected = ours(input_ids=ids, attention_mask=mask, labels=labels, task_ids=tasks).logits
        loaded_peft = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "ours"))
        assert rel_err(loaded_peft(input_ids=ids, attention_mask=mask, labels=labels, task_ids=tasks).logits,
                       expected) <= TOL
        loaded = fastpeft.load_adapter(copy.deepcopy(base), str(tmp_path / "peft"))
        assert rel_err(loaded(input_ids=ids, attention_mask=mask, labels=labels, task_ids=tasks).logits,
                       expected) <= TOL
    trainable = fastpeft.load_adapter(copy.deepcopy(base), str(tmp_path / "peft"), is_trainable=True)
    assert {n for n, p in trainable.named_parameters() if p.requires_grad} == set(_params(ours))


@pytest.mark.parametrize("init", ["AVERAGE_SOURCE_TASKS", "EXACT_SOURCE_TASK", "ONLY_SOURCE_SHARED"])
def test_init_from_a_source_prompt_as_peft(tmp_path, init):
    _, source, _ = _pair()
    source.save_pretrained(str(tmp_path / "source"))
    path = str(tmp_path / "source" / "adapter_model.safetensors")
    more = dict(prompt_tuning_init=init, prompt_tuning_init_state_dict_path=path, prompt_tuning_init_task=2)
    if init != "ONLY_SOURCE_SHARED":
        more["num_tasks"] = 1  # the averaged / chosen task factors are one task (PEFT loads them strictly)
    kw = {**KW, **more}
    base = tiny_model("llama", seed=1)
    torch.manual_seed(5)
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.MultitaskPromptTuningConfig(task_type="CAUSAL_LM", **kw))
    torch.manual_seed(5)
    ours = fastpeft.patch(copy.deepcopy(base), fastpeft.MultitaskPromptTuningConfig(task_type="CAUSAL_LM", **kw))
    tp, op = _params(theirs, True), _params(ours)
    for name in op:
        assert torch.equal(op[name], tp[name]), name
    if init != "ONLY_SOURCE_SHARED":
        assert torch.equal(op["prompt_encoder.default.prefix_task_cols"],
                           load_file(path)["prefix_task_cols"].mean(0, keepdim=True) if init == "AVERAGE_SOURCE_TASKS"
                           else load_file(path)["prefix_task_cols"][2:3])


def test_errors_leave_the_model_unchanged(tmp_path):
    base = tiny_model("llama", seed=1)
    before = state_snapshot(base)
    with pytest.raises(ValueError, match="needs prompt_tuning_init_state_dict_path"):
        fastpeft.patch(base, fastpeft.MultitaskPromptTuningConfig(task_type="CAUSAL_LM", prompt_tuning_init="EXACT_SOURCE_TASK",
                                                                  **KW))
    torch.save({"prompt_embeddings": torch.zeros(4, 48)}, str(tmp_path / "source.bin"))
    with pytest.raises(ValueError, match=r"\.safetensors files only .*never unpickles"):
        fastpeft.patch(base, fastpeft.MultitaskPromptTuningConfig(
            task_type="CAUSAL_LM", prompt_tuning_init="ONLY_SOURCE_SHARED",
            prompt_tuning_init_state_dict_path=str(tmp_path / "source.bin"), **KW))
    save_file({"prompt_embeddings": torch.zeros(4, 48), "prefix_task_cols": torch.zeros(3, 4, 2),
               "prefix_task_rows": torch.zeros(3, 2, 48)}, str(tmp_path / "source.safetensors"))
    with pytest.raises(ValueError, match="prompt_tuning_init_task=5 but the source prompt has 3 tasks"):
        fastpeft.patch(base, fastpeft.MultitaskPromptTuningConfig(
            task_type="CAUSAL_LM", prompt_tuning_init="EXACT_SOURCE_TASK", prompt_tuning_init_task=5,
            prompt_tuning_init_state_dict_path=str(tmp_path / "source.safetensors"), **KW))
    with pytest.raises(ValueError, match="num_tasks=1 for AVERAGE_SOURCE_TASKS"):
        fastpeft.patch(base, fastpeft.MultitaskPromptTuningConfig(
            task_type="CAUSAL_LM", prompt_tuning_init="AVERAGE_SOURCE_TASKS",
            prompt_tuning_init_state_dict_path=str(tmp_path / "source.safetensors"), **KW))
    assert_same_snapshot(before, state_snapshot(base))
    with pytest.raises(ValueError, match="prompt_tuning_init must be one of"):
        fastpeft.MultitaskPromptTuningConfig(num_virtual_tokens=4, prompt_tuning_init="SAMPLE_VOCAB")
    with pytest.raises(ValueError, match="num_tasks must be None or a positive integer"):
        fastpeft.MultitaskPromptTuningConfig(num_virtual_tokens=4, num_tasks=0)
    model = fastpeft.patch(base, fastpeft.MultitaskPromptTuningConfig(task_type="CAUSAL_LM", **KW))
    with pytest.raises(ValueError, match="needs task_ids"):
        model(input_ids=random_ids())
    plain = fastpeft.patch(tiny_model("llama", seed=1), fastpeft.PromptTuningConfig(task_type="CAUSAL_LM",
                                                                                     num_virtual_tokens=4))
    with pytest.raises(ValueError, match="task_ids is for multitask prompt tuning"):
        plain(input_ids=random_ids(), task_ids=torch.zeros(2, dtype=torch.long))


def test_seq2seq_generate_gives_pefts_tokens():
    """PEFT's seq2seq generate() puts only the encoder's half of the prompt in (its forward also gives the decoder
    the other half): fastpeft does the same."""
    _, theirs, ours = _pair("t5")
    with torch.no_grad():
        for p in list(_params(theirs, True).values()) + list(_params(ours).values()):
            p.mul_(30)
    ids, mask, tasks = _batch()
    with torch.no_grad():
        want = theirs.generate(input_ids=ids, attention_mask=mask, max_new_tokens=5, do_sample=False, task_ids=tasks)
        got = ours.generate(input_ids=ids, attention_mask=mask, max_new_tokens=5, do_sample=False, task_ids=tasks)
        other = ours.generate(input_ids=ids, attention_mask=mask, max_new_tokens=5, do_sample=False,
                              task_ids=tasks.flip(0))
    assert torch.equal(got, want) and not torch.equal(other, got)
