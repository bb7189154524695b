"""Prompt tuning, prefix tuning and P-tuning on encoder-decoder models (T5, BART; PEFT's task_type="SEQ_2_SEQ_LM")
against PEFT's PeftModelForSeq2SeqLM: loss, logits and prompt-encoder gradients (fp32 <= 1e-5), greedy generate(),
PEFT's file format both ways, unpatch / disable, and the errors for what is not supported."""
import copy
import json
import warnings

import peft
import pytest
import torch
import transformers
from safetensors.torch import load_file

import fastpeft
from helpers import assert_same_snapshot, rel_err, seq2seq_model, state_snapshot

TOL = 1e-5
VIRTUAL = 4
CASES = {
    "prompt-tuning": ("PromptTuningConfig", {}),
    "prefix": ("PrefixTuningConfig", {}),
    "prefix-projection": ("PrefixTuningConfig", dict(prefix_projection=True, encoder_hidden_size=16)),
    "p-tuning-mlp": ("PromptEncoderConfig", dict(encoder_hidden_size=16)),
    "p-tuning-lstm": ("PromptEncoderConfig", dict(encoder_hidden_size=16, encoder_reparameterization_type="LSTM")),
}
ARCHS = ["t5", "bart"]
START = {"t5": 0, "bart": 2}  # decoder_start_token_id


def _configs(case, **more):
    cls, extra = CASES[case]
    kw = dict(task_type="SEQ_2_SEQ_LM", num_virtual_tokens=VIRTUAL, **extra, **more)
    return getattr(peft, cls)(**kw), getattr(fastpeft, cls)(**kw)


def _pair(arch, case):
    base = seq2seq_model(arch)
    pcfg, fcfg = _configs(case)
    torch.manual_seed(3)
    theirs = peft.get_peft_model(copy.deepcopy(base), pcfg)
    ours = fastpeft.patch(copy.deepcopy(base), fcfg)
    theirs_params = {n: p for n, p in theirs.named_parameters() if n.startswith("prompt_encoder.")}
    ours_params = {n: p for n, p in ours.named_parameters() if p.requires_grad}
    assert ours_params.keys() == theirs_params.keys()  # PEFT's parameter names
    with torch.no_grad():
        for name, p in ours_params.items():
            p.copy_(theirs_params[name] * 30 + 0.01 * torch.randn_like(p))  # strong enough to change the tokens
            theirs_params[name].copy_(p)
    return theirs.eval(), ours.eval()


def _batch(seed=1):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 97, (3, 9), generator=gen)
    mask = torch.ones_like(ids)
    mask[0, -3:] = 0  # padding
    labels = torch.randint(3, 97, (3, 5), generator=gen)
    labels[1, -2:] = -100
    return ids, mask, labels


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("arch", ARCHS)
def test_same_loss_logits_and_gradients_as_peft(arch, case):
    theirs, ours = _pair(arch, case)
    theirs.train()
    ours.train()
    ids, mask, labels = _batch()
    decoder_mask = torch.ones_like(labels)
    decoder_mask[2, -1] = 0
    torch.manual_seed(7)  # P-tuning's encoder dropout: the same draws on both sides
    want = theirs(input_ids=ids, attention_mask=mask, labels=labels, decoder_attention_mask=decoder_mask)
    torch.manual_seed(7)
    got = ours(input_ids=ids, attention_mask=mask, labels=labels, decoder_attention_mask=decoder_mask)
    assert got.logits.shape == (3, 5, 97)  # the decoder's tokens: the prompt is on the encoder side / in the cache
    assert rel_err(got.logits, want.logits) <= TOL
    assert abs(got.loss.item() - want.loss.item()) <= TOL * abs(want.loss.item())
    want.loss.backward()
    got.loss.backward()
    theirs_grads = {n: p.grad for n, p in theirs.named_parameters() if n.startswith("prompt_encoder.")}
    for name, p in ours.named_parameters():
        if p.requires_grad:
            assert theirs_grads[name] is not None and rel_err(p.grad, theirs_grads[name]) <= TOL, name
    with fastpeft.disable_adapter(ours), torch.no_grad():  # the prompt matters (vacuous comparison otherwise)
        plain = ours(input_ids=ids, attention_mask=mask, labels=labels).logits
    assert rel_err(plain, want.logits) > 1e-3


def _greedy_through_forward(model, ids, mask, start, steps):
    """Greedy decoding by full forward passes (no cache): the reference generate() must reproduce."""
    decoded = torch.full((ids.shape[0], 1), start)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for _ in range(steps):
            logits = model(input_ids=ids, attention_mask=mask, decoder_input_ids=decoded).logits
            decoded = torch.cat([decoded, logits[:, -1].argmax(-1, keepdim=True)], 1)
    return decoded


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("arch", ARCHS)
def test_greedy_generate_gives_pefts_tokens(arch, case):
    """generate() (cached and uncached) gives the tokens of greedy decoding through PEFT's forward; for prompt
    tuning / P-tuning PEFT's own generate() gives them too. (PEFT 0.21.2's generate for prefix tuning is wrong
    with transformers 5.x on T5, whose cache keyword is "cache": its prefix is lost after the first step.)"""
    theirs, ours = _pair(arch, case)
    ids, mask, _ = _batch(seed=4)
    want = _greedy_through_forward(theirs, ids, mask, START[arch], 6)
    with torch.no_grad():
        got = ours.generate(input_ids=ids, attention_mask=mask, max_new_tokens=6, do_sample=False)
        uncached = ours.generate(input_ids=ids, attention_mask=mask, max_new_tokens=6, do_sample=False,
                                 use_cache=False)
        with fastpeft.disable_adapter(ours):
            plain = ours.generate(input_ids=ids, attention_mask=mask, max_new_tokens=6, do_sample=False)
    assert got.shape == (3, 7)
    assert torch.equal(got, want) and torch.equal(uncached, want)
    assert not torch.equal(plain, got)  # the prompt changes what is generated
    if not case.startswith("prefix"):
        with torch.no_grad():
            assert torch.equal(theirs.generate(input_ids=ids, attention_mask=mask, max_new_tokens=6,
                                               do_sample=False), want)


