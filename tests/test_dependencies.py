"""repae installs exactly what it imports (issue 11).

Every third-party module imported anywhere in ``repae/`` and ``plugins/`` (at the top of a file or lazily inside a
function: the files are read with ``ast``, nothing is imported) belongs to a distribution that ``pyproject.toml``
declares, either in ``dependencies`` or in one of the extras, with a floor (``>=``); the tests' own imports are
covered by the ``test`` extra; the example plugin's imports by its own ``pyproject.toml``. A distribution that only an
extra declares is optional: ``import repae`` and loading every built-in plugin work without it. Every base dependency
is imported somewhere (none is declared for nothing). The module-to-distribution map is the installed one
(``importlib.metadata.packages_distributions``), so a new import of an undeclared package fails here.
"""

from __future__ import annotations

import functools
import importlib.metadata
import re
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import EXAMPLE_PLUGIN, ROOT, python_imports

tomllib = pytest.importorskip("tomllib")  # Python >= 3.11 (CI's); on 3.10 these checks are skipped

RUNTIME_EXTRAS_EXCLUDED = {"test"}
"""Extras that are tooling, not optional features of repae: their packages may not be imported by repae/plugins."""


def normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def requirement_name(requirement: str) -> str:
    match = re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)", requirement)
    assert match, f"unreadable requirement {requirement!r}"
    return normalize(match.group(1))


def project_table(pyproject: Path) -> dict:
    return tomllib.loads(pyproject.read_text())["project"]


PROJECT = project_table(ROOT / "pyproject.toml")
BASE = {requirement_name(r) for r in PROJECT["dependencies"]}
EXTRAS = {extra: {requirement_name(r) for r in reqs} for extra, reqs in PROJECT["optional-dependencies"].items()}
RUNTIME_OPTIONAL = set().union(*(d for e, d in EXTRAS.items() if e not in RUNTIME_EXTRAS_EXCLUDED)) - BASE


def local_modules() -> set[str]:
    """Top-level names that are this repository's own code, not a distribution: repae, the built-in plugins, the
    tests and their plugins, the example plugin."""
    names = {"repae"}
    for folder in (ROOT / "plugins", ROOT / "tests", ROOT / "tests" / "plugins_for_tests", EXAMPLE_PLUGIN):
        for child in folder.iterdir():
            if child.suffix == ".py":
                names.add(child.stem)
            elif (child / "__init__.py").is_file():
                names.add(child.name)
    return names


def third_party_imports(*folders: Path) -> dict[str, list[str]]:
    """Top-level module name -> ``file:line`` of every import of it that is neither stdlib nor local."""
    local = local_modules()
    found: dict[str, list[str]] = {}
    for folder in folders:
        for path in sorted(folder.rglob("*.py")):
            if ".mypy_cache" in path.parts or "build" in path.relative_to(ROOT).parts:
                continue
            for line, module, _ in python_imports(path):
                top = module.split(".")[0]
                if top in sys.stdlib_module_names or top in local or top == "__future__":
                    continue
                found.setdefault(top, []).append(f"{path.relative_to(ROOT)}:{line}")
    return found


@functools.cache
def module_distributions() -> dict[str, list[str]]:
    return importlib.metadata.packages_distributions()


def optional_package_calls(*folders: Path) -> list[tuple[str, str, str]]:
    """``(module, extra, file:line)`` of every ``require_package("module", extra="extra")`` / ``check_package(...)``
    call with literal arguments: the imports ``python_imports`` cannot see, made by name (repae.packages)."""
    import ast

    found = []
    for folder in folders:
        for path in sorted(folder.rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text(), str(path))):
                if not isinstance(node, ast.Call):
                    continue
                name = node.func.attr if isinstance(node.func, ast.Attribute) else getattr(node.func, "id", None)
                extra = next((k.value for k in node.keywords if k.arg == "extra"), None)
                if (name in ("require_package", "check_package") and node.args
                        and isinstance(node.args[0], ast.Constant) and isinstance(extra, ast.Constant)):
                    shown = path.relative_to(ROOT) if path.is_relative_to(ROOT) else path
                    found.append((node.args[0].value, extra.value, f"{shown}:{node.lineno}"))
    return found


def distributions(module: str) -> set[str]:
    return {normalize(d) for d in module_distributions().get(module, [])}


def undeclared(imports: dict[str, list[str]], declared: set[str]) -> list[str]:
    problems = []
    for module, where in sorted(imports.items()):
        dists = distributions(module)
        if not dists:
            problems.append(f"{module} (imported at {where[0]}) belongs to no installed distribution: install it, "
                            "and declare it in pyproject.toml")
        elif not dists & declared:
            problems.append(f"{module} (imported at {where[0]}) comes from {', '.join(sorted(dists))}, which "
                            "pyproject.toml does not declare")
    return problems


