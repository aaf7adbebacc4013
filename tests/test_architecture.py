"""The shape of the code, read from the source with `ast`: layered packages, no upward imports, no import
cycles, the toy world as a plug-in, the WebUI tag path, and no references to files outside the repository.

Every import counts, also the ones inside functions (a lazy import is still a dependency).
"""
from __future__ import annotations

import ast
import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = {"perfusion_ext": ROOT / "perfusion_ext", "perfusion_export": ROOT / "export" / "perfusion_export"}

# Layer of each module (longest matching prefix) and the layers each may import. Bottom to top:
# core < training < pipelines < toy (a plug-in) < the exporter < the WebUI glue < the CLI < the facade.
LAYERS = {
    "perfusion_ext.core": "core",
    "perfusion_ext.training": "training",
    "perfusion_ext.pipelines": "pipelines",
    "perfusion_ext.toy": "toy",
    "perfusion_export": "export",
    "perfusion_ext.webui": "webui",
    "perfusion_ext.cli": "cli",
    "perfusion_ext": "facade",  # perfusion_ext/__init__.py and __main__.py: the public API
}
ALLOWED = {
    "core": {"core"},
    "training": {"core", "training"},
    "pipelines": {"core", "training", "pipelines"},
    "toy": {"core", "training", "pipelines", "toy"},
    "export": {"core", "training", "pipelines", "export"},
    "webui": {"core", "training", "pipelines", "export", "webui"},
    "cli": {"core", "training", "pipelines", "toy", "export", "cli"},
    "facade": {"core", "training", "pipelines", "toy", "cli", "facade"},
}
# Third-party packages a layer must not import: the core is torch/safetensors/numpy only, and only the
# WebUI glue talks to the WebUI.
FORBIDDEN_THIRD_PARTY = {
    "core": {"diffusers", "transformers", "onnx", "onnxruntime", "modules", "gradio", "fastapi"},
    "training": {"diffusers", "transformers", "onnx", "onnxruntime", "modules", "gradio", "fastapi"},
}
WEBUI_ONLY = {"modules", "gradio", "fastapi", "launch"}


def _module_name(path: Path) -> str:
    for top, folder in PACKAGES.items():
        if path.is_relative_to(folder):
            parts = [top, *path.relative_to(folder).with_suffix("").parts]
            return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
    raise ValueError(path)


def _sources() -> dict[str, Path]:
    return {_module_name(p): p for folder in PACKAGES.values() for p in sorted(folder.rglob("*.py"))}


SOURCES = _sources()


def _is_package(module: str) -> bool:
    return SOURCES[module].name == "__init__.py"


def _imports(module: str) -> list[tuple[str, int]]:
    """(imported name, line) for every import statement in `module`, relative imports resolved."""
    tree = ast.parse(SOURCES[module].read_text(encoding="utf-8"))
    package = module if _is_package(module) else module.rpartition(".")[0]
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(alias.name, node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - (node.level - 1)]
                prefix = ".".join(base + ([node.module] if node.module else []))
            else:
                prefix = node.module
            for alias in node.names:  # `from pkg import mod` imports a module when pkg.mod is one of ours
                candidate = f"{prefix}.{alias.name}"
                out.append((candidate if candidate in SOURCES else prefix, node.lineno))
    return out


def _ours(name: str) -> str | None:
    """The module of ours that an imported name refers to (the longest known prefix), or None."""
    parts = name.split(".")
    for n in range(len(parts), 0, -1):
        candidate = ".".join(parts[:n])
        if candidate in SOURCES:
            return candidate
    return None


def layer_of(module: str) -> str:
    return LAYERS[max((p for p in LAYERS if module == p or module.startswith(p + ".")), key=len)]


def graph() -> dict[str, set[str]]:
    edges: dict[str, set[str]] = {m: set() for m in SOURCES}
    for module in SOURCES:
        for name, _ in _imports(module):
            target = _ours(name)
            if target is not None and target != module:
                edges[module].add(target)
    return edges


def test_every_module_has_a_layer_and_every_package_a_purpose():
    for module, path in SOURCES.items():
        assert layer_of(module) in ALLOWED, module
        if path.name == "__init__.py":
            doc = ast.get_docstring(ast.parse(path.read_text(encoding="utf-8")))
            assert doc and doc.splitlines()[0].endswith("."), f"{module}: its __init__ needs a one-line purpose"


def test_no_upward_imports():
    bad = []
    for module, targets in graph().items():
        for target in targets:
            if layer_of(target) not in ALLOWED[layer_of(module)]:
                bad.append(f"{module} ({layer_of(module)}) imports {target} ({layer_of(target)})")
    assert not bad, "\n".join(bad)


