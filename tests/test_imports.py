"""The import structure of the project modules (the repository root's *.py, the packages corpus/,
integer/, integer_tf/ and hw/, and scripts/).

- static: every import statement anywhere in a module (module level and inside functions) names
  the project modules it depends on; that graph has no cycle, nothing but the benchmarks imports
  the commands `eval` and `train`, and no script imports another script;
- dynamic: every module imports on its own in an interpreter that holds no project module yet
  (an import-time cycle or error shows only when the module is the first one imported);
- the NumPy side (every module of integer/, and data_load, hparams, corpus.demo) never loads
  TensorFlow, and integer/ imports nothing outside itself (no import points back up a layer);
- the choices of --quant, --rounding, --calib and --weight_init come from integer/fixed_point.py and
  integer/calibration.py.
"""

from __future__ import annotations

import ast
import contextlib
import functools
import importlib
import io
import json
import os
import re
import subprocess
import sys
import textwrap
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import NamedTuple

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPTS = ROOT / "scripts"
REQUIRED = ("integer.fixed_point", "integer.kernels", "integer.matmul_engine", "integer.intonly_engine",
            "integer.calibration", "integer_tf.export", "integer_tf.intonly_layers", "quant", "model",
            "train", "eval", "runs", "data_load", "hparams", "modules", "corpus.demo")
NUMPY_PACKAGE = "integer"
HW_PACKAGE = "hw"  # the RTL's Python side: NumPy and integer/ only
COMMANDS = ("eval", "train")  # importable only by scripts/bench_*.py
TIMEOUT = 300


# ---- the static import graph --------------------------------------------------------------------


def project_modules() -> dict[str, Path]:
    """Dotted name -> file of every project module: ROOT/*.py, corpus/*.py, scripts/*.py (the
    scripts are named scripts.<name>; a package's __init__.py is the package)."""
    paths = sorted(ROOT.glob("*.py")) + [path for package in ("corpus", "integer", "integer_tf", HW_PACKAGE)
                                         for path in sorted((ROOT / package).glob("*.py"))]
    paths += sorted(SCRIPTS.glob("*.py"))
    modules = {}
    for path in paths:
        parts = path.relative_to(ROOT).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        modules[".".join(parts)] = path
    return modules


MODULES = project_modules()
# the NumPy side: never loads TensorFlow
TF_FREE = tuple(sorted(name for name in MODULES if name.partition(".")[0] in (NUMPY_PACKAGE, HW_PACKAGE))) + \
    ("data_load", "hparams", "corpus.demo")


def is_script(name: str) -> bool:
    return name.startswith("scripts.")


def resolve(dotted: str, importer: str, modules) -> set[str]:
    """The project modules that importing `dotted` from `importer` loads: the module and its parent
    packages. A script runs with scripts/ first on sys.path, so its bare `import x` may be a
    sibling script."""
    found = set()
    candidates = [dotted]
    if is_script(importer):
        candidates.insert(0, "scripts." + dotted)
    for candidate in candidates:
        parts = candidate.split(".")
        for i in range(1, len(parts) + 1):
            if ".".join(parts[:i]) in modules:
                found.add(".".join(parts[:i]))
        if found:
            break
    found.discard("scripts")  # scripts/ is a folder of programs, not a package
    return found


def imported_modules(tree: ast.AST, importer: str, modules, is_package: bool = False) \
        -> list[tuple[str, int]]:
    """(project module, line) for every import anywhere in `tree`: import x [as y], import a.b,
    from x import y, from pkg import submodule, relative imports, and importlib.import_module /
    __import__ with a literal name."""
    found = []
    package = importer if is_package else importer.rpartition(".")[0]
    for node in ast.walk(tree):
        names = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".") if package else []
                base = base[: len(base) - (node.level - 1)] if node.level > 1 else base
                base_name = ".".join(base + ([node.module] if node.module else []))
            else:
                base_name = node.module
            if base_name:
                names.append(base_name)
            names += [f"{base_name}.{alias.name}" if base_name else alias.name for alias in node.names
                      if alias.name != "*"]
        elif isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant) \
                and isinstance(node.args[0].value, str):
            func = node.func
            called = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", None)
            if called in ("import_module", "__import__"):
                names = [node.args[0].value]
        for name in names:
            found += [(module, node.lineno) for module in sorted(resolve(name, importer, modules))
                      if module != importer]
    return found


