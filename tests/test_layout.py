"""The package layout stays true: imports run one way, no cycles; old checkpoints still load."""
import ast
from pathlib import Path

import numpy as np
import torch

from tests import import_graph

FIXTURE = Path(__file__).resolve().parent / "fixtures" / "legacy_moe_ckpt"


def test_imports_run_one_way_without_cycles():
    graph = import_graph.edges()
    assert len(graph) > 50  # the walk found the packages
    assert import_graph.upward(graph) == []
    assert import_graph.cycles(graph) == []
    pk = import_graph.package_graph(graph)
    assert pk["kernels"] == set()
    assert not pk["archs"] & {"cluster", "parallel", "jobs"}
    assert not pk["moe"] & {"archs", "cluster", "parallel", "jobs"}
    assert "jobs" not in pk["cluster"]


def test_the_checker_sees_imports_inside_functions_and_cycles(tmp_path):
    """The helper on a planted tree: an upward import hidden in a function, and a two-file cycle."""
    for pkg in import_graph.ORDER:
        (tmp_path / pkg).mkdir()
        (tmp_path / pkg / "__init__.py").write_text("")
    (tmp_path / "moe" / "a.py").write_text("def f():\n    from cluster.x import y\n")
    (tmp_path / "cluster" / "x.py").write_text("from . import z\ny = 1\n")
    (tmp_path / "cluster" / "z.py").write_text("import cluster.x\n")
    graph = import_graph.edges(tmp_path)
    assert import_graph.upward(graph) == [("moe.a", "cluster.x")]
    assert import_graph.cycles(graph) == [["cluster.x", "cluster.z"]]


def test_model_packages_import_no_orchestration():
    """archs/ and moe/ declare config help with typing.Annotated: no import of cluster/ at all."""
    root = import_graph.ROOT
    for pkg in ("archs", "moe", "kernels"):
        for path in (root / pkg).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.ImportFrom) and node.module:
                    assert node.module.split(".")[0] not in {"cluster", "parallel", "jobs", "ray"}, (path, node.module)


def test_a_checkpoint_written_before_the_layout_change_loads_with_the_same_logits():
    """tests/fixtures/legacy_moe_ckpt was written by commit c07eaae's code (make_legacy_moe_ckpt.py):
    a debug MoE model (bias balancing on) after 3 AdamW steps, and its evaluation logits."""
    import archs
    from cluster import checkpoint
    from cluster.config.job import model_from_dict
    from cluster.train.optim import build_optimizer

    ckpt = FIXTURE / checkpoint.dir_name(3)
    meta = checkpoint.read_meta(ckpt)
    cfg = model_from_dict(meta["model"])
    torch.manual_seed(123)  # another init: everything must come from the file
    model = archs.build(cfg)
    opt = build_optimizer(model, 1e-2, 0.1, (0.9, 0.95))
    state = checkpoint.load(ckpt, model, opt, cfg, rank=0, world_size=1)
    assert state["step"] == 3
    assert any(s.get("exp_avg") is not None for s in opt.state.values())  # optimizer moments came back
    expected = np.load(FIXTURE / "expected.npz")
    model.eval()
    with torch.no_grad():
        logits = model(torch.from_numpy(expected["tokens"]))
    np.testing.assert_allclose(logits.numpy(), expected["logits"], rtol=0, atol=1e-6)