@pytest.mark.parametrize("case", ["prompt-tuning", "prefix", "p-tuning-mlp"])
@pytest.mark.parametrize("arch", ARCHS)
def test_files_both_ways(tmp_path, arch, case):
    theirs, ours = _pair(arch, case)
    theirs.save_pretrained(str(tmp_path / "peft"))
    fastpeft.save_adapter(ours, str(tmp_path / "ours"))
    assert json.loads((tmp_path / "ours" / "adapter_config.json").read_text()) == \
        json.loads((tmp_path / "peft" / "adapter_config.json").read_text())  # num_transformer_submodules 2, ...
    ours_file = load_file(str(tmp_path / "ours" / "adapter_model.safetensors"))
    peft_file = load_file(str(tmp_path / "peft" / "adapter_model.safetensors"))
    assert list(ours_file) == ["prompt_embeddings"]
    assert ours_file["prompt_embeddings"].shape == peft_file["prompt_embeddings"].shape
    assert rel_err(ours_file["prompt_embeddings"], peft_file["prompt_embeddings"]) <= TOL
    ids, mask, labels = _batch()
    loaded_peft = peft.PeftModel.from_pretrained(seq2seq_model(arch), str(tmp_path / "ours")).eval()
    loaded_ours = fastpeft.load_adapter(seq2seq_model(arch), str(tmp_path / "peft")).eval()
    with torch.no_grad():
        want = ours(input_ids=ids, attention_mask=mask, labels=labels).logits
        assert rel_err(loaded_peft(input_ids=ids, attention_mask=mask, labels=labels).logits, want) <= TOL
        assert rel_err(loaded_ours(input_ids=ids, attention_mask=mask, labels=labels).logits, want) <= TOL
    assert torch.equal(loaded_ours.generate(input_ids=ids, attention_mask=mask, max_new_tokens=4, do_sample=False),
                       _greedy_through_forward(theirs, ids, mask, START[arch], 4))


def test_a_training_step_changes_only_the_prompt_and_unpatch_restores():
    base = seq2seq_model("t5")
    before = state_snapshot(base)
    model = fastpeft.patch(base, _configs("prompt-tuning")[1]).train()
    ids, mask, labels = _batch()
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    model(input_ids=ids, attention_mask=mask, labels=labels).loss.backward()
    opt.step()
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    assert names == {"prompt_encoder.default.embedding.weight"}
    # the table holds 2 x num_virtual_tokens rows (PEFT's num_transformer_submodules=2); only the encoder's half
    # is used by PEFT's seq2seq forward, so only it gets a gradient
    table = model.prompt_encoder["default"].embedding.weight
    assert table.shape == (2 * VIRTUAL, 32)
    assert table.grad[:VIRTUAL].abs().sum() > 0 and table.grad[VIRTUAL:].abs().sum() == 0
    fastpeft.unpatch(model)
    assert not {"forward", "generate"} & set(base.__dict__) and not hasattr(base, "prompt_encoder")
    assert_same_snapshot(before, state_snapshot(base))


@pytest.mark.parametrize("kwargs,error,match", [
    (dict(task_type="CAUSAL_LM", num_virtual_tokens=4), ValueError,
     "encoder-decoder model: set task_type='SEQ_2_SEQ_LM'"),
    (dict(num_virtual_tokens=4), ValueError, "set task_type='SEQ_2_SEQ_LM'"),
])
def test_wrong_task_type_leaves_the_model_unchanged(kwargs, error, match):
    base = seq2seq_model("t5")
    before = state_snapshot(base)
    with pytest.raises(error, match=match):
        fastpeft.patch(base, fastpeft.PromptTuningConfig(**kwargs))
    assert_same_snapshot(before, state_snapshot(base))
    assert not {"forward", "generate"} & set(base.__dict__)


def test_prefix_tuning_refusals_on_encoder_decoder_models():
    base = seq2seq_model("t5")
    with pytest.raises(NotImplementedError, match="num_transformer_submodules=1 is not implemented"):
        fastpeft.patch(base, fastpeft.PrefixTuningConfig(task_type="SEQ_2_SEQ_LM", num_virtual_tokens=4,
                                                         num_transformer_submodules=1))
    cfg = transformers.T5Config(vocab_size=97, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_decoder_layers=3,
                                num_heads=4, decoder_start_token_id=0)
    uneven = transformers.T5ForConditionalGeneration(cfg)
    with pytest.raises(NotImplementedError, match="2 encoder and 3 decoder layers"):
        fastpeft.patch(uneven, _configs("prefix")[1])
    # prompt tuning with one submodule: a table of num_virtual_tokens rows, the same numbers as PEFT's
    pcfg, fcfg = _configs("prompt-tuning", num_transformer_submodules=1)
    theirs = peft.get_peft_model(seq2seq_model("t5"), pcfg)
    ours = fastpeft.patch(seq2seq_model("t5"), fcfg)
    ours.prompt_encoder.load_state_dict(theirs.prompt_encoder.state_dict())
    ids, mask, labels = _batch()
    with torch.no_grad():
        assert rel_err(ours(input_ids=ids, attention_mask=mask, labels=labels).logits,
                       theirs(input_ids=ids, attention_mask=mask, labels=labels).logits) <= TOL
