"""The package's layering: ops <- nn <- model level, no import loops, no package imports hidden in functions,
the whole package importable module by module in a fresh interpreter, and nothing heavy pulled in at import."""
import ast
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PKG = os.path.join(ROOT, "fastpeft")

# Lower layers never import higher ones; within a layer, imports must not form a cycle.
LAYERS = [
    ["fastpeft.settings", "fastpeft.config", "fastpeft.distributed"],
    ["fastpeft.ops", "fastpeft.ops.dropout", "fastpeft.ops.nf4_format", "fastpeft.ops.reference", "fastpeft.ops.csrc",
     "fastpeft.ops.cpp_ops", "fastpeft.ops.linear_cross_entropy", "fastpeft.ops.token_rows", "fastpeft.ops.oft"],
    ["fastpeft.ops.kernels", "fastpeft.ops.kernels.common", "fastpeft.ops.kernels.nf4_dequant",
     "fastpeft.ops.kernels.lora", "fastpeft.ops.kernels.ia3", "fastpeft.ops.kernels.nf4_matmul",
     "fastpeft.ops.kernels.nf4_gemv", "fastpeft.ops.kernels.nf4_lora", "fastpeft.ops.kernels.dora", "fastpeft.ops.kernels.custom_ops",
     "fastpeft.ops.kernels.sgmv",
     "fastpeft.ops.nf4_quantize", "fastpeft.ops.lora_init"],
    ["fastpeft.nn._rng", "fastpeft.nn.bases", "fastpeft.nn.mixed_batch", "fastpeft.nn.layer", "fastpeft.nn.variants", "fastpeft.nn.lora", "fastpeft.nn.projection_groups", "fastpeft.nn.lora_embedding", "fastpeft.nn.ia3", "fastpeft.nn.vera", "fastpeft.nn.lycoris", "fastpeft.nn.loha", "fastpeft.nn.lokr", "fastpeft.nn.oft", "fastpeft.nn.adalora",
     "fastpeft.nn.modules_to_save", "fastpeft.nn.prompt_encoders", "fastpeft.nn.trainable_tokens", "fastpeft.nn"],
    ["fastpeft.model_state", "fastpeft.targets", "fastpeft.token_targets", "fastpeft.mixed_batches", "fastpeft.peft_interop",
     "fastpeft.prompt_learning", "fastpeft.adalora", "fastpeft.patch", "fastpeft.adapters",
     "fastpeft.adapter_io", "fastpeft.quantize", "fastpeft.fused_loss",
     "fastpeft.activation_offload"],
    ["fastpeft"],
]
TOOLS = "fastpeft.bench"  # the benchmark harness sits on top of everything


def _modules():
    found = {}
    for dirpath, _, files in os.walk(PKG):
        for f in files:
            if f.endswith(".py"):
                rel = os.path.relpath(os.path.join(dirpath, f), ROOT)[:-3].replace(os.sep, ".")
                found[rel[: -len(".__init__")] if rel.endswith(".__init__") else rel] = os.path.join(dirpath, f)
    return found


def _layer_of(name):
    if name == TOOLS or name.startswith(TOOLS + "."):
        return len(LAYERS)
    for i, layer in enumerate(LAYERS):
        if name in layer:
            return i
    return None


def _imports(name, path):
    """(target module, line, inside a function) for every fastpeft import of the module at ``path``."""
    is_pkg = path.endswith("__init__.py")
    tree = ast.parse(open(path).read())
    out = []

    def visit(node, in_function):
        for child in ast.iter_child_nodes(node):
            nested = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            if isinstance(child, ast.ImportFrom):
                if child.level:
                    base = name.split(".") if is_pkg else name.split(".")[:-1]
                    base = base[: len(base) - (child.level - 1)]
                    mod = ".".join(base + ([child.module] if child.module else []))
                else:
                    mod = child.module or ""
                if mod == "fastpeft" or mod.startswith("fastpeft."):
                    targets = [f"{mod}.{a.name}" for a in child.names]
                    for t in targets:  # "from . import settings" names a module; "from .x import y" names x
                        out.append((t if _layer_of(t) is not None or t in MODULES else mod, child.lineno, nested))
            elif isinstance(child, ast.Import):
                for a in child.names:
                    if a.name == "fastpeft" or a.name.startswith("fastpeft."):
                        out.append((a.name, child.lineno, nested))
            visit(child, nested)

    visit(tree, False)
    return out


MODULES = _modules()


def test_every_module_has_a_layer():
    missing = sorted(m for m in MODULES if _layer_of(m) is None)
    assert not missing, f"add these modules to LAYERS in {__file__}: {missing}"


def test_no_upward_imports_and_no_imports_inside_functions():
    problems = []
    for name, path in MODULES.items():
        own = _layer_of(name)
        for target, line, in_function in _imports(name, path):
            if in_function:
                problems.append(f"{name}:{line} imports {target} inside a function")
            layer = _layer_of(target)
            if layer is not None and layer > own:
                problems.append(f"{name}:{line} imports {target} from a higher layer")
    assert not problems, "\n".join(problems)


def test_no_import_cycles():
    graph = {name: {t for t, _, f in _imports(name, path) if not f and t in MODULES and t != name}
             for name, path in MODULES.items()}
    graph["fastpeft"] = set()  # the package root imports everything; python imports it first anyway
    for g in graph.values():
        g.discard("fastpeft")
    state = {}

    def walk(node, stack):
        state[node] = "open"
        for nxt in graph[node]:
            if state.get(nxt) == "open":
                pytest.fail("import cycle: " + " -> ".join(stack[stack.index(nxt):] + [nxt]))
            if nxt not in state:
                walk(nxt, stack + [nxt])
        state[node] = "done"

    for node in graph:
        if node not in state:
            walk(node, [node])


def test_modules_import_in_layer_order_in_a_fresh_interpreter():
    """Each module imports on its own, bottom layer first (a loop or a missing import shows up here), and
    ``import fastpeft`` does not pull in torch._dynamo (0.8-1.8 s) or setuptools."""
    order = [m for layer in LAYERS for m in layer]
    code = (
        "import importlib, sys\n"
        f"for name in {order!r}:\n"
        "    importlib.import_module(name)\n"
        "assert 'torch._dynamo' not in sys.modules, 'import fastpeft pulled in torch._dynamo'\n"
        "assert 'setuptools' not in sys.modules, 'import fastpeft pulled in setuptools'\n"
        "print('ok')\n"
    )
    env = {**os.environ, "PYTHONPATH": ROOT}
    run = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, cwd=ROOT)
    assert run.returncode == 0 and run.stdout.strip() == "ok", run.stderr[-3000:]
