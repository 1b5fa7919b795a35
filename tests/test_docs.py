"""The docs describe the code: config fields, hooks, result.json keys, switches and snippets.

Each page keeps its reference part in a regular form that these tests parse:

* docs/config.md: ``## `[table]` `` sections, ``### `component` `` subsections (and one
  ``### ... (`EstimatorConfig`)`` subsection), rows ``| `field` | type | default | meaning |``
  whose default is a TOML literal in backticks or ``unset``.
* docs/hooks.md: one heading ``name(arg1, arg2)`` per hook.
* docs/results.md: under ``## `result.json` keys``, rows ``| `path` | type | meaning |`` with
  paths such as ``sparsity.per_layer``, ``steps[].num_grads`` or ``versions.<distribution>``.

Every check runs both ways: what the code has must be documented, and what the docs name must
exist.
"""

from __future__ import annotations

import inspect
import json
import re
import sys
import typing
from collections.abc import Iterator
from functools import cache
from pathlib import Path
from typing import Any

import attrs
import pytest

import curvprune
from curvprune import ComponentSpec, EstimatorConfig, PipelineConfig
from curvprune.plugin import hookspecs
from curvprune.plugin.registry import KINDS, Component

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
#: The pages this test file keeps in sync (docs/methods/ and benchmarks.md have their own owners).
PAGES = (
    "index.md",
    "quickstart.md",
    "config.md",
    "hooks.md",
    "writing-plugins.md",
    "testing-plugins.md",
    "results.md",
    "design-decisions.md",
    "checkpoints.md",
)

_UNSET = object()
_FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.S | re.M)


def _read(page: str) -> str:
    return (DOCS / page).read_text(encoding="utf-8")


def _sections(text: str, level: int) -> Iterator[tuple[str, str]]:
    """``(heading, body)`` for every heading of exactly ``level``; fenced code is not searched.

    A section ends at the next heading of the same or a higher level.
    """
    heading: str | None = None
    body: list[str] = []
    in_code = False
    for line in text.splitlines():
        if line.startswith("```"):
            in_code = not in_code
        match = None if in_code else re.match(r"^(#{1,6}) (.*)$", line)
        if match and len(match.group(1)) <= level:
            if heading is not None:
                yield heading, "\n".join(body)
            heading = match.group(2).strip() if len(match.group(1)) == level else None
            body = []
        else:
            body.append(line)
    if heading is not None:
        yield heading, "\n".join(body)


# --------------------------------------------------------------------------------------------
# docs/config.md
# --------------------------------------------------------------------------------------------
_TABLE_HEADING = re.compile(r"`\[(\w+)\]`")
_COMPONENT_HEADING = re.compile(r"^`([a-z][a-z0-9_\-]*)`$")
_FIELD_ROW = re.compile(r"^\| `(\w+)` \| [^|]* \| ([^|]*) \| .* \|$", re.M)


def _parse_default(text: str) -> Any:
    """A default cell: ``unset``, ``required`` or a TOML literal in backticks."""
    text = text.strip()
    if text == "unset":
        return _UNSET
    if text == "required":
        return attrs.NOTHING
    match = re.fullmatch(r"`(.+)`", text)
    assert match, f"default cell {text!r} is neither 'unset', 'required' nor a `TOML value`"
    return tomllib.loads(f"v = {match.group(1)}")["v"]


def _rows(body: str) -> dict[str, Any]:
    rows: dict[str, Any] = {}
    for name, default in _FIELD_ROW.findall(body):
        assert name not in rows, f"field {name!r} is documented twice in one section"
        rows[name] = _parse_default(default)
    return rows


@cache
def _config_doc() -> dict[tuple[str, str | None], dict[str, Any]]:
    """``(table, subsection) -> {field: default}``; subsection None for the table's own rows."""
    out: dict[tuple[str, str | None], dict[str, Any]] = {}
    for heading, body in _sections(_read("config.md"), 2):
        match = _TABLE_HEADING.fullmatch(heading)
        if match is None:
            continue
        table = match.group(1)
        own = re.split(r"^### ", body, maxsplit=1, flags=re.M)[0]
        out[(table, None)] = _rows(own)
        for sub, sub_body in _sections(body, 3):
            component = _COMPONENT_HEADING.fullmatch(sub)
            key = component.group(1) if component else (
                "EstimatorConfig" if "`EstimatorConfig`" in sub else sub
            )
            out[(table, key)] = _rows(sub_body)
    return out


def _expected_default(field: attrs.Attribute) -> Any:
    default = field.default
    if isinstance(default, attrs.Factory):  # type: ignore[arg-type]
        default = default.factory()
    if default is None:
        return _UNSET
    if isinstance(default, tuple):
        return list(default)
    return default