@functools.cache
def import_graph() -> dict[str, dict[str, list[int]]]:
    """importer -> {imported project module -> lines}."""
    graph = {}
    for name, path in MODULES.items():
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        edges = {}
        for module, line in imported_modules(tree, name, MODULES, path.name == "__init__.py"):
            lines = edges.setdefault(module, [])
            if line not in lines:
                lines.append(line)
        graph[name] = edges
    return graph


def where(importer: str, imported: str, graph) -> str:
    rel = MODULES[importer].relative_to(ROOT)
    return f"{rel}:{','.join(map(str, graph[importer][imported]))} imports {imported}"


def find_cycles(graph: dict[str, dict]) -> list[list[str]]:
    """One cycle [a, b, ..., a] per strongly connected component that has one (Tarjan)."""
    index, low, stack, on_stack, components = {}, {}, [], set(), []

    def visit(node):
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for succ in graph.get(node, ()):
            if succ not in index:
                visit(succ)
                low[node] = min(low[node], low[succ])
            elif succ in on_stack:
                low[node] = min(low[node], index[succ])
        if low[node] == index[node]:
            component = set()
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.add(member)
                if member == node:
                    break
            components.append(component)

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return [shortest_cycle(graph, component) for component in components if len(component) > 1]


def shortest_cycle(graph: dict[str, dict], component: set[str]) -> list[str]:
    """[start, ..., start] through the component's first node, by breadth-first search."""
    start = min(component)
    parent, queue = {start: None}, deque([start])
    while queue:
        node = queue.popleft()
        for succ in sorted(graph.get(node, ())):
            if succ == start:
                path = [node]
                while parent[path[-1]] is not None:
                    path.append(parent[path[-1]])
                return path[::-1] + [start]
            if succ in component and succ not in parent:
                parent[succ] = node
                queue.append(succ)
    raise AssertionError(f"no cycle through {start}")


def test_the_module_list_is_found_not_written():
    missing = [name for name in REQUIRED if name not in MODULES]
    assert not missing, f"project modules not found under {ROOT}: {missing}"
    assert any(is_script(name) for name in MODULES), "no scripts/*.py found"


def test_the_import_collector_sees_every_form():
    modules = {"a": None, "b": None, "c": None, "d": None, "e": None, "pkg": None, "pkg.sub": None,
               "pkg.other": None, "scripts.tool": None, "scripts.helper": None}
    source = textwrap.dedent("""
        import os, a
        import b as bee
        from c import thing
        from pkg import sub
        import numpy as np

        def later():
            import d
            class Inner:
                def method(self):
                    from importlib import import_module
                    import_module("e")
                    from . import other
    """)
    found = {module for module, _ in imported_modules(ast.parse(source), "pkg.mod", modules)}
    assert found == {"a", "b", "c", "d", "e", "pkg", "pkg.sub", "pkg.other"}
    found = imported_modules(ast.parse("import pkg.sub\nimport helper\nimport tool\n"), "scripts.tool",
                             modules)
    assert {module for module, _ in found} == {"pkg", "pkg.sub", "scripts.helper"}
    cycles = find_cycles({"eval": {"export": [1]}, "export": {"runs": [1], "eval": [2]}, "runs": {}})
    assert cycles == [["eval", "export", "eval"]]


def test_the_import_graph_has_no_cycle():
    graph = import_graph()
    cycles = find_cycles(graph)
    assert not cycles, "import cycles among the project modules (imports inside functions count):\n" + \
        "\n".join(" -> ".join(cycle) + "  (" + "; ".join(where(a, b, graph) for a, b in zip(cycle, cycle[1:]))
                  + ")" for cycle in cycles)


def test_only_the_benchmarks_import_the_eval_and_train_commands():
    graph = import_graph()
    bad = [where(importer, command, graph) for importer, edges in sorted(graph.items())
           for command in COMMANDS if command in edges and not importer.startswith("scripts.bench_")]
    assert not bad, "only scripts/bench_*.py may import eval.py / train.py (their main() functions " \
        "are commands; shared code belongs in runs.py or hparams.py):\n" + "\n".join(bad)


