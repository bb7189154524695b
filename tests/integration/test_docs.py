"""The documentation says only what the repository holds: README.md and docs/*.md (and csrc/README.md,
benchmarks/README.md) are checked for

* python examples that use a name they never define or import (``load_adapter(base, ...)`` with no ``base``);
  a block whose first line is ``# (continues the block above)`` is checked together with the blocks before it;
* relative links (``[text](path)``) to files that do not exist;
* repository paths in backticks or in shell blocks (``fastpeft/...``, ``benchmarks/...``, ``tests/...``,
  ``examples/...``, ``csrc/...``, ``docs/...``) that do not exist;
* dotted names in backticks (``fastpeft.ops.cpp_ops``, ``fastpeft.settings.override``) that do not resolve;

and: the README example marked ``<!-- run by tests/integration/test_docs.py -->`` runs, the README's API table
names exactly ``fastpeft.__all__``, and docs/configuration.md carries fastpeft/settings.py's settings table.

The checkers take the text as an argument, so they can be pointed at an older README:
``python tests/integration/test_docs.py README.md=<file.md>`` prints what they find (see the end of this file).
"""
from __future__ import annotations

import ast
import builtins
import importlib
import itertools
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Dict, Iterator, List, Tuple

import pytest

ROOT = Path(__file__).resolve().parents[2]
PATH_PREFIXES = ("fastpeft/", "benchmarks/", "tests/", "examples/", "csrc/", "docs/")
CONTINUES = "# (continues the block above)"
RUN_MARKER = "<!-- run by tests/integration/test_docs.py -->"
BUILTINS = frozenset(dir(builtins)) | {"__name__", "__file__"}


def doc_files() -> List[Path]:
    """README.md and docs/*.md, plus the folder READMEs that point into the code (csrc/, benchmarks/)."""
    extra = [ROOT / "csrc" / "README.md", ROOT / "benchmarks" / "README.md"]
    return [ROOT / "README.md"] + sorted((ROOT / "docs").glob("*.md")) + [p for p in extra if p.exists()]


def _rel(path: Path) -> str:
    try:
        return str(path.relative_to(ROOT))
    except ValueError:
        return str(path)


# ------------------------------------------------------------------------------------------- markdown parsing
_FENCE = re.compile(r"^(\s*)```\s*([\w+-]*)\s*$")


def fenced_blocks(text: str) -> List[Tuple[str, int, str, str]]:
    """(language, first line number, code, the line before the opening fence) of every fenced block."""
    blocks, lines, i = [], text.splitlines(), 0
    while i < len(lines):
        m = _FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        indent, lang, start = len(m.group(1)), m.group(2).lower(), i
        body: List[str] = []
        i += 1
        while i < len(lines) and not re.match(r"^\s*```\s*$", lines[i]):
            body.append(lines[i][indent:] if lines[i][:indent].strip() == "" else lines[i])
            i += 1
        before = next((lines[j] for j in range(start - 1, -1, -1) if lines[j].strip()), "")
        blocks.append((lang, start + 2, "\n".join(body), before.strip()))
        i += 1
    return blocks


def prose(text: str) -> str:
    """The text without its fenced blocks (each replaced by an empty line, so line numbers stay)."""
    out, inside = [], False
    for line in text.splitlines():
        if _FENCE.match(line) or (inside and re.match(r"^\s*```\s*$", line)):
            inside = not inside
            out.append("")
        else:
            out.append("" if inside else line)
    return "\n".join(out)


def code_spans(text: str) -> Iterator[Tuple[int, str]]:
    """(line number, content) of every inline code span outside fenced blocks."""
    for n, line in enumerate(prose(text).splitlines(), 1):
        for m in re.finditer(r"(`+)(.+?)\1", line):
            yield n, m.group(2).strip()


# ------------------------------------------------------------------------------------------- python blocks
def _bound_names(tree: ast.AST) -> set:
    """Every name that some statement of ``tree`` binds (assignments, imports, defs, arguments, loops, with,
    except, comprehensions, walrus, match captures, global / nonlocal)."""
    bound = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Name) and isinstance(node.ctx, (ast.Store, ast.Del)):
            bound.add(node.id)
        elif isinstance(node, ast.arg):
            bound.add(node.arg)
        elif isinstance(node, ast.alias):
            bound.add(node.asname or node.name.split(".")[0])
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            bound.add(node.name)
        elif isinstance(node, ast.ExceptHandler) and node.name:
            bound.add(node.name)
        elif isinstance(node, (ast.Global, ast.Nonlocal)):
            bound.update(node.names)
        elif isinstance(node, (ast.MatchAs, ast.MatchStar)) and node.name:
            bound.add(node.name)
        elif isinstance(node, ast.MatchMapping) and node.rest:
            bound.add(node.rest)
    return bound


def _loads(node: ast.AST, in_function: bool = False) -> Iterator[Tuple[ast.Name, bool]]:
    """(Name node loaded, whether it sits inside a function / lambda body, i.e. is looked up late)."""
    if isinstance(node, ast.Name) and isinstance(node.ctx, ast.Load):
        yield node, in_function
    for child in ast.iter_child_nodes(node):
        nested = in_function or isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
        yield from _loads(child, nested)


