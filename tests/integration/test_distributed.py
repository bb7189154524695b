"""fastpeft under PyTorch's distributed engines on CPU: 2 processes, gloo, DDP and FSDP2 (fully_shard); LoRA,
DoRA and IA3, dense and 4-bit bases.

Every check compares against one process on the global batch (dropout 0): same adapter gradients, two steps.
The workers run in spawned processes (torch.multiprocessing, init_method file:// in tmp_path); an assertion
in a worker fails the test with the worker's traceback.
"""
import copy
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import fastpeft
from helpers import nf4_tiny_model, random_ids, rel_err, tiny_model

WORLD = 2
TOL = 1e-5


# ------------------------------------------------------------------------------------------ helpers
def _spawn(tmp_path, scenario):
    # TRITON_INTERPRET (set by conftest) reaches the workers through the environment; each worker sets the backend
    # through fastpeft.settings (read once at import, so os.environ would not reach a running process)
    mp.spawn(_entry, args=(WORLD, str(tmp_path), scenario), nprocs=WORLD, join=True)


def _entry(rank, world, tmp, scenario):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{tmp}/pg-init", rank=rank, world_size=world)
    try:
        SCENARIOS[scenario](rank, world, tmp)
        # every rank done before any tears the group down: a rank whose peer closed its gloo connections while it
        # still finished the last collective aborted once ("terminate called without an active exception")
        dist.barrier()
    finally:
        dist.destroy_process_group()


def _use_backend(backend):
    """Each layer takes the backend current when it is built (a worker process: set it for the rest of it)."""
    fastpeft.settings.reload({**os.environ, "FASTPEFT_BACKEND": backend})


def _cfg(kind, targets=None, dropout=0.0):
    if kind in ("lora", "dora"):
        return fastpeft.LoraConfig(r=4, lora_alpha=8, lora_dropout=dropout, target_modules=targets or "all-linear",
                                   init_lora_weights=False, use_dora=kind == "dora")
    return fastpeft.IA3Config(target_modules=targets or ["k_proj", "v_proj", "down_proj"],
                              feedforward_modules=["down_proj"], init_ia3_weights=False)


def _build(kind, backend, targets=None, nf4=False, seed=0):
    _use_backend(backend)
    base = nf4_tiny_model("llama", seed=2) if nf4 else tiny_model("llama", seed=2)
    torch.manual_seed(seed)
    return fastpeft.patch(base, _cfg(kind, targets))


def _step(model, ids, opt):
    """One training step; returns the loss. Gradients are left in .grad for the caller."""
    model.train()
    opt.zero_grad(set_to_none=True)
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    return loss.detach()


