"""The house rules, read from the code itself (ast), for every module of the project:

- a stage package imports only earlier stages, in the order interp core (model, cache, shapes,
  infra), saes, explain, steering, app; only interp/pipeline/ and interp/cli.py may import every
  stage, and only interp/cli.py the CLI (so no library code can call the CLI's main);
- no code outside saes/architectures/ tests an SAE architecture's name: it asks the registry;
- run-directory file names are spelled in interp/infra/layout.py only.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("interp", "saes", "explain", "steering", "app")
ORDER = {"interp": 0, "saes": 1, "explain": 2, "steering": 3, "app": 4}
PIPELINE, CLI = 5, 6


def modules() -> dict[str, Path]:
    out = {}
    for pkg in PACKAGES:
        for path in sorted((ROOT / pkg).rglob("*.py")):
            parts = path.relative_to(ROOT).with_suffix("").parts
            out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def stage(module: str) -> int:
    if module == "interp.cli":
        return CLI
    if module == "interp.pipeline" or module.startswith("interp.pipeline."):
        return PIPELINE
    return ORDER[module.split(".")[0]]


def imports(path: Path, module: str) -> list[tuple[int, str]]:
    """(line, imported module) of every import in the file, at any depth (imports inside functions count)."""
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against this module's package
                base = module.split(".")[: len(module.split(".")) - node.level + (path.name == "__init__.py")]
                name = ".".join(base + ([node.module] if node.module else []))
            else:
                name = node.module or ""
            out.append((node.lineno, name))
            out += [(node.lineno, f"{name}.{a.name}") for a in node.names]  # `from pkg import module`
    return [(line, name) for line, name in out if name.split(".")[0] in PACKAGES]


MODULES = modules()


def test_the_rule_sees_the_whole_project():
    assert {"interp.cli", "interp.pipeline.demo", "interp.cache.writer", "saes.train", "explain.commands",
            "steering.commands", "app.commands", "interp.infra.layout"} <= set(MODULES)


@pytest.mark.parametrize("module", sorted(MODULES))
def test_a_stage_imports_only_earlier_stages(module):
    mine = stage(module)
    bad = []
    for line, name in imports(MODULES[module], module):
        target = next((m for m in (name, name.rsplit(".", 1)[0]) if m in MODULES), name)
        theirs = stage(target)
        if theirs > mine and not (mine == CLI):
            bad.append(f"{MODULES[module].relative_to(ROOT)}:{line} imports {target}")
    assert not bad, "a later stage imported: " + "; ".join(bad)


ARCH_TEST_ALLOWED = {  # files of other work in progress, to move onto the registry (see their own comments)
    "saes/sparsify_format.py": "sparsify's format holds TopK SAEs only",
    "explain/feature_columns.py": "its per-architecture column activations belong in saes/architectures",
}


def test_no_code_outside_the_registry_tests_architecture_names():
    from saes import architectures

    names = set(architectures.names())
    bad = []
    for module, path in MODULES.items():
        rel = str(path.relative_to(ROOT))
        if rel.startswith("saes/architectures/") or rel in ARCH_TEST_ALLOWED:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, ast.Compare):
                continue
            sides = [node.left, *node.comparators]
            mentions_arch = any("arch" in ast.unparse(s) for s in sides)
            literals = {c.value for s in sides for c in ast.walk(s) if isinstance(c, ast.Constant)}
            if mentions_arch and literals & names:
                bad.append(f"{rel}:{node.lineno}: {ast.unparse(node)}")
    assert not bad, bad


RUN_FILES = re.compile(r"""["'](activations\.h5|features\.h5|recovery\.json|explanations\.jsonl|scores\.jsonl|"""
                       r"""score_summary\.json|metrics\.jsonl|eval\.json|steering_summary\.json|summary\.json|"""
                       r"""explainer_cache\.jsonl|generations\.jsonl|identity\.json)["']""")


def test_run_directory_file_names_live_in_the_layout_only():
    bad = []
    for module, path in MODULES.items():
        if module == "interp.infra.layout":
            continue
        for n, line in enumerate(path.read_text().splitlines(), 1):
            if RUN_FILES.search(line) and not line.lstrip().startswith("#"):
                bad.append(f"{path.relative_to(ROOT)}:{n}: {line.strip()}")
    assert not bad, bad
