"""The project's import graph, read from the source with `ast`: no import cycle among the project's
files (module-level imports and imports inside functions alike), and each file that the README
calls standalone imports no project file beyond the ones its line names."""
import ast
import re
from pathlib import Path

import pytest
from conftest import ROOT


def project_modules(root: Path) -> dict:
    """module name -> file, for every *.py at the top level, in benchmarks/ and in demo_data/."""
    files = [*root.glob("*.py"), *root.glob("benchmarks/*.py"), *root.glob("demo_data/*.py")]
    return {".".join(path.relative_to(root).with_suffix("").parts): path for path in sorted(files)}


def imported_names(node, importer: str) -> list:
    """Every dotted name an import statement may load: for `from p import q`, both p and p.q (q may
    be a module of package p)."""
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    base = node.module
    if node.level:  # relative: from the importer's package, one package up per further dot
        parts = importer.split(".")
        base = ".".join(parts[:len(parts) - node.level] + [node.module] * bool(node.module))
    return [base, *(f"{base}.{alias.name}" for alias in node.names)]


def import_edges(root: Path) -> list:
    """(importer, imported, "file:line", the function it sits in or "" at module level), one per
    import of a project module."""
    modules = project_modules(root)
    edges = []
    for importer, path in modules.items():
        tree = ast.parse(path.read_text(), str(path))
        # Each node's innermost enclosing function: ast.walk meets a parent before its children.
        function_of = {}
        for outer in ast.walk(tree):
            inside = function_of.get(outer, "")
            if isinstance(outer, (ast.FunctionDef, ast.AsyncFunctionDef)):
                inside = outer.name
            for child in ast.iter_child_nodes(outer):
                function_of[child] = inside
        for node in ast.walk(tree):
            if not isinstance(node, (ast.Import, ast.ImportFrom)):
                continue
            loaded = set()
            for name in imported_names(node, importer):
                # `import a.b` loads a and a.b: each that is a project module counts
                parts = name.split(".")
                loaded.update(".".join(parts[:n]) for n in range(1, len(parts) + 1))
            for imported in sorted(loaded & set(modules) - {importer}):
                edges.append((importer, imported, f"{path.relative_to(root)}:{node.lineno}",
                              function_of.get(node, "")))
    return edges


def cycles(edges: list) -> list:
    """Each group of modules that import one another, directly or through others (the strongly
    connected components of more than one module, Tarjan's algorithm): (the group's modules, one
    cycle through it as a list of edges, the last returning to the first module)."""
    graph = {}
    for edge in edges:
        graph.setdefault(edge[0], []).append(edge)
    index, low, stack, on_stack, groups = {}, {}, [], set(), []

    def visit(module):
        index[module] = low[module] = len(index)
        stack.append(module)
        on_stack.add(module)
        for _, imported, _, _ in graph.get(module, []):
            if imported not in index:
                visit(imported)
                low[module] = min(low[module], low[imported])
            elif imported in on_stack:
                low[module] = min(low[module], index[imported])
        if low[module] == index[module]:
            group = set()
            while module not in group:
                group.add(stack.pop())
            on_stack.difference_update(group)
            if len(group) > 1:
                groups.append(group)

    for module in sorted(graph):
        if module not in index:
            visit(module)
    return [(group, cycle_through(group, graph)) for group in groups]


def cycle_through(group: set, graph: dict) -> list:
    """The shortest cycle from the group's first module (by name) back to it, inside the group."""
    start = min(group)
    paths = {start: []}
    frontier = [start]
    while frontier:
        following = []
        for module in frontier:
            for edge in graph[module]:
                if edge[1] == start:
                    return paths[module] + [edge]
                if edge[1] in group and edge[1] not in paths:
                    paths[edge[1]] = paths[module] + [edge]
                    following.append(edge[1])
        frontier = following
    raise AssertionError(f"no cycle through {sorted(group)}")  # a component always has one