def undefined_names(code: str) -> List[Tuple[int, str]]:
    """(line, name) of every name the code loads before any statement binds it (builtins allowed).

    Top-level statements are taken in order: a name must be bound by an earlier statement or by the statement
    itself (``for x in xs: f(x)``), except that an assignment's own targets do not count for its value
    (``model = f(model)`` needs an earlier ``model``); inside function and lambda bodies a binding anywhere in the
    block counts."""
    tree = ast.parse(code)
    everywhere = _bound_names(tree) | BUILTINS
    so_far = set(BUILTINS)
    missing = []
    for stmt in tree.body:
        if isinstance(stmt, (ast.Assign, ast.AugAssign, ast.AnnAssign)):
            here = so_far | (_bound_names(stmt.value) if stmt.value is not None else set())
        else:
            here = so_far | _bound_names(stmt)
        for name, late in _loads(stmt):
            if name.id not in (everywhere if late else here):
                missing.append((name.lineno, name.id))
        so_far |= _bound_names(stmt)
    return missing


def python_programs(path: Path, text: str) -> List[Tuple[str, List[Tuple[int, str]]]]:
    """(label, [(first line, code), ...]) per python block, continuation blocks joined to the ones above."""
    programs: List[Tuple[str, List[Tuple[int, str]]]] = []
    for lang, line, code, _ in fenced_blocks(text):
        if lang not in ("python", "py"):
            continue
        first = next((s.strip() for s in code.splitlines() if s.strip()), "")
        if first == CONTINUES and programs:
            programs[-1][1].append((line, code))
        else:
            programs.append((f"{_rel(path)}:{line}", [(line, code)]))
    return programs


def _doc_line(parts: List[Tuple[int, str]], lineno: int) -> int:
    """Line in the markdown file of line ``lineno`` of the joined program."""
    offset = 0
    for start, code in parts:
        n = code.count("\n") + 1
        if lineno <= offset + n:
            return start + lineno - offset - 1
        offset += n
    return parts[-1][0]


def python_block_problems(path: Path, text: str) -> List[str]:
    problems = []
    for label, parts in python_programs(path, text):
        try:
            missing = undefined_names("\n".join(code for _, code in parts))
        except SyntaxError as err:
            problems.append(f"{label}: python block does not parse: {err}")
            continue
        for lineno, name in missing:
            problems.append(f"{_rel(path)}:{_doc_line(parts, lineno)}: python block uses {name!r}, "
                            "which it never defines or imports")
    return problems


# ------------------------------------------------------------------------------------------- links and paths
_LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")


def link_problems(path: Path, text: str) -> List[str]:
    problems = []
    body = prose(text)
    body = re.sub(r"(`+).+?\1", "", body)  # a [x](y) inside inline code is not a link
    for n, line in enumerate(body.splitlines(), 1):
        for m in _LINK.finditer(line):
            target = m.group(1)
            if re.match(r"^[a-z][a-z0-9+.-]*:", target, re.I) or target.startswith("#"):
                continue  # http(s):, mailto:, in-page anchors
            file_part = target.split("#", 1)[0]
            if not (path.parent / file_part).exists():
                problems.append(f"{_rel(path)}:{n}: link to {target!r}, which does not exist")
    return problems


def _expand_braces(token: str) -> List[str]:
    m = re.search(r"\{([^{}]*)\}", token)
    if not m:
        return [token]
    return list(itertools.chain.from_iterable(
        _expand_braces(token[:m.start()] + choice + token[m.end():]) for choice in m.group(1).split(",")))


def _repo_paths(fragment: str) -> List[str]:
    """Tokens of ``fragment`` that look like repository paths (placeholders such as <gpu> or * are skipped)."""
    out = []
    for token in re.split(r"[\s=\"'`(\[]+", fragment):
        token = token.rstrip(".,;:)]")
        if not token.startswith(PATH_PREFIXES) or re.search(r"[<>*$…]", token):
            continue
        out.extend(_expand_braces(token))
    return out


def path_problems(path: Path, text: str) -> List[str]:
    problems = []
    found: List[Tuple[int, str]] = [(n, p) for n, span in code_spans(text) for p in _repo_paths(span)]
    for lang, line, code, _ in fenced_blocks(text):
        if lang in ("bash", "sh", "shell", "console", ""):
            found += [(line + i, p) for i, row in enumerate(code.splitlines()) for p in _repo_paths(row)]
    for n, repo_path in found:
        if not (ROOT / repo_path).exists():
            problems.append(f"{_rel(path)}:{n}: `{repo_path}` does not exist in the repository")
    return problems


def _resolves(dotted: str) -> bool:
    parts = dotted.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:cut]))
        except ModuleNotFoundError as err:
            if err.name and err.name.split(".")[0] != "fastpeft":
                raise  # an optional dependency is missing here: cannot decide
            continue
        for attr in parts[cut:]:
            if not hasattr(obj, attr):
                return False
            obj = getattr(obj, attr)
        return True
    return False


