"""``torch.save(model)`` of a whole patched model (pickle, as transformers users do for checkpoints of the full
object) and ``torch.load(..., weights_only=False)``: every hook ``patch`` installs must pickle, and the loaded copy
must compute what the original computes, with its hooks bound to itself, not to the original."""
import gc
import io
import weakref

import pytest
import torch

import fastpeft
from fastpeft import model_state
from helpers import random_ids, tiny_model

CONFIGS = {
    "lora": lambda: fastpeft.LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False),
    "ia3": lambda: fastpeft.IA3Config(target_modules=["q_proj", "down_proj"], feedforward_modules=["down_proj"]),
    "prompt_tuning": lambda: fastpeft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3),
    "prefix_tuning": lambda: fastpeft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3),
}


def _round_trip(model):
    buf = io.BytesIO()
    torch.save(model, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=False)


@pytest.mark.parametrize("kind", sorted(CONFIGS))
def test_whole_patched_model_pickles_and_computes_the_same(kind):
    model = fastpeft.patch(tiny_model("llama", seed=1), CONFIGS[kind]()).eval()
    ids = random_ids(batch=2, seq=6)
    loaded = _round_trip(model)
    assert model_state.get_state(loaded) is not model_state.get_state(model)
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, model(input_ids=ids).logits, rtol=0, atol=0)


def test_loaded_hooks_serve_the_loaded_model():
    """What patch installs holds the model weakly; after a load it must point at the loaded model and keep working
    once the original is gone: the input-grad hook, the routed generate (adapter_names=), the mixed-batch hooks
    of forward; unpatch of the loaded model restores plain layers."""
    model = fastpeft.patch(tiny_model("llama", seed=2), fastpeft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"],
                                                                            init_lora_weights=False)).eval()
    ids = random_ids(batch=2, seq=7)
    with torch.no_grad():
        expected = model.generate(ids, adapter_names=["default", "__base__"], max_new_tokens=4, do_sample=False)
    loaded = _round_trip(model)
    del model
    gc.collect()
    embeddings = loaded.get_input_embeddings()
    grad_hooks = [h for h in embeddings._forward_hooks.values() if type(h).__name__ == "_InputGradHook"]
    assert len(grad_hooks) == 1 and grad_hooks[0]._root() is loaded
    assert loaded.__dict__["generate"]._model() is loaded
    with torch.no_grad():
        got = loaded.generate(ids, adapter_names=["default", "__base__"], max_new_tokens=4, do_sample=False)
        mixed = loaded(input_ids=ids, adapter_names=["default", "__base__"]).logits
        adapted = loaded(input_ids=ids).logits
        with fastpeft.disable_adapter(loaded):
            base = loaded(input_ids=ids).logits
    assert torch.equal(got, expected)
    torch.testing.assert_close(mixed[0], adapted[0])
    torch.testing.assert_close(mixed[1], base[1])
    assert not torch.allclose(adapted[1], base[1])
    fastpeft.unpatch(loaded)
    assert not any(isinstance(m, fastpeft.LoraLinear) for m in loaded.modules())
    assert "generate" not in loaded.__dict__


@pytest.mark.parametrize("kind", sorted(CONFIGS))
def test_deleting_a_patched_model_frees_it_without_a_collection(kind):
    """Nothing patch installs holds the model strongly from inside it (the embeddings' hook, the routed generate,
    prompt learning's routing): a deleted model is freed at once, not when the cycle collector next runs (its GPU
    memory with it). The unpatched model frees the same way."""
    model = fastpeft.patch(tiny_model("llama", seed=3), CONFIGS[kind]())
    ref = weakref.ref(model)
    gc.collect()
    gc.disable()
    try:
        del model
        assert ref() is None
    finally:
        gc.enable()