def test_the_scan_sees_lazy_imports_and_skips_local_and_stdlib_ones():
    """The scan itself: imports inside functions are found; repae's own packages and the stdlib are not third-party."""
    imports = third_party_imports(ROOT / "repae", ROOT / "plugins")
    assert "huggingface_hub" in imports  # imported inside a function only (repae/weights.py)
    assert {"torch", "numpy", "yaml"} <= set(imports)
    assert not {"repae", "repae_vae", "os", "json"} & set(imports)
    assert undeclared({"torch": ["x.py:1"]}, set()) and not undeclared({"torch": ["x.py:1"]}, {"torch"})


def test_every_import_of_repae_and_the_plugins_is_declared():
    declared = BASE | RUNTIME_OPTIONAL
    problems = undeclared(third_party_imports(ROOT / "repae", ROOT / "plugins"), declared)
    assert not problems, "\n".join(problems)


def test_packages_imported_by_name_are_in_the_extra_their_message_names(tmp_path):
    """``require_package("wandb", extra="wandb")`` tells the user to ``pip install 'repae[wandb]'``: that extra exists
    and installs the package."""
    (tmp_path / "m.py").write_text("import repae\ndef f():\n    return repae.require_package('wandb', extra='wandb', "
                                   "what='x')\ncheck_package(name, extra='x')\n")
    assert optional_package_calls(tmp_path) == [("wandb", "wandb", f"{tmp_path / 'm.py'}:3")]
    calls = optional_package_calls(ROOT / "repae", ROOT / "plugins")
    problems = [f"{where}: {module} (from {', '.join(sorted(distributions(module))) or 'no installed distribution'}) "
                f"is not in the extra {extra!r}" for module, extra, where in calls
                if not distributions(module) & EXTRAS.get(extra, set())]
    assert not problems, "\n".join(problems)


def test_every_import_of_the_tests_is_declared_with_the_test_extra():
    problems = undeclared(third_party_imports(ROOT / "tests"), BASE | EXTRAS["test"])
    assert not problems, "\n".join(problems)


def test_the_example_plugin_declares_what_it_imports():
    own = project_table(EXAMPLE_PLUGIN / "pyproject.toml")
    declared = {requirement_name(r) for r in own["dependencies"]}
    problems = undeclared(third_party_imports(EXAMPLE_PLUGIN / "repae_plugin_example"), declared)
    assert not problems, "\n".join(problems)


def test_every_base_dependency_is_imported():
    imported = set().union(*(distributions(m) for m in third_party_imports(ROOT / "repae", ROOT / "plugins")))
    assert BASE - imported == set(), "declared in pyproject.toml's dependencies but imported nowhere"


def test_every_requirement_has_a_floor():
    requirements = [*PROJECT["dependencies"], *(r for reqs in PROJECT["optional-dependencies"].values() for r in reqs)]
    floorless = [r for r in requirements if not re.search(r">=\s*\d", r)]
    assert not floorless, f"requirements without a floor (name>=version): {floorless}"


def test_the_runtime_extras_are_the_optional_features():
    """diffusers, TensorBoard and W&B are extras (and in `test`, so that the suite covers them); nothing else is
    optional."""
    assert {"diffusers", "tensorboard", "wandb"} <= set(EXTRAS)
    assert RUNTIME_OPTIONAL == {"diffusers", "tensorboard", "wandb"}
    assert RUNTIME_OPTIONAL <= EXTRAS["test"]


def test_repae_and_every_builtin_plugin_load_without_the_optional_packages():
    """With the extras' modules made unimportable, ``import repae``, loading every built-in plugin and listing the
    registry work: an optional package is imported only when a component that needs it is built."""
    blocked = sorted({module for module, dists in module_distributions().items()
                      if {normalize(d) for d in dists} & RUNTIME_OPTIONAL})
    assert {"diffusers", "tensorboard", "wandb"} <= set(blocked)
    code = f"""
import importlib.abc, sys
BLOCKED = set({blocked!r})
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ImportError(f"{{name}} is blocked: an optional package")
sys.meta_path.insert(0, Block())
import repae
host = repae.load_plugins(select={{"repae"}}, strict=True)
kinds = {{e.kind for e in host.registry.entries()}}
assert {{"tokenizer", "denoiser", "encoder", "loss"}} <= kinds, kinds
assert not [m for m in sys.modules if m.split(".")[0] in BLOCKED], "an optional package was imported"
print("ok")
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert done.returncode == 0 and done.stdout.strip().endswith("ok"), done.stderr[-3000:]
