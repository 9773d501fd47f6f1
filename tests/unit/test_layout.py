"""The layout's rules, checked on the source: pipeline/ never imports the Serve layer or the load tests, no import
cycle, the engine imports no stage, no source file over 400 lines, the public API at `pipeline`, and the CLI's error handling."""

import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("pipeline", "deployments", "loadtests")


def modules() -> dict[str, Path]:
    """module name -> file, for every module of our packages."""
    out = {}
    for pkg in PACKAGES:
        for path in (ROOT / pkg).rglob("*.py"):
            parts = path.relative_to(ROOT).with_suffix("").parts
            out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def imports_of(name: str, path: Path, known: set[str]) -> set[str]:
    """Our modules that `name` imports anywhere in its file (function-level imports included)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
            targets = [base] + [f"{base}.{a.name}" for a in node.names]
        else:
            continue
        found |= {t for t in targets if t in known and t != name}
    return found


def graph() -> dict[str, set[str]]:
    mods = modules()
    return {name: imports_of(name, path, set(mods)) for name, path in mods.items()}


def test_pipeline_never_imports_serve_layer_or_loadtests():
    bad = {m: sorted(d for d in deps if d.split(".")[0] in ("deployments", "loadtests"))
           for m, deps in graph().items() if m.split(".")[0] == "pipeline"}
    assert not {m: d for m, d in bad.items() if d}


STAGES = ("pipeline.model.encoder", "pipeline.model.trimmer")


def test_engine_imports_no_stage():
    """The decoder engine reads the hand-off types and the layer math (pipeline/model/layers.py), never a stage."""
    bad = {m: sorted(d for d in deps if d in STAGES) for m, deps in graph().items() if m.startswith("pipeline.engine")}
    assert not {m: d for m, d in bad.items() if d}


def test_no_import_cycle():
    g = graph()
    # A package's __init__ importing its own submodules is not a cycle of concern; edges into a package count.
    g = {m: {d for d in deps if not d.startswith(m + ".")} for m, deps in g.items()}
    state, stack, cycles = {}, [], []

    def visit(m):
        state[m] = "open"
        stack.append(m)
        for d in g.get(m, ()):
            if state.get(d) == "open":
                cycles.append(stack[stack.index(d):] + [d])
            elif d not in state:
                visit(d)
        stack.pop()
        state[m] = "done"

    for m in sorted(g):
        if m not in state:
            visit(m)
    assert not cycles, cycles


def test_the_checker_sees_a_cycle_and_an_upward_import(tmp_path, monkeypatch):
    """The two tests above can fail: a planted cycle and a planted upward import are found."""
    a, b = tmp_path / "a.py", tmp_path / "b.py"
    a.write_text("from pipeline import b\n")
    b.write_text("def f():\n    from pipeline.a import x\n    import deployments.app\n")
    known = {"pipeline.a", "pipeline.b", "deployments.app"}
    assert imports_of("pipeline.a", a, known) == {"pipeline.b"}
    assert imports_of("pipeline.b", b, known) == {"pipeline.a", "deployments.app"}


def test_architecture_doc_lists_every_module():
    """docs/architecture.md's "where things live" names every module: `dir/file.py`, then bare names in that dir."""
    doc = (ROOT / "docs" / "architecture.md").read_text()
    table = doc[doc.index("## Where things live"):]
    listed = set()
    for row in table.splitlines():
        base = ""
        for name in re.findall(r"`([\w/]+\.py)`", row):
            base = name.rpartition("/")[0] if "/" in name else base
            listed.add(name if "/" in name else f"{base}/{name}")
    wanted = {str(p.relative_to(ROOT)) for p in modules().values()
              if p.name != "__init__.py" or p.parent.name == "pipeline"}
    assert not sorted(wanted - listed)
    assert not sorted(listed - wanted), "the table names modules that do not exist"


DOC_PATH = r"`((?:tests|pipeline|deployments|loadtests|scripts|configs|k8s)/[\w/.-]+\.(?:py|sh|yaml|json|md|png|txt))`"


def test_docs_name_only_files_that_exist():
    """Every repository path a Markdown document names in backticks (`tests/...py`, `pipeline/...py`, ...) exists:
    files move (tests went into folders) and prose is not imported."""
    missing = []
    for doc in [*ROOT.glob("*.md"), *ROOT.glob("docs/*.md")]:
        for name in re.findall(DOC_PATH, doc.read_text()):
            if not (ROOT / name).exists():
                missing.append(f"{doc.name}: {name}")
    assert not missing


def test_no_source_file_over_400_lines():
    long = {str(p.relative_to(ROOT)): n for p in modules().values() if (n := p.read_text().count("\n")) > 400}
    assert not long


def test_no_test_file_over_600_lines():
    long = {str(p.relative_to(ROOT)): n for p in (ROOT / "tests").rglob("*.py") if (n := p.read_text().count("\n")) > 600}
    assert not long


def test_every_module_has_a_docstring():
    missing = [str(p.relative_to(ROOT)) for p in modules().values() if not ast.get_docstring(ast.parse(p.read_text()))]
    assert not missing


def test_public_api_and_light_import():
    import pipeline
    from pipeline import EngineConfig, ModelConfig, Pipeline, SamplingParams, TrimConfig  # noqa: F401

    assert {"Pipeline", "SamplingParams", "TrimConfig", "DecodeRequest"} <= set(dir(pipeline))
    with pytest.raises(AttributeError):
        pipeline.NoSuchThing  # noqa: B018
    # A locust worker or the ingress may import a light module without loading torch.
    code = "import sys, pipeline.storage, pipeline.errors; assert 'torch' not in sys.modules, 'torch loaded'"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)


def test_cli_does_not_hide_a_broken_subcommand(monkeypatch):
    from pipeline import cli

    monkeypatch.setitem(sys.modules, "pipeline.quality.evaluate", None)  # importing it now raises ImportError
    with pytest.raises(ImportError):
        cli.main(["generate", "--prompt", "hi"])


def test_cli_keeps_the_traceback_of_an_internal_error(monkeypatch):
    from pipeline import cli, inprocess

    def broken(self, *args, **kwargs):
        raise ValueError("an internal bug")

    monkeypatch.setattr(inprocess.Pipeline, "generate", broken)
    with pytest.raises(ValueError, match="an internal bug"):
        cli.main(["generate", "--prompt", "hi", "--model", "bundled:tiny-mllama"])