def dotted_name_problems(path: Path, text: str) -> List[str]:
    problems = []
    for n, span in code_spans(text):
        m = re.match(r"(fastpeft(?:\.\w+)+)", span)
        if not m:
            continue
        try:
            ok = _resolves(m.group(1))
        except ImportError:
            continue
        if not ok:
            problems.append(f"{_rel(path)}:{n}: `{m.group(1)}` does not resolve to a module or attribute")
    return problems


CHECKS = {"python": python_block_problems, "links": link_problems, "paths": path_problems,
          "dotted": dotted_name_problems}


def all_problems(path: Path, text: str) -> Dict[str, List[str]]:
    return {name: check(path, text) for name, check in CHECKS.items()}


# ------------------------------------------------------------------------------------------- the tests
@pytest.fixture(scope="module")
def docs() -> List[Tuple[Path, str]]:
    files = doc_files()
    assert len(files) >= 2, "README.md and docs/*.md expected"
    return [(p, p.read_text(encoding="utf-8")) for p in files]


@pytest.mark.parametrize("check", sorted(CHECKS))
def test_docs(docs, check):
    problems = [p for path, text in docs for p in CHECKS[check](path, text)]
    assert problems == [], "\n".join(problems)


def test_checker_flags_undefined_names():
    assert undefined_names("import fastpeft\nmodel = fastpeft.load_adapter(base, 'out/')") == [(2, "base")]
    assert undefined_names("x = y\ny = 1") == [(1, "y")]
    assert undefined_names("model = fastpeft.patch(model)\nimport fastpeft") == [(1, "fastpeft"), (1, "model")]
    assert undefined_names("xs = [x for x in range(3)]\nn = 0\nn += len(xs)") == []
    assert undefined_names("def f():\n    return later\nlater = 1\nprint(f(), len([i for i in range(3)]))") == []
    text = "```python\nimport torch\n```\n\n```python\n# (continues the block above)\ntorch.ones(1)\n```\n"
    assert python_block_problems(ROOT / "x.md", text) == []
    assert python_block_problems(ROOT / "x.md", text.replace("# (continues the block above)\n", ""))


def test_readme_api_table_names_every_export():
    """Every name in ``fastpeft.__all__`` has its line in the README's API section, and nothing else is listed."""
    import fastpeft

    text = (ROOT / "README.md").read_text(encoding="utf-8")
    section = re.search(r"^## API.*?$(.*?)^## ", text, re.S | re.M)
    assert section, "README.md has no '## API' section"
    rows = [line for line in section.group(1).splitlines() if line.startswith("| `")]
    listed = {m.group(1) for row in rows for m in re.finditer(r"`(\w+)[`(]", row.split(" | ")[0])}
    assert listed == set(fastpeft.__all__), (sorted(set(fastpeft.__all__) - listed), sorted(listed - set(fastpeft.__all__)))


def test_configuration_table_is_the_settings_docstring():
    """docs/configuration.md carries fastpeft/settings.py's table verbatim (``x`` written as `x`)."""
    from fastpeft import settings

    expected = [re.sub(r"``([^`]+)``", r"`\1`", line) for line in settings.__doc__.splitlines() if line.startswith("|")]
    text = (ROOT / "docs" / "configuration.md").read_text(encoding="utf-8")
    table = re.search(r"<!-- settings table: from fastpeft/settings.py -->\n(.*?)\n<!-- end of settings table -->", text, re.S)
    assert table, "docs/configuration.md lost its settings-table markers"
    assert table.group(1).splitlines() == expected, "regenerate the table from fastpeft/settings.py's docstring"


def test_readme_example_runs(tmp_path):
    """The README block marked with RUN_MARKER runs as written (CPU: a tiny random model, nothing downloaded)."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    marked = [code for lang, _, code, before in fenced_blocks(text) if lang == "python" and before == RUN_MARKER]
    assert len(marked) == 1, f"README.md should mark its example with {RUN_MARKER}"
    script = tmp_path / "readme_example.py"
    script.write_text(marked[0])
    env = {k: v for k, v in os.environ.items() if not k.startswith(("FASTPEFT_", "TRITON_INTERPRET"))}
    run = subprocess.run([sys.executable, str(script)], cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]


if __name__ == "__main__":
    # python tests/integration/test_docs.py [REPO_PATH=]FILE.md ...: the checks on other files, e.g. an older README
    # read as if it were README.md (links resolve from REPO_PATH's folder):
    #   git show HEAD~1:README.md > /tmp/old.md && python tests/integration/test_docs.py README.md=/tmp/old.md
    sys.path.insert(0, str(ROOT))
    status = 0
    for arg in sys.argv[1:] or [str(p) for p in doc_files()]:
        as_path, _, file = arg.rpartition("=")
        text = Path(file).read_text(encoding="utf-8")
        where = (ROOT / as_path) if as_path else Path(file).resolve()
        for check, problems in all_problems(where, text).items():
            for problem in problems:
                status = 1
                print(f"[{check}] {problem}")
    sys.exit(status)
