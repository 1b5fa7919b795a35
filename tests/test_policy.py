"""Repository policy: plugins use only the public API, packaging conventions, CI runs the README."""

from __future__ import annotations

import ast
import re
import sys
from pathlib import Path

import pytest

import curvprune

ROOT = Path(__file__).resolve().parents[1]
if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

PLUGIN_DIRS = sorted(
    p for p in [*ROOT.glob("plugins/*"), *ROOT.glob("contrib/*")]
    if p.is_dir() and p.name != "_template" and (p / "pyproject.toml").is_file()
)
FIRST_PARTY = {f"curvprune_{p.name}" for p in PLUGIN_DIRS} | {"curvprune_example"}


def _imports(path: Path):
    tree = ast.parse(path.read_text(), filename=str(path))
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name, None
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for alias in node.names:
                yield node.lineno, node.module, alias.name


def _plugin_sources():
    for folder in [*PLUGIN_DIRS, ROOT / "contrib" / "_template"]:
        for path in sorted((folder / "src").rglob("*.py")):
            yield folder, path


def test_there_are_plugins_to_check():
    assert PLUGIN_DIRS, "no plugin folders found"


def _plugin_tests():
    for folder in [*PLUGIN_DIRS, ROOT / "contrib" / "_template"]:
        for path in sorted((folder / "tests").rglob("*.py")):
            yield folder, path


#: What a plugin's tests may import besides ``curvprune``'s public names: the testing kit and
#: the console entry point (``curvprune = "curvprune.cli:main"``).
TEST_MODULES = ("curvprune.testing", "curvprune.cli")


@pytest.mark.parametrize(("folder", "path"), list(_plugin_tests()), ids=lambda x: str(x)[-50:])
def test_plugin_tests_use_only_the_public_api_and_the_testing_kit(folder, path):
    for line, module, name in _imports(path):
        where = f"{path.relative_to(ROOT)}:{line}"
        if module == "curvprune":
            assert name is None or name in curvprune.__all__, f"{where}: curvprune.{name} is not public"
        elif module.startswith("curvprune."):
            assert module.startswith(TEST_MODULES), f"{where}: imports private {module}"


@pytest.mark.parametrize(("folder", "path"), list(_plugin_sources()), ids=lambda x: str(x)[-50:])
def test_plugins_import_only_the_public_api_and_never_each_other(folder, path):
    own = f"curvprune_{folder.name}" if folder.name != "_template" else "curvprune_example"
    for line, module, name in _imports(path):
        where = f"{path.relative_to(ROOT)}:{line}"
        if module == "curvprune":
            assert name is None or name in curvprune.__all__, f"{where}: curvprune.{name} is not public"
        else:
            assert not module.startswith("curvprune."), f"{where}: imports private {module}"
        top = module.split(".")[0]
        assert top not in FIRST_PARTY - {own}, f"{where}: plugins never import each other ({module})"


@pytest.mark.parametrize("folder", PLUGIN_DIRS, ids=lambda p: p.name)
def test_each_plugin_declares_one_entry_point_named_after_its_folder(folder):
    meta = tomllib.loads((folder / "pyproject.toml").read_text())["project"]
    assert meta["name"] == f"curvprune-{folder.name}"
    eps = meta["entry-points"]["curvprune"]
    assert eps == {folder.name: f"curvprune_{folder.name}.plugin"}
    assert any(dep.startswith("curvprune-core") for dep in meta["dependencies"])
    plugin_py = folder / "src" / f"curvprune_{folder.name}" / "plugin.py"
    assert plugin_py.is_file()
    tree = ast.parse(plugin_py.read_text())
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            decorators = [ast.unparse(d) for d in getattr(node, "decorator_list", [])]
            assert "hookimpl" in decorators, f"plugin.py holds only @hookimpl functions: {node.name}"


def test_meta_distribution_depends_on_every_paper_plugin():
    meta = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    deps = {re.split(r"[=<>!~ ;\[]", d, maxsplit=1)[0] for d in meta["dependencies"]}
    assert "curvprune-core" in deps
    for folder in sorted(ROOT.glob("plugins/*")):
        if (folder / "pyproject.toml").is_file():
            assert f"curvprune-{folder.name}" in deps


def test_no_old_style_hookwrappers():
    for path in [*ROOT.glob("core/src/**/*.py"), *ROOT.glob("plugins/*/src/**/*.py"),
                 *ROOT.glob("contrib/*/src/**/*.py")]:
        assert "hookwrapper=True" not in path.read_text(), path


def test_installed_distributions_are_discovered():
    infos = curvprune.plugins()
    dists = {i.distribution for i in infos}
    for folder in PLUGIN_DIRS:
        assert f"curvprune-{folder.name}" in dists, (
            f"curvprune-{folder.name} is not installed or not discovered; install with the README line"
        )


def test_ci_runs_the_readme_test_line():
    readme = (ROOT / "README.md").read_text().splitlines()
    test_lines = [line for line in readme[:6] if "python -m pytest" in line]
    assert len(test_lines) == 1
    ci = (ROOT / ".ci" / "run").read_text()
    assert "-e '.\\[test\\]' && python -m pytest" in ci
    for folder in PLUGIN_DIRS:
        assert f"./{folder.relative_to(ROOT)}" in test_lines[0], f"README line misses {folder.name}"


def test_library_never_configures_logging():
    for path in ROOT.glob("core/src/curvprune/**/*.py"):
        if path.name == "cli.py":
            continue
        text = path.read_text()
        assert "basicConfig(" not in text and "structlog.configure(" not in text, path


def test_readme_quick_start_config_builds():
    blocks = re.findall(r"```toml\n(.*?)```", (ROOT / "README.md").read_text(), re.S)
    assert blocks, "the README shows a config"
    for block in blocks:
        curvprune.Pipeline.from_config(tomllib.loads(block))