def _fields(cls: type) -> dict[str, Any]:
    return {f.name: _expected_default(f) for f in attrs.fields(cls)}


def _pipeline_tables() -> dict[str, Any]:
    return typing.get_type_hints(PipelineConfig)


def _fixed_tables() -> dict[str, type]:
    return {
        k: t for k, t in _pipeline_tables().items()
        if isinstance(t, type) and attrs.has(t) and t is not ComponentSpec
    }


def _role_tables() -> list[str]:
    return [k for k, t in _pipeline_tables().items() if ComponentSpec in (t, *typing.get_args(t))]


@cache
def _builtin_components() -> tuple[Component, ...]:
    return tuple(curvprune.get_plugin_manager(autoload=False).registry)


def test_config_doc_has_a_section_for_every_table_and_no_other() -> None:
    documented = {table for table, sub in _config_doc() if sub is None}
    assert documented == set(_fixed_tables()) | set(_role_tables()), (
        f"config.md table sections {sorted(documented)} differ from the config's tables "
        f"{sorted(set(_fixed_tables()) | set(_role_tables()))}"
    )
    assert set(_role_tables()) == set(KINDS), "a role table is missing from curvprune.plugin.registry"


@pytest.mark.parametrize("table", sorted(_fixed_tables()))
def test_config_doc_fixed_table_matches_its_attrs_class(table: str) -> None:
    cls = _fixed_tables()[table]
    documented = _config_doc().get((table, None))
    assert documented is not None, f"config.md has no section ## `[{table}]`"
    expected = _fields(cls)
    assert set(documented) == set(expected), (
        f"[{table}] ({cls.__name__}): undocumented {sorted(set(expected) - set(documented))}, "
        f"documented but absent {sorted(set(documented) - set(expected))}"
    )
    for name, default in expected.items():
        assert documented[name] == default, (
            f"[{table}] {name}: config.md says default {documented[name]!r}, code has {default!r}"
        )


@pytest.mark.parametrize("role", sorted(KINDS))
def test_config_doc_role_table_documents_only_name(role: str) -> None:
    assert set(_config_doc()[(role, None)]) == {"name"}, (
        f"[{role}] rows outside a component subsection must be only 'name'"
    )


def test_config_doc_shared_estimator_fields_match_estimator_config() -> None:
    documented = _config_doc().get(("estimator", "EstimatorConfig"))
    assert documented == _fields(EstimatorConfig), (
        f"config.md's EstimatorConfig table {documented} != the class {_fields(EstimatorConfig)}"
    )


@pytest.mark.parametrize(
    "component", _builtin_components(), ids=lambda c: f"{c.kind}-{c.name}"
)
def test_config_doc_documents_every_builtin_component_field(component: Component) -> None:
    documented = _config_doc().get((component.kind, component.name))
    assert documented is not None, (
        f"config.md has no subsection ### `{component.name}` under [{component.kind}]"
    )
    expected = _fields(component.config) if component.config is not None else {}
    required = set(expected)
    if component.config is not None and issubclass(component.config, EstimatorConfig):
        # Shared fields are documented once; a component lists them only if its default differs.
        shared = _fields(EstimatorConfig)
        required = {n for n, d in expected.items() if n not in shared or shared[n] != d}
    assert required <= set(documented) <= set(expected), (
        f"{component.kind} {component.name!r}: undocumented {sorted(required - set(documented))}, "
        f"documented but absent {sorted(set(documented) - set(expected))}"
    )
    for name, default in documented.items():
        assert default == expected[name], (
            f"{component.kind} {component.name!r} {name}: config.md says default {default!r}, "
            f"code has {expected[name]!r}"
        )


def test_config_doc_documents_no_component_that_is_not_builtin() -> None:
    builtin = {(c.kind, c.name) for c in _builtin_components()}
    documented = {
        (table, sub) for table, sub in _config_doc()
        if sub is not None and sub != "EstimatorConfig"
    }
    assert documented <= builtin, (
        f"config.md has component subsections {sorted(documented - builtin)} that are not "
        "builtin components (plugin components belong on docs/methods/)"
    )


# --------------------------------------------------------------------------------------------
# docs/hooks.md
# --------------------------------------------------------------------------------------------
_HOOK_HEADING = re.compile(r"^(curvprune_\w+)\(([^)]*)\)$")


def _hook_specs() -> dict[str, Any]:
    return {n: f for n, f in vars(hookspecs).items() if hasattr(f, "curvprune_spec")}