def test_the_numpy_package_imports_nothing_outside_itself():
    """integer/ is the bottom layer: what an FPGA team reads must stand alone."""
    graph = import_graph()
    bad = [where(importer, imported, graph) for importer, edges in sorted(graph.items())
           if importer.partition(".")[0] == NUMPY_PACKAGE
           for imported in edges if imported.partition(".")[0] != NUMPY_PACKAGE]
    assert not bad, "integer/ imports a module outside it:\n" + "\n".join(bad)


def test_the_hw_package_imports_only_itself_and_the_numpy_package():
    """hw/ (parameters, benches, cost of the RTL) builds on integer/ alone: no TensorFlow side."""
    graph = import_graph()
    bad = [where(importer, imported, graph) for importer, edges in sorted(graph.items())
           if importer.partition(".")[0] == HW_PACKAGE
           for imported in edges if imported.partition(".")[0] not in (HW_PACKAGE, NUMPY_PACKAGE)]
    assert not bad, "hw/ imports a module outside hw/ and integer/:\n" + "\n".join(bad)


def test_no_script_imports_another_script():
    graph = import_graph()
    bad = [where(importer, imported, graph) for importer, edges in sorted(graph.items())
           if is_script(importer) for imported in edges if is_script(imported)]
    assert not bad, "a script imported another script (move shared code to a project module):\n" + \
        "\n".join(bad)


# ---- importing each module first, in an interpreter of its own ----------------------------------


class Result(NamedTuple):
    returncode: int
    output: str
    tf_modules: tuple[str, ...] = ()  # the tensorflow* modules loaded by the import
    tf_chain: tuple[str, ...] = ()  # file:line of the project imports that led to the first one


def child_env() -> dict[str, str]:
    return dict(os.environ, PYTHONPATH=str(ROOT), TF_CPP_MIN_LOG_LEVEL="3")


def import_name(name: str) -> str:
    """What `python scripts/x.py` or `python x.py` would import it as (scripts/ is sys.path[0])."""
    return name.removeprefix("scripts.")


# Imports `name` (argv[1]); prints one JSON line: the tensorflow* modules it loaded and the
# project-file frames on the stack when the first one was looked up.
FRESH = """
import json, sys, traceback
root, chain = sys.argv[2], []
class Spy:
    def find_spec(self, fullname, path=None, target=None):
        if fullname.partition(".")[0] == "tensorflow" and not chain:
            chain.extend(f"{f.filename[len(root) + 1:]}:{f.lineno}" for f in traceback.extract_stack()
                         if f.filename.startswith(root + "/"))
            chain.append("tensorflow")
sys.meta_path.insert(0, Spy())
__import__(sys.argv[1])
tf = sorted(key for key in sys.modules if key.startswith("tensorflow"))
print("\\n" + json.dumps({"tf": tf, "chain": chain}))
"""


@functools.cache
def fresh_import(name: str) -> Result:
    """`import name` as the first statement of a new interpreter."""
    proc = subprocess.run([sys.executable, "-c", FRESH, import_name(name), str(ROOT)],
                          cwd=SCRIPTS if is_script(name) else ROOT, env=child_env(), capture_output=True,
                          text=True, timeout=TIMEOUT)
    report = {"tf": [], "chain": []}
    if proc.returncode == 0:
        report = json.loads(proc.stdout.strip().splitlines()[-1])
    return Result(proc.returncode, proc.stdout + proc.stderr, tuple(report["tf"]), tuple(report["chain"]))


# Imports TensorFlow once, then forks a child per module in argv[1:]; each child starts with no
# project module loaded and imports its module first. Prints {name: [exit code, traceback]}.
FORKED = """
import importlib, json, os, sys, traceback, warnings
warnings.simplefilter("ignore", DeprecationWarning)  # 3.12+: fork() of a process with threads
import tensorflow
scripts, results = os.path.join(os.getcwd(), "scripts"), {}
for name in sys.argv[1:]:
    read, write = os.pipe()
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:
        os.close(read)
        code = 0
        try:
            if name.startswith("scripts."):
                sys.path.insert(0, scripts)
                os.chdir(scripts)
            importlib.import_module(name.removeprefix("scripts."))
        except BaseException:
            os.write(write, traceback.format_exc().encode())
            code = 1
        os._exit(code)
    os.close(write)
    with os.fdopen(read, "rb") as pipe:
        text = pipe.read().decode()
    status = os.waitpid(pid, 0)[1]
    results[name] = [os.waitstatus_to_exitcode(status), text]
print("\\n" + json.dumps(results))
"""


