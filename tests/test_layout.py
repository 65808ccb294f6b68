"""The package layout's rules, checked on the source tree: no import circles, the training recipe loads no
evaluation libraries, the model package loads no Ray/verl, and no source file outgrows one purpose."""

import ast
import subprocess
import sys
from pathlib import Path


REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("flythinker_worker", "recipe", "data_prep", "evaluation", "bench")
METRIC_LIBRARIES = ("rouge_score", "sacrebleu", "nltk", "bert_score", "matplotlib")


def module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def source_files() -> list[Path]:
    return sorted(p for package in PACKAGES for p in (REPO / package).rglob("*.py"))


def imports_of(path: Path) -> set[str]:
    """Our modules that `path` imports anywhere (module level or inside functions)."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            # `from pkg import mod` imports pkg.mod when that is a module of ours.
            targets = [base] + [f"{base}.{alias.name}" for alias in node.names]
        else:
            continue
        found.update(t for t in targets if t.split(".")[0] in PACKAGES)
    return found


def test_no_import_cycles():
    modules = {module_name(p): p for p in source_files()}
    graph = {name: {t for t in imports_of(path) if t in modules and t != name} for name, path in modules.items()}
    # A package's __init__ importing its own submodules is not a circle through the package.
    for name in graph:
        graph[name] -= {p for p in graph[name] if name.startswith(p + ".")}
    state, cycles = {}, []

    def visit(node, stack):
        state[node] = "open"
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                cycles.append(stack[stack.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt, stack + [nxt])
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    assert not cycles, f"import circles: {cycles}"


def loaded_modules(statement: str) -> set[str]:
    code = f"import sys; {statement}; print('\\n'.join(sorted(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    return {line.split(".")[0] for line in out.stdout.split()}


def test_training_recipe_loads_no_metric_libraries():
    loaded = loaded_modules("import recipe.trainer, recipe.main_flythinker, recipe.rollout, recipe.data")
    assert not loaded & set(METRIC_LIBRARIES)


def test_model_package_loads_no_ray_or_verl():
    loaded = loaded_modules("import flythinker_worker, flythinker_worker.sharding, flythinker_worker.utils")
    assert not loaded & {"ray", "verl"}


def test_source_files_stay_small():
    long = {str(p.relative_to(REPO)): n for p in source_files() if (n := len(p.read_text().splitlines())) > 400}
    assert not long, f"split these by responsibility: {long}"
