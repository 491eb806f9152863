"""The files import one way: utils, cli, plot <- reward, data, checkpoint, algos, launch <- rollout, critic,
vllm_engine <- evaluate, update <- train_ppo <- the other entry points (train_grpo, replay, benchmark,
data.curate). Every import, including those inside functions, is checked, and every module imports alone in
a fresh interpreter; no private name (`_x`) is imported across modules."""

import ast

import pytest
from conftest import ROOT, run_script

LAYERS = {
    "utils": 0, "cli": 0, "plot": 0,
    "reward": 1, "data.loading": 1, "data.synthetic": 1, "checkpoint": 1, "algos": 1, "launch": 1,
    "rollout": 2, "critic": 2, "vllm_engine": 2,
    "evaluate": 3, "update": 3,
    "train_ppo": 4,
    "train_grpo": 5, "benchmark": 5, "data.curate": 5, "replay": 5,
}


def module_path(name: str):
    return ROOT / (name.replace(".", "/") + ".py")


def imports_of(name: str) -> list[tuple[str, list[str], int]]:
    """(imported project module, imported names, line) for every import statement in module `name`."""
    tree = ast.parse(module_path(name).read_text(encoding="utf-8"))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module:
            target = node.module
            names = [a.name for a in node.names]
            if target == "data":  # `from data import loading`
                target, names = f"data.{names[0]}", []
            found.append((target, names, node.lineno))
        elif isinstance(node, ast.Import):
            found += [(a.name, [], node.lineno) for a in node.names]
    return [(t, n, line) for t, n, line in found if t in LAYERS]


def test_every_project_module_is_in_a_layer():
    files = {str(p.relative_to(ROOT).with_suffix("")).replace("/", ".") for p in ROOT.glob("*.py")}
    files |= {f"data.{p.stem}" for p in (ROOT / "data").glob("*.py") if p.stem != "__init__"}
    assert files == set(LAYERS)


@pytest.mark.parametrize("name", sorted(LAYERS))
def test_imports_flow_one_way_without_private_names(name):
    for target, names, line in imports_of(name):
        assert LAYERS[target] <= LAYERS[name], f"{name}:{line} imports {target}, a higher layer"
        private = [n for n in names if n.startswith("_")]
        assert not private, f"{name}:{line} imports private {private} from {target}"


@pytest.mark.parametrize("name", sorted(LAYERS))
def test_each_module_imports_alone(name):
    result = run_script("-c", f"import {name}", timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