@cache
def _documented_hooks() -> dict[str, tuple[str, ...]]:
    out: dict[str, tuple[str, ...]] = {}
    for level in (2, 3):
        for heading, _ in _sections(_read("hooks.md"), level):
            match = _HOOK_HEADING.fullmatch(heading)
            if match:
                name, args = match.groups()
                assert name not in out, f"hooks.md documents {name} twice"
                out[name] = tuple(a.strip() for a in args.split(",") if a.strip())
    return out


@pytest.mark.parametrize("name", sorted(_hook_specs()))
def test_hook_spec_is_prefixed_documented_and_annotated(name: str) -> None:
    spec = _hook_specs()[name]
    assert name.startswith("curvprune_"), f"hook {name} lacks the curvprune_ prefix"
    assert inspect.getdoc(spec), f"hook {name} has no docstring"
    signature = inspect.signature(spec)
    missing = [
        p for p, v in signature.parameters.items() if v.annotation is inspect.Parameter.empty
    ]
    assert not missing, f"hook {name}: parameters {missing} have no annotation"
    assert signature.return_annotation is not inspect.Signature.empty, (
        f"hook {name} has no return annotation"
    )


@pytest.mark.parametrize("name", sorted(_hook_specs()))
def test_hook_has_a_heading_with_its_argnames(name: str) -> None:
    pm = curvprune.get_plugin_manager(autoload=False).pm
    argnames = getattr(pm.hook, name).spec.argnames
    assert name in _documented_hooks(), f"hooks.md has no heading {name}({', '.join(argnames)})"
    assert _documented_hooks()[name] == tuple(argnames), (
        f"hooks.md documents {name}{_documented_hooks()[name]}, the spec takes {argnames}"
    )


def test_hooks_doc_documents_no_hook_missing_from_the_specs() -> None:
    pm = curvprune.get_plugin_manager(autoload=False).pm
    specified = set(vars(pm.hook))
    assert specified == set(_hook_specs()), "pm.hook and curvprune.plugin.hookspecs disagree"
    extra = set(_documented_hooks()) - specified
    assert not extra, f"hooks.md documents hooks that do not exist: {sorted(extra)}"


# --------------------------------------------------------------------------------------------
# docs/results.md
# --------------------------------------------------------------------------------------------
_KEY_ROW = re.compile(r"^\| `([^`]+)` \|", re.M)


@cache
def _documented_result_paths() -> tuple[tuple[str, ...], ...]:
    bodies = [body for heading, body in _sections(_read("results.md"), 2)
              if heading == "`result.json` keys"]
    assert len(bodies) == 1, "results.md needs exactly one section ## `result.json` keys"
    paths = [tuple(p.split(".")) for p in _KEY_ROW.findall(bodies[0])]
    assert len(paths) == len(set(paths)), "results.md documents a key twice"
    return tuple(paths)


def _actual_paths(value: Any, prefix: tuple[str, ...] = ()) -> Iterator[tuple[str, ...]]:
    """Every key path of a JSON value; list items add ``[]`` to their list's key."""
    if isinstance(value, dict):
        for key, item in value.items():
            path = (*prefix, key)
            yield path
            yield from _actual_paths(item, path)
    elif isinstance(value, list) and prefix:
        listed = (*prefix[:-1], f"{prefix[-1]}[]")
        for item in value:
            yield from _actual_paths(item, listed)


def _matches(documented: tuple[str, ...], actual: tuple[str, ...]) -> bool:
    if len(documented) != len(actual):
        return False
    pairs = zip(documented, actual, strict=True)
    return all(d == a or (d.startswith("<") and d.endswith(">")) for d, a in pairs)