def _grads(model):
    from fastpeft.distributed import full_tensor

    return {n: full_tensor(p.grad).detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def _compare(got, expected, what):
    assert got.keys() == expected.keys() and got, what
    for name, grad in got.items():
        err = rel_err(grad, expected[name])
        assert err <= TOL, f"{what}: {name} rel err {err:.2e}"


def _train_and_compare(model, ref, rank, world, what, steps=2):
    """``model`` (wrapped) trains on this rank's half of the global batch, ``ref`` (one process) on all of it."""
    ids = random_ids(batch=2 * world, seq=9, seed=4)
    local = ids[rank * 2:(rank + 1) * 2]
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    ref_opt = torch.optim.SGD([p for p in ref.parameters() if p.requires_grad], lr=0.5)
    for step in range(steps):
        _step(model, local, opt)
        _step(ref, ids, ref_opt)
        _compare(_grads(_unwrap(model)), _grads(ref), f"{what} step {step}")
        opt.step()
        ref_opt.step()
    return ids


def _unwrap(model):
    return model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model


# ------------------------------------------------------------------------------------------ DDP
def _ddp(rank, world, tmp):
    from torch.nn.parallel import DistributedDataParallel as DDP

    # kernel path (Triton, interpreted on CPU) on a few layers, reference path on all; dense and NF4 bases; the C++
    # operators (the default path on CUDA; their CPU kernels here) for LoRA and DoRA on all layers, dense and NF4
    cases = [("lora", "triton", ["q_proj", "v_proj", "down_proj"], False), ("ia3", "reference", None, False),
             ("lora", "reference", None, True), ("ia3", "reference", None, True),
             ("dora", "triton", ["q_proj", "v_proj", "down_proj"], False), ("dora", "reference", None, True),
             ("lora", "cpp", None, False), ("dora", "cpp", None, False), ("lora", "cpp", None, True),
             ("dora", "cpp", None, True)]
    for kind, backend, targets, nf4 in cases:
        ref = _build(kind, backend, targets, nf4=nf4)
        model = DDP(copy.deepcopy(ref))
        _train_and_compare(model, ref, rank, world, f"DDP {kind}/{backend}{'/nf4' if nf4 else ''}")

    # The fused loss under DDP, its head trained through modules_to_save (the any-module path: gradients
    # delivered by the loss's own backward): the same gradients as one process with the unfused loss.
    _use_backend("reference")
    torch.manual_seed(0)
    ref = fastpeft.patch(tiny_model("llama", seed=2), fastpeft.LoraConfig(
        r=4, target_modules=["q_proj"], modules_to_save=["lm_head"], init_lora_weights=False))
    fused = fastpeft.enable_fused_loss(copy.deepcopy(ref), backend="fastpeft", chunk_rows=5)
    _train_and_compare(DDP(fused), ref, rank, world, "DDP fused loss")

    # Dropout: all ranks seeded alike. Kernel path: the rank is folded into the seed -> different masks per
    # rank. Reference path (nn.Dropout, as PEFT): the masks follow torch's RNG, identical here.
    x = torch.randn(3, 5, 48, generator=torch.Generator().manual_seed(0))
    for backend, differ in (("triton", True), ("reference", False)):
        _use_backend(backend)
        torch.manual_seed(0)
        layer = fastpeft.LoraLinear(torch.nn.Linear(48, 40), "default", r=4, lora_alpha=8, lora_dropout=0.5,
                                    init_lora_weights=False).train()
        torch.manual_seed(123)  # the same seed on every rank
        with torch.no_grad():
            y = layer(x)
        outs = [torch.empty_like(y) for _ in range(world)]
        dist.all_gather(outs, y)
        assert torch.equal(outs[rank], y)
        assert (not torch.equal(outs[0], outs[1])) == differ, backend


# ------------------------------------------------------------------------------------------ FSDP2
def _fsdp_wrap(model, world, quant_storage="auto"):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from fastpeft.distributed import prepare_fsdp2

    mesh = init_device_mesh("cpu", (world,))
    prepare_fsdp2(model, quant_storage=quant_storage)
    for layer in model.model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def _fsdp(rank, world, tmp):
    from fastpeft.distributed import is_sharded

    cases = [("lora", "reference", None), ("ia3", "triton", None), ("dora", "reference", None),
             ("dora", "triton", ["q_proj", "down_proj"]), ("lora", "cpp", None), ("dora", "cpp", None)]
    for kind, backend, targets in cases:
        ref = _build(kind, backend, targets)
        model = _fsdp_wrap(copy.deepcopy(ref), world)
        assert all(is_sharded(p) for p in model.parameters())
        _train_and_compare(model, ref, rank, world, f"FSDP2 {kind}/{backend}")
    _fsdp_nf4(rank, world, tmp)
    _fsdp_save_load(rank, world, tmp)


def _nf4_gather_watch(model, world, storage=torch.uint8):
    """Hooks asserting that, whenever an adapted 4-bit layer runs (forward or backward), the only 4-bit
    weights held unsharded are those of its own decoder layer."""
    from fastpeft.distributed import is_sharded

    layers = list(model.model.layers)
    owner = {}
    for i, block in enumerate(layers):
        for m in block.modules():
            if type(m).__name__ == "Linear4bit":
                owner[m] = i
    assert owner
    seen = []

    def check(module, *_):
        mine = owner[module.base_layer]
        gathered = {owner[m] for m in owner if not is_sharded(m.weight)}
        assert gathered == {mine}, f"4-bit weights of decoder layers {sorted(gathered)} gathered while layer {mine} runs"
        seen.append(mine)

    for m in model.modules():
        if isinstance(m, (fastpeft.LoraLinear, fastpeft.IA3Linear)) and m.base_layer in owner:
            m.register_forward_pre_hook(check)
            m.register_full_backward_pre_hook(check)
    # between steps, every 4-bit weight is sharded: each rank holds half of the packed bytes
    for m in owner:
        assert is_sharded(m.weight) and m.weight.dtype == storage
        assert m.weight.to_local().numel() * world == m.weight.numel()
    return seen


def _count_nf4_operator_calls():
    """Counts calls of the C++ 4-bit operators from now on (patched for the rest of this process's scenario)."""
    from fastpeft.ops import cpp_ops

    calls = {"n": 0}
    for op in ("nf4_lora_linear", "nf4_dora_linear"):
        real = getattr(cpp_ops, op)
        real = getattr(real, "_fastpeft_real", real)

        def counted(*a, _real=real, **k):
            calls["n"] += 1
            return _real(*a, **k)

        counted._fastpeft_real = real
        setattr(cpp_ops, op, counted)
    return calls


def _fsdp_nf4(rank, world, tmp):
    # reference path (dequantize + matmul), the QLoRA kernels (interpreted on CPU) on a few layers and the C++ 4-bit
    # operators (their CPU build: the default path on CUDA) on all layers
    # storage bf16: the bytes viewed as bf16, as prepare_fsdp2 does on torch < 2.13 (FSDP2 there cannot hold
    # an integer parameter); same gradients, and the bytes survive sharding + gathering unchanged
    for kind, backend, targets, storage in (("lora", "reference", None, torch.uint8),
                                            ("ia3", "reference", None, torch.uint8),
                                            ("lora", "triton", ["q_proj", "down_proj"], torch.uint8),
                                            ("lora", "triton", ["q_proj", "down_proj"], torch.bfloat16),
                                            ("dora", "triton", ["q_proj", "down_proj"], torch.uint8),
                                            ("lora", "cpp", None, torch.uint8), ("lora", "cpp", None, torch.bfloat16),
                                            ("dora", "cpp", None, torch.uint8)):
        ref = _build(kind, backend, targets, nf4=True)
        model = _fsdp_wrap(copy.deepcopy(ref), world, quant_storage=storage)
        seen = _nf4_gather_watch(model, world, storage)
        calls = _count_nf4_operator_calls()
        _train_and_compare(model, ref, rank, world, f"FSDP2 NF4 {kind}/{backend}")
        assert set(seen) == {0, 1}
        assert (calls["n"] > 0) == (backend == "cpp"), (kind, backend, calls)  # the gathered bytes reach the operator


# ------------------------------------------------------------------------------------------ save / load
def _fsdp_save_load(rank, world, tmp):
    from safetensors.torch import load_file

    from fastpeft.distributed import full_tensor, is_sharded

    ref = _build("lora", "reference")
    model = _fsdp_wrap(copy.deepcopy(ref), world)
    ids = _train_and_compare(model, ref, rank, world, "FSDP2 lora (save)", steps=1)
    sharded_dir, plain_dir = os.path.join(tmp, "sharded"), os.path.join(tmp, "plain")
    fastpeft.save_adapter(model, sharded_dir)  # every rank: gathers, rank 0 writes, all return after the write
    assert os.path.isfile(os.path.join(sharded_dir, "adapter_model.safetensors"))  # visible to every rank
    assert not [f for f in os.listdir(sharded_dir) if f.startswith(".tmp")]
    if rank == 0:
        fastpeft.save_adapter(ref, plain_dir)  # one process, same weights: the file must match
    dist.barrier()
    got, want = load_file(os.path.join(sharded_dir, "adapter_model.safetensors")), load_file(
        os.path.join(plain_dir, "adapter_model.safetensors"))
    assert got.keys() == want.keys() and any("lora_A" in k for k in got)
    for key in got:
        assert got[key].shape == want[key].shape and rel_err(got[key], want[key]) <= TOL, key

    with torch.no_grad():
        expected = ref(input_ids=ids, labels=ids).loss
    # load after sharding: patched with another init, sharded, then the saved values copied into the shards
    after = _build("lora", "reference", seed=99)
    after = _fsdp_wrap(after, world)
    with torch.no_grad():
        before_loss = after(input_ids=ids, labels=ids).loss
    assert rel_err(before_loss, expected) > 1e-4  # different adapter before the load
    fastpeft.load_adapter(after, sharded_dir, is_trainable=True)
    params = dict(after.named_parameters())
    for key, value in got.items():
        name = key[len("base_model.model."):].replace(".weight", ".default.weight")
        assert is_sharded(params[name]) and params[name].requires_grad
        assert torch.equal(full_tensor(params[name].detach()), value), name
    with torch.no_grad():
        assert rel_err(after(input_ids=ids, labels=ids).loss, expected) <= TOL
    # load before sharding: into a plain base, then shard
    before = fastpeft.load_adapter(tiny_model("llama", seed=2), sharded_dir, is_trainable=True)
    before = _fsdp_wrap(before, world)
    with torch.no_grad():
        assert rel_err(before(input_ids=ids, labels=ids).loss, expected) <= TOL
    # and it trains under FSDP2 like one process does
    ref2 = fastpeft.load_adapter(tiny_model("llama", seed=2), sharded_dir, is_trainable=True)
    _train_and_compare(before, ref2, rank, world, "FSDP2 lora after load", steps=1)


# ------------------------------------------------------------------------------------------ the other methods
def _method_cfg(kind):
    targets = ["q_proj", "v_proj", "down_proj"]
    return {"vera": lambda: fastpeft.VeraConfig(r=8, target_modules=targets, init_weights=False),
            "loha": lambda: fastpeft.LoHaConfig(r=4, alpha=8, target_modules=targets, init_weights=False),
            "lokr": lambda: fastpeft.LoKrConfig(r=4, alpha=8, target_modules=targets, init_weights=False),
            "oft": lambda: fastpeft.OFTConfig(oft_block_size=8, target_modules=targets, init_weights=False),
            "adalora": lambda: fastpeft.AdaLoraConfig(init_r=4, lora_alpha=0.5, target_modules=targets, total_step=10,
                                                      init_lora_weights=False, task_type="CAUSAL_LM")}[kind]()


def _methods(rank, world, tmp):
    """VeRA, LoHa, LoKr, OFT and AdaLoRA (with its orthogonality regulariser in the loss) under DDP and FSDP2: the
    same gradients as one process on the whole batch."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    for kind in ("vera", "loha", "lokr", "oft", "adalora"):
        for backend in ("reference", "triton"):
            _use_backend(backend)
            torch.manual_seed(0)
            ref = fastpeft.patch(tiny_model("llama", seed=2), _method_cfg(kind))
            _train_and_compare(DDP(copy.deepcopy(ref)), ref, rank, world, f"DDP {kind}/{backend}")
            if backend == "reference":
                _train_and_compare(_fsdp_wrap(copy.deepcopy(ref), world), ref, rank, world, f"FSDP2 {kind}")


SCENARIOS = {"ddp": _ddp, "fsdp2": _fsdp, "methods": _methods}  # one spawn each: starting 2 processes costs seconds


# ------------------------------------------------------------------------------------------ tests
@pytest.mark.skipif(not dist.is_available(), reason="torch built without torch.distributed")
@pytest.mark.parametrize("scenario", list(SCENARIOS))
def test_two_process_gloo(tmp_path, scenario):
    _spawn(tmp_path, scenario)


def test_prepare_fsdp2_storage_views_keep_bytes_and_outputs():
    """prepare_fsdp2's quant_storage re-views the packed bytes (no copy of values): the model computes the same,
    and a storage FSDP2 cannot use safely is refused with the allowed values."""
    from fastpeft.distributed import prepare_fsdp2

    model = fastpeft.patch(nf4_tiny_model("llama", seed=2), _cfg("lora", ["q_proj", "down_proj"]))
    ids = random_ids(batch=2, seq=5, seed=1)
    with torch.no_grad():
        before = model(input_ids=ids).logits
    q = model.model.layers[0].self_attn.q_proj.base_layer
    raw = q.weight.data.reshape(-1).view(torch.uint8).clone()
    prepare_fsdp2(model, quant_storage=torch.bfloat16)
    assert q.weight.dtype == torch.bfloat16 and type(q.weight).__name__ == "Params4bit"
    assert torch.equal(q.weight.data.reshape(-1).view(torch.uint8), raw)
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, before)
    prepare_fsdp2(model, quant_storage=torch.uint8)  # and back
    assert q.weight.dtype == torch.uint8 and torch.equal(q.weight.data.reshape(-1), raw)
    with pytest.raises(ValueError, match="quant_storage must be"):
        prepare_fsdp2(model, quant_storage=torch.int32)