def test_no_import_cycles():
    edges = graph()
    index, low, stack, on_stack, cycles = {}, {}, [], set(), []

    def visit(v):  # Tarjan's strongly connected components
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in edges[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    assert not cycles, f"import cycles: {cycles}"


def test_third_party_imports_stay_in_their_layer():
    bad = []
    for module in SOURCES:
        layer = layer_of(module)
        for name, line in _imports(module):
            top = name.split(".")[0]
            if top in FORBIDDEN_THIRD_PARTY.get(layer, ()) or (top in WEBUI_ONLY and layer != "webui"):
                bad.append(f"{module}:{line} imports {name}")
    assert not bad, "\n".join(bad)


def test_toy_world_is_a_plugin_nothing_below_imports():
    importers = {m for m, targets in graph().items() for t in targets
                 if layer_of(t) == "toy" and layer_of(m) != "toy"}
    assert {layer_of(m) for m in importers} <= {"cli", "facade"}, importers
    assert "perfusion_ext.toy" in graph()["perfusion_ext"]  # the facade registers the plug-in


def test_webui_tag_path_is_four_files():
    """extra network → activation → hooks → gated edit; the grammar, the lookup and the clause-wise conditioning
    are leaves."""
    edges = graph()
    leaves = {"perfusion_ext.core.tags", "perfusion_ext.core.errors", "perfusion_ext.core.families",
              "perfusion_ext.core.layers", "perfusion_ext.webui.concepts", "perfusion_ext.webui.clause_conditioning"}
    path = ["perfusion_ext.webui.extra_network", "perfusion_ext.webui.activation", "perfusion_ext.core.hooks",
            "perfusion_ext.core.gated_edit"]
    for here, there in zip(path, path[1:]):
        assert there in edges[here], f"{here} does not import {there}"
        assert edges[here] - leaves - {there} - {"perfusion_ext.core.concept"} == set(), (here, edges[here])
    lookup = {"perfusion_ext.webui.concepts", "perfusion_ext.core.library", "perfusion_ext.core.concept"}
    for leaf in leaves | lookup:  # leaves never lead back onto the path
        assert not edges[leaf] & set(path), leaf


def test_family_facts_live_in_the_registry():
    """Family names as data (`"sdxl"`, `"clip_h"`, `768: "sd1"` …) appear only in core/families.py."""
    pattern = re.compile(r"""["'](sd1|sd2|sdxl|clip_l|clip_h|clip_g|stable-diffusion-v[12][^"']*)["']""")
    allowed = {"perfusion_ext.core.families"}
    bad = [f"{m}: {match.group(0)}" for m, p in SOURCES.items() if m not in allowed
           for match in pattern.finditer(p.read_text(encoding="utf-8"))]
    assert not bad, "\n".join(bad)


OUTSIDE = re.compile(r"\.\./shared|DESIGN\.md|\bissues? #?\d+|\(#\d+\)")


def test_no_reference_outside_the_repository():
    files = subprocess.run(["git", "ls-files", "*.py", "*.md", "*.sh", "*.toml", "*.txt", "*.js"], cwd=ROOT,
                           capture_output=True, text=True, check=True).stdout.split()
    bad = [f"{name}:{n}: {line.strip()}" for name in files if (ROOT / name).is_file()
           for n, line in enumerate((ROOT / name).read_text(encoding="utf-8").splitlines(), 1)
           if OUTSIDE.search(line) and name != "tests/test_architecture.py"]
    assert not bad, "\n".join(bad)


@pytest.mark.parametrize("family", ["sd1", "sd2", "sdxl", "toy"])
def test_registry_records_are_consistent(family):
    from perfusion_ext.core import families

    fam = families.get(family)
    assert sum(width for _, width in fam.encoders) == fam.text_width
    assert families.by_text_width(fam.text_width) is fam
    assert fam.train_resolution % fam.resolution_step == 0
    if fam.diffusers_configs is not None:
        assert fam.diffusers_configs["unet"]["cross_attention_dim"] == fam.text_width
        assert families.by_checkpoint_keys([fam.checkpoint_prefix + "x"]) is fam


def test_toy_plugin_agrees_with_the_toy_model():
    from perfusion_ext.core import families
    from perfusion_ext.toy import model as toy_model
    from perfusion_ext.toy import plugin

    assert families.plugin("toy") is plugin.PLUGIN
    assert plugin.MODEL_DIR == toy_model.MODEL_DIR
    assert families.get("toy").text_width == toy_model.TEXT_DIM
    assert families.sampling_defaults("toy") == toy_model.SAMPLING


def test_version_lives_in_one_place_and_heads_the_changelog():
    import perfusion_ext as pf
    from perfusion_ext.core.version import __version__

    assert pf.__version__ == __version__
    pyproject = (ROOT / "pyproject.toml").read_text(encoding="utf-8")
    assert not re.search(r"^version\s*=\s*\"", pyproject, re.M) and 'dynamic = ["version"]' in pyproject
    first = next(line for line in (ROOT / "CHANGELOG.md").read_text(encoding="utf-8").splitlines()
                 if line.startswith("## "))
    assert first.split()[1] == __version__, first


def test_public_api_is_type_hinted():
    import inspect

    import perfusion_ext as pf

    for name in pf.__all__:
        obj = getattr(pf, name)
        if not inspect.isfunction(obj):
            continue
        sig = inspect.signature(inspect.unwrap(obj))
        missing = [p for p in sig.parameters if sig.parameters[p].annotation is inspect.Parameter.empty]
        assert not missing and sig.return_annotation is not inspect.Signature.empty, (name, missing)
