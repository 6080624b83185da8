"""Fails loudly when a PEFT or transformers release changes the internals mist-peft relies on, and keeps the
package's import structure honest (no cycles, PEFT internals in one module)."""

import ast
import inspect
from pathlib import Path

import peft
import pytest
from peft import PeftModel
from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING, PEFT_TYPE_TO_PREFIX_MAPPING, PEFT_TYPE_TO_TUNER_MAPPING
from peft.tuners.tuners_utils import BaseTuner
from transformers.integrations.peft import PeftAdapterMixin

import mist_peft
from mist_peft import MISTConfig, MISTModel, MistPeftType, _peft_compat, integration, names

PACKAGE = Path(mist_peft.__file__).parent


def test_peft_minor_series_is_the_one_the_internals_were_checked_against():
    assert peft.__version__.startswith("0.21."), "re-check _peft_compat.py against this PEFT release"


def test_transformers_accepts_this_peft_for_its_adapter_calls():
    from packaging.version import Version
    from transformers.integrations import peft as hf_peft

    # transformers >= 5.24 gates active_adapters/set_adapter/... behind PEFT 0.22 (see pyproject.toml).
    assert Version(peft.__version__) >= Version(hf_peft.MIN_PEFT_VERSION)


def test_registration_tables():
    assert PEFT_TYPE_TO_CONFIG_MAPPING["MIST"] is MISTConfig
    assert PEFT_TYPE_TO_TUNER_MAPPING["MIST"] is MISTModel
    assert PEFT_TYPE_TO_PREFIX_MAPPING["MIST"] == "mist_"
    assert MistPeftType.MIST.value.lower() + "_" == MISTModel.prefix  # transformers rebuilds the prefix this way
    assert MISTConfig().peft_type == names.MIST_TYPE and names.is_mist_config(MISTConfig())


def test_registration_is_idempotent_and_refuses_a_second_method(monkeypatch):
    _peft_compat.register(MISTConfig, MISTModel)
    assert PEFT_TYPE_TO_CONFIG_MAPPING["MIST"] is MISTConfig

    class OtherConfig(MISTConfig):
        pass

    with pytest.raises(KeyError, match="already registered as 'MIST'"):
        _peft_compat.register(OtherConfig, MISTModel)
    monkeypatch.delitem(PEFT_TYPE_TO_CONFIG_MAPPING, MistPeftType.MIST)
    monkeypatch.delitem(PEFT_TYPE_TO_TUNER_MAPPING, MistPeftType.MIST)
    with pytest.raises(KeyError, match="prefix 'mist_'"):
        _peft_compat.register(OtherConfig, MISTModel)


def test_private_state_dict_hooks_have_the_expected_signatures():
    get = inspect.signature(BaseTuner._get_adapter_state_dict)
    assert list(get.parameters) == ["model", "config", "adapter_name", "state_dict", "unwanted_adapter_names"]
    remap = inspect.signature(BaseTuner._remap_adapter_state_dict_for_load)
    assert list(remap.parameters) == ["model", "config", "adapter_name", "state_dict"]
    from peft.tuners._buffer_dict import BufferDict

    assert BufferDict is _peft_compat.BufferDict


def test_wrapped_entry_points_are_ours_and_keep_the_originals_reachable():
    assert PeftModel.save_pretrained is integration._save_pretrained
    assert PeftModel.push_to_hub is integration._push_to_hub
    assert PeftAdapterMixin.load_adapter is integration._load_adapter
    assert "save_directory" in inspect.signature(integration._original_save_pretrained).parameters
    assert "repo_id" in inspect.signature(integration._original_push_to_hub).parameters
    params = inspect.signature(integration._original_load_adapter).parameters
    assert list(params)[:5] == ["self", "peft_model_id", "adapter_name", "peft_config", "adapter_state_dict"]
    ours = inspect.signature(integration._load_adapter).parameters
    assert [p for p in params if p != "kwargs"] == [p for p in ours if p != "kwargs"]  # every option it takes
    import peft.peft_model

    assert hasattr(peft.peft_model, "safe_save_file"), "the interrupted-save test patches this name"


# --------------------------------------------------------------------------------------------- structure
def _imports(path: Path) -> list[tuple[str, bool]]:
    """(imported module relative to the package or absolute, inside a function?) for every import."""
    tree = ast.parse(path.read_text())
    in_function = {id(n) for f in ast.walk(tree) if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef))
                   for n in ast.walk(f) if isinstance(n, (ast.Import, ast.ImportFrom))}
    package = ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts[:-1])
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(a.name, id(node) in in_function) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
                targets = [mod] if node.module else [f"{mod}.{a.name}" for a in node.names]
            else:
                targets = [node.module]
            out += [(t, id(node) in in_function) for t in targets]
    return out


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def test_package_imports_have_no_cycle():
    modules = {_module_name(p): p for p in PACKAGE.rglob("*.py") if "metrics/continual_accuracy" not in str(p)}
    edges = {m: {t for t, _ in _imports(p) if t in modules and t != m} for m, p in modules.items()}
    edges = {m: {t for t in e if not m.startswith(t + ".")} for m, e in edges.items()}  # a package's own __init__
    state: dict[str, int] = {}

    def visit(m, trail):
        if state.get(m) == 1:
            raise AssertionError(f"import cycle: {' -> '.join(trail + [m])}")
        if state.get(m) == 2:
            return
        state[m] = 1
        for t in sorted(edges[m]):
            visit(t, trail + [m])
        state[m] = 2

    for m in sorted(modules):
        visit(m, [])


def test_names_imports_nothing_and_peft_compat_only_names():
    assert _imports(PACKAGE / "names.py") == []
    internal = {t for t, _ in _imports(PACKAGE / "_peft_compat.py") if t.startswith("mist_peft")}
    assert internal == {"mist_peft.names"}


@pytest.mark.parametrize("module", ["__init__.py", "_peft_compat.py", "integration.py", "names.py", "hub.py",
                                    "stacking.py", "sparse_io.py", "training.py"])
def test_no_import_inside_a_function(module):
    assert [t for t, inside in _imports(PACKAGE / module) if inside] == []
