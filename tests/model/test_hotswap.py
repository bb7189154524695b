"""fastpeft.hotswap_adapter: new adapter values in place, PEFT's numbers, no recompilation, clear errors."""
import copy

import peft
import pytest
import torch
import torch._dynamo as dynamo

import fastpeft
from helpers import assert_same_snapshot, random_ids, rel_err, set_settings, state_snapshot, tiny_model

FP32_TOL = 1e-5
TARGETS = ["q_proj", "v_proj", "down_proj"]


def _saved(tmp_path, name, base, cfg, seed):
    """A PEFT-saved adapter with random (non-zero) weights: the folder and the PeftModel."""
    torch.manual_seed(seed)
    model = peft.get_peft_model(copy.deepcopy(base), copy.deepcopy(cfg))
    with torch.no_grad():
        for n, p in model.named_parameters():
            if p.requires_grad and "magnitude" in n:
                p.mul_(1 + 0.2 * torch.rand_like(p))
    folder = tmp_path / name
    model.save_pretrained(str(folder))
    return str(folder), model.eval()


class _Counting:
    def __init__(self):
        self.graphs = 0

    def __call__(self, gm, example_inputs):
        self.graphs += 1
        return dynamo.lookup_backend("aot_eager")(gm, example_inputs)


@pytest.mark.parametrize("kind", ["lora", "dora", "ia3"])
def test_hotswap_gives_the_new_adapters_numbers_without_recompiling(tmp_path, kind, monkeypatch):
    set_settings(monkeypatch, backend="reference")
    base = tiny_model("llama", seed=1)
    if kind == "ia3":
        first = second = peft.IA3Config(target_modules=["k_proj", "down_proj"], feedforward_modules=["down_proj"],
                                        init_ia3_weights=False)
    else:  # the second adapter: smaller rank, another alpha, rsLoRA -- another scaling, folded into B
        first = peft.LoraConfig(r=8, lora_alpha=16, target_modules=TARGETS, init_lora_weights=False,
                                use_dora=kind == "dora")
        second = peft.LoraConfig(r=4, lora_alpha=5, use_rslora=True, target_modules=TARGETS, init_lora_weights=False,
                                 use_dora=kind == "dora")
    dir_a, _ = _saved(tmp_path, "a", base, first, seed=2)
    dir_b, peft_b = _saved(tmp_path, "b", base, second, seed=3)
    model = fastpeft.load_adapter(copy.deepcopy(base), dir_a).eval()
    ids = random_ids(seed=4)
    backend = _Counting()
    dynamo.reset()
    try:
        model.forward = torch.compile(model.forward, backend=backend)
        with torch.no_grad():
            before = model(input_ids=ids).logits
            graphs = backend.graphs
            fastpeft.hotswap_adapter(model, dir_b)
            after = model(input_ids=ids).logits
            want = peft_b(input_ids=ids).logits
    finally:
        dynamo.reset()
    assert graphs >= 1 and backend.graphs == graphs  # no recompilation
    assert rel_err(after, want) <= FP32_TOL and rel_err(before, want) > 1e-3
    # saved again, PEFT loads the same adapter (r / alpha of the first config, B rescaled, zero padding)
    fastpeft.save_adapter(model, str(tmp_path / "again"))
    reloaded = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "again")).eval()
    with torch.no_grad():
        assert rel_err(reloaded(input_ids=ids).logits, want) <= FP32_TOL


def test_hotswap_refusals_leave_the_model_unchanged(tmp_path, monkeypatch):
    set_settings(monkeypatch, backend="reference")
    base = tiny_model("llama", seed=5)
    lora = lambda **kw: peft.LoraConfig(**{"r": 4, "target_modules": TARGETS, "init_lora_weights": False, **kw})  # noqa: E731
    dir_a, _ = _saved(tmp_path, "a", base, lora(), seed=6)
    model = fastpeft.load_adapter(copy.deepcopy(base), dir_a)
    cases = [
        (lora(r=8), "rank 8 > the loaded adapter's rank 4"),
        (lora(target_modules=["q_proj", "v_proj"]), "no .*down_proj.*the two adapters must target the same layers"),
        (lora(target_modules=TARGETS + ["k_proj"]), "has no place for"),
        (lora(use_dora=True), "use_dora=True"),
        (peft.IA3Config(target_modules=["k_proj"], feedforward_modules=[]), "IA3 adapter into 'default', a LORA"),
    ]
    for i, (cfg, match) in enumerate(cases):
        folder, _ = _saved(tmp_path, f"bad{i}", base, cfg, seed=7)
        before = state_snapshot(model)
        with pytest.raises(ValueError, match=match):
            fastpeft.hotswap_adapter(model, folder)
        assert_same_snapshot(before, state_snapshot(model))
    with pytest.raises(ValueError, match="no adapter 'other' to swap into"):
        fastpeft.hotswap_adapter(model, dir_a, adapter_name="other")