def forked_imports(names: list[str]) -> dict[str, Result]:
    """`import name` first, for each name, in a fork of one interpreter that imported only
    TensorFlow: no project module is loaded before the module under test, so cycles and errors
    show as in a fresh interpreter, without paying TensorFlow's import (seconds) per module."""
    proc = subprocess.run([sys.executable, "-c", FORKED, *names], cwd=ROOT, env=child_env(),
                          capture_output=True, text=True, timeout=TIMEOUT)
    if proc.returncode != 0:
        return {name: Result(proc.returncode, "TensorFlow parent:\n" + proc.stdout + proc.stderr)
                for name in names}
    results = json.loads(proc.stdout.strip().splitlines()[-1])
    return {name: Result(code, text) for name, (code, text) in results.items()}


def uses_tensorflow_statically() -> set[str]:
    """The project modules that import tensorflow, themselves or through project modules (any
    import anywhere in the file). Only decides how a module is imported below, not the result."""
    direct = set()
    for name, path in MODULES.items():
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            names = ([alias.name for alias in node.names] if isinstance(node, ast.Import) else
                     [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            if any(n.partition(".")[0] == "tensorflow" for n in names):
                direct.add(name)
    graph, uses, changed = import_graph(), set(direct), True
    while changed:
        grown = {name for name, edges in graph.items() if uses & set(edges)}
        changed = not grown <= uses
        uses |= grown
    return uses


@functools.cache
def all_imports() -> dict[str, Result]:
    """Every project module, imported first: TensorFlow-free ones in new interpreters, the others
    from forks of a TensorFlow-loaded interpreter (or new interpreters where there is no fork)."""
    tf_modules = uses_tensorflow_statically() if hasattr(os, "fork") else set()
    # TF_FREE are always fresh: test_the_integer_side_does_not_load_tensorflow reads their results
    fresh = [name for name in MODULES if name not in tf_modules or name in TF_FREE]
    forked = [name for name in MODULES if name not in fresh]
    with ThreadPoolExecutor(max_workers=max(2, os.cpu_count() or 2)) as pool:
        forked_results = pool.submit(forked_imports, forked) if forked else None
        results = dict(zip(fresh, pool.map(fresh_import, fresh)))
        if forked_results:
            results.update(forked_results.result())
    return results


@pytest.mark.parametrize("name", sorted(MODULES))
def test_each_module_imports_first_on_its_own(name):
    result = all_imports()[name]
    if result.returncode != 0:
        pytest.fail(f"`import {import_name(name)}` as the first import failed (exit code "
                    f"{result.returncode}):\n{result.output[-4000:]}", pytrace=False)


@pytest.mark.parametrize("name", TF_FREE)
def test_the_integer_side_does_not_load_tensorflow(name):
    all_imports()  # runs the TF-free modules in parallel
    result = fresh_import(name)
    if result.returncode != 0:
        pytest.fail(f"`import {name}` failed:\n{result.output[-4000:]}", pytrace=False)
    if result.tf_modules:
        pytest.fail(f"`import {name}` loads TensorFlow ({len(result.tf_modules)} tensorflow* modules), "
                    f"pulled in by: {' -> '.join(result.tf_chain)}", pytrace=False)


# Makes `import tensorflow` fail in the interpreter that loads it (a sitecustomize on PYTHONPATH).
BLOCK_TENSORFLOW = """
import sys
class NoTensorFlow:
    def find_spec(self, fullname, path=None, target=None):
        if fullname.partition(".")[0] == "tensorflow":
            raise ImportError("tensorflow is blocked: tests/integer/ and tests/hw/ must run without it")
sys.meta_path.insert(0, NoTensorFlow())
"""


def test_the_numpy_tests_collect_without_tensorflow(tmp_path):
    """tests/integer/ and tests/hw/ (the NumPy packages' tests) and their conftest import no TensorFlow."""
    (tmp_path / "sitecustomize.py").write_text(BLOCK_TENSORFLOW)
    env = dict(child_env(), PYTHONPATH=os.pathsep.join([str(tmp_path), str(ROOT)]))
    proc = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider",
                           "-p", "no:xdist", "tests/integer", "tests/hw"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=TIMEOUT)
    counts = dict(re.findall(r"^tests/(integer|hw)/test_\w+\.py: (\d+)$", proc.stdout, re.M))  # per file
    output = proc.stdout[-3000:] + proc.stderr[-3000:]
    assert proc.returncode == 0 and set(counts) == {"integer", "hw"}, output
    blocked = subprocess.run([sys.executable, "-c", "import tensorflow"], env=env, capture_output=True)
    assert blocked.returncode != 0  # the block itself works


# ---- flag choices: one list each, in fixed_point / calibration -------------------------------------


# (module, attribute) whose values each flag offers; imported in the tests, so that a broken
# import above still lets this file run its import checks
SOURCES = {"--quant": ("integer.fixed_point", "PRESETS"), "--rounding": ("integer.fixed_point", "ROUNDINGS"),
           "--calib": ("integer.calibration", "METHODS"),
           "--weight_init": ("integer.calibration", "WEIGHT_INITS")}
PARSERS = {"train": ("train_parser", ["--logdir", "unused"]), "eval": ("eval_parser", [])}


def build_parser(parser: str):
    import hparams

    return getattr(hparams, PARSERS[parser][0])()


def parse(parser: str, flag: str, value: str):
    """hparams.<parser>() parsing `flag value` (with the flags it requires)."""
    with contextlib.redirect_stderr(io.StringIO()) as err:
        try:
            return build_parser(parser).parse_args([*PARSERS[parser][1], flag, value])
        except SystemExit:
            message = (err.getvalue().strip().splitlines() or ["(no message)"])[-1]
            pytest.fail(f"the {parser} parser rejects {flag} {value}: {message}", pytrace=False)


def action(parser, flag):
    matches = [a for a in parser._actions if flag in a.option_strings]
    assert len(matches) == 1, f"{parser.prog}: {len(matches)} actions for {flag}"
    return matches[0]


@pytest.mark.parametrize("parser", sorted(PARSERS))
@pytest.mark.parametrize("flag", sorted(SOURCES))
def test_flag_choices_are_the_lists_in_fixed_point_and_calibration(parser, flag):
    module, attr = SOURCES[flag]
    expected = list(getattr(importlib.import_module(module), attr))
    choices = action(build_parser(parser), flag).choices
    assert choices is not None and list(choices) == expected, \
        f"{parser} {flag} offers {choices}, not {module}.{attr} = {expected}"


@pytest.mark.parametrize("parser", sorted(PARSERS))
@pytest.mark.parametrize("flag", ["--rounding", "--calib", "--weight_init"])
def test_a_new_choice_is_one_edit(monkeypatch, parser, flag):
    """A value added to the tuple in fixed_point / calibration is accepted, with no edit to hparams
    (a literal list in hparams, even an equal one, fails here)."""
    module, attr = SOURCES[flag]
    module = importlib.import_module(module)
    monkeypatch.setattr(module, attr, (*getattr(module, attr), "added_choice"))
    assert getattr(parse(parser, flag, "added_choice"), flag.lstrip("-")) == "added_choice"


@pytest.mark.parametrize("parser", sorted(PARSERS))
def test_a_new_preset_is_one_edit(monkeypatch, parser):
    """A preset added to fixed_point.PRESETS is a --quant choice and a QuantConfig, with no other edit."""
    from integer import fixed_point

    monkeypatch.setitem(fixed_point.PRESETS, "w3a5", (3, 5))
    args = parse(parser, "--quant", "w3a5")
    assert args.quant == "w3a5"
    import quant  # TensorFlow: only this test needs it

    config = quant.QuantConfig.from_flags(args.quant)
    assert (config.wbits, config.abits) == (3, 5)