def describe(group: set, cycle: list) -> str:
    on_cycle = [edge[0] for edge in cycle]
    where = "; ".join(f"{place} imports {imported}" + (f" in {function}()" if function else "")
                      for _, imported, place, function in cycle)
    others = sorted(group - set(on_cycle))
    also = f"; also in it: {', '.join(others)}" if others else ""
    return f"{' -> '.join(on_cycle + on_cycle[:1])} ({where}){also}"


def test_the_graph_sees_every_kind_of_import_and_names_each_cycle(tmp_path):
    (tmp_path / "benchmarks").mkdir()
    files = {"a.py": "import b\nimport os\n\n\ndef f():\n    from c import x as y\n",
             "b.py": "import c as renamed\n",
             "c.py": "class C:\n    def m(self):\n        import a\n",
             "d.py": "import benchmarks.e\nfrom benchmarks import f\n",
             "benchmarks/e.py": "from . import f\n",
             "benchmarks/f.py": "import d\n"}
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    edges = import_edges(tmp_path)
    assert sorted(edges) == [
        ("a", "b", "a.py:1", ""), ("a", "c", "a.py:6", "f"), ("b", "c", "b.py:1", ""),
        ("benchmarks.e", "benchmarks.f", "benchmarks/e.py:1", ""),
        ("benchmarks.f", "d", "benchmarks/f.py:1", ""), ("c", "a", "c.py:3", "m"),
        ("d", "benchmarks.e", "d.py:1", ""), ("d", "benchmarks.f", "d.py:2", "")]
    found = sorted(describe(*found) for found in cycles(edges))
    assert found == [
        "a -> c -> a (a.py:6 imports c in f(); c.py:3 imports a in m()); also in it: b",
        "benchmarks.e -> benchmarks.f -> d -> benchmarks.e (benchmarks/e.py:1 imports "
        "benchmarks.f; benchmarks/f.py:1 imports d; d.py:1 imports benchmarks.e)"]


def test_no_import_cycles():
    found = [describe(*found) for found in cycles(import_edges(ROOT))]
    assert not found, "import cycles:\n  " + "\n  ".join(found)


# file -> the project files it may import, itself and through them. The README's file table calls
# these files standalone and names what each needs (tests/test_copy_out.py copies each out with
# just those). model_zoo.py is no standalone file, but model.py imports it: it stays below, with
# only model_io.py, which both share.
MAY_IMPORT = {"verifier": set(), "ppo": set(), "data": set(), "rollout": set(),
              "distributed": set(), "lora": set(), "dynamics": {"data", "verifier"},
              "engine": {"rollout", "static_decode", "engine_forward"},
              "model_zoo": {"model_io"}}


def readme_promises() -> dict:
    """file -> the project files its row of the README's file table names after *Standalone*."""
    promises = {}
    for row in (ROOT / "README.md").read_text().split("\n"):
        cells = row.split(" | ")
        match = re.search(r"(?:`(\w+)\.py` )?\*[Ss]tandalone\*(.*)", row)
        if not row.startswith("| `") or len(cells) < 2 or not match:
            continue
        named_first = re.findall(r"`(\w+)\.py`", cells[0])
        promises[match.group(1) or named_first[0]] = set(re.findall(r"`(\w+)\.py`",
                                                                    match.group(2)))
    return promises


def test_the_table_holds_every_promise_of_the_readme():
    assert readme_promises() == {name: needs for name, needs in MAY_IMPORT.items()
                                 if name != "model_zoo"}


@pytest.mark.parametrize("name", sorted(MAY_IMPORT))
def test_a_lower_file_imports_no_project_file_above_it(name):
    # A file's command-line `main` runs only as `python file.py` inside the project: copying the
    # file out promises the rest.
    edges = [edge for edge in import_edges(ROOT) if edge[3] != "main"]
    reached = {}  # project module -> where the first import of it on the way is
    frontier = [name]
    while frontier:
        module = frontier.pop()
        for importer, imported, place, function in edges:
            if importer == module and imported != name and imported not in reached:
                reached[imported] = place + (f" in {function}()" if function else "")
                frontier.append(imported)
    beyond = sorted(set(reached) - MAY_IMPORT[name])
    assert not beyond, f"{name}.py reaches " + ", ".join(f"{m} ({reached[m]})" for m in beyond)