@pytest.fixture(scope="module")
def result_records(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    """result.json of two tiny runs: one-shot with fine-tuning, and gradual (cached dense model).

    Between them they produce every conditional key (``time.prune`` and ``time.finetune`` vs
    ``time.prune_and_finetune``).
    """
    from curvprune.run.execute import execute_run

    out = tmp_path_factory.mktemp("runs")
    base = {
        "model": {"name": "digits-mlp"},
        "data": {"name": "digits"},
        "train": {"epochs": 1},
        "prune": {"sparsity": 0.5, "loss_samples": 64},
        "scorer": {"name": "magnitude"},
        "finetune": {"epochs": 1},
        "run": {"device": "cpu", "progress": False},
    }
    gradual = {**base, "schedule": {"name": "gradual", "start": 0, "end": 10, "frequency": 5}}
    records = []
    for config in (base, gradual):
        outcome = execute_run(config, out=out, quiet=True)
        records.append(json.loads((outcome.run_dir / "result.json").read_text()))
    return records


def test_result_json_keys_are_documented(result_records: list[dict[str, Any]]) -> None:
    documented = _documented_result_paths()
    actual = {p for record in result_records for p in _actual_paths(record)}
    missing = sorted(
        ".".join(p) for p in actual
        if len(p) <= 2 and not any(_matches(d, p) for d in documented)
    )
    assert not missing, f"result.json keys not documented in results.md: {missing}"


def test_results_doc_names_only_existing_keys(result_records: list[dict[str, Any]]) -> None:
    actual = {p for record in result_records for p in _actual_paths(record)}
    absent = sorted(
        ".".join(d) for d in _documented_result_paths()
        if not any(_matches(d, p) for p in actual)
    )
    assert not absent, f"results.md documents keys result.json does not have: {absent}"


def test_results_doc_names_the_schema(result_records: list[dict[str, Any]]) -> None:
    schema = result_records[0]["schema"]
    assert f"`{schema}`" in _read("results.md"), f"results.md does not name schema {schema!r}"


# --------------------------------------------------------------------------------------------
# Switches, install line, links and snippets
# --------------------------------------------------------------------------------------------
_ENV = re.compile(r"\bCURVPRUNE_[A-Z_]+[A-Z]\b")


def test_environment_switches_match_the_code() -> None:
    """Switches of the test kit belong on testing-plugins.md, all others on writing-plugins.md."""
    source = ROOT / "core" / "src" / "curvprune"
    in_code: dict[str, set[str]] = {"testing-plugins.md": set(), "writing-plugins.md": set()}
    for path in source.rglob("*.py"):
        in_kit = "testing" in path.relative_to(source).parts
        page = "testing-plugins.md" if in_kit else "writing-plugins.md"
        in_code[page] |= set(_ENV.findall(path.read_text(encoding="utf-8")))
    for page, switches in in_code.items():
        missing = switches - set(_ENV.findall(_read(page)))
        assert not missing, f"{page} does not document {sorted(missing)}"
    known = set().union(*in_code.values())
    in_docs = {m for page in PAGES for m in _ENV.findall(_read(page))}
    assert in_docs <= known, f"docs name switches the code lacks: {sorted(in_docs - known)}"


def test_quickstart_install_line_lists_every_plugin_folder() -> None:
    lines = [line for line in _read("quickstart.md").splitlines() if line.startswith("pip install")]
    assert lines, "quickstart.md has no 'pip install' line"
    installed = set(re.findall(r"-e \./((?:plugins|contrib)/[\w\-]+)", lines[0]))
    folders = {
        f"{kind}/{p.parent.name}"
        for kind in ("plugins", "contrib")
        for p in (ROOT / kind).glob("*/pyproject.toml")
        if not p.parent.name.startswith("_")
    }
    assert installed == folders, (
        f"quickstart's pip line installs {sorted(installed)}; the repo has {sorted(folders)}"
    )


def _links() -> list[tuple[str, str]]:
    return [
        (page, target)
        for page in PAGES
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", _read(page))
        if "://" not in target
    ]


@pytest.mark.parametrize(("page", "target"), _links())
def test_relative_links_resolve(page: str, target: str) -> None:
    assert (DOCS / target).exists(), f"{page} links to {target}, which does not exist"


def _fenced(language: str) -> list[Any]:
    """``pytest.param(page, index, code)`` for every fenced block of ``language``."""
    return [
        pytest.param(page, i, code, id=f"{page}:{i}")
        for page in PAGES
        for i, (lang, code) in enumerate(_FENCE.findall(_read(page)))
        if lang == language
    ]


@pytest.mark.parametrize(("page", "index", "code"), _fenced("toml"))
def test_toml_snippets_parse_and_run_configs_validate(page: str, index: int, code: str) -> None:
    raw = tomllib.loads(code)
    tables = set(_pipeline_tables())
    if not raw or not set(raw) <= tables:
        return  # not a run config (a pyproject.toml excerpt, ...): parsing is the check
    host = curvprune.get_plugin_manager()
    names = {(role, raw[role]["name"]) for role in KINDS if "name" in raw.get(role, {})}
    absent = sorted(f"{kind} {name}" for kind, name in names if (kind, name) not in host.registry)
    if absent:
        pytest.fail(f"{page} snippet {index} needs components that are not installed: {absent}")
    curvprune.Pipeline.from_config(raw, host=host)  # structure and combination checks


@pytest.mark.parametrize(("page", "index", "code"), _fenced("python"))
def test_python_snippets_compile(page: str, index: int, code: str) -> None:
    compile(code, f"{page}[{index}]", "exec")


@pytest.mark.parametrize(
    ("page", "index", "code"),
    [p for p in _fenced("python") if "from curvprune import Pipeline" in p.values[2]],
)
def test_self_contained_pipeline_snippets_run(page: str, index: int, code: str) -> None:
    """The Python examples that build a pipeline on their own data run as written."""
    exec(compile(code, f"{page}[{index}]", "exec"), {"__name__": "docs_snippet"})
