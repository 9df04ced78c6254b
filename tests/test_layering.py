"""Imports point one way: algorithm <- modules <- distributed <- phases <- trainer <- jobs; data_pipeline
imports none of the CEL code; the algorithm is pure torch."""
import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]

# package -> top-level import prefixes it must not use
FORBIDDEN = {
    "cel_torchrec/algorithm": ["torchrec", "torch.distributed", "ray", "wandb",
                               "cel_torchrec.modules", "cel_torchrec.distributed", "trainer", "jobs"],
    "cel_torchrec/modules": ["torch.distributed", "ray", "wandb", "cel_torchrec.distributed",
                             "trainer", "jobs"],
    "cel_torchrec/distributed": ["ray", "wandb", "trainer", "jobs"],
    "cel_torchrec/phases.py": ["ray", "wandb", "trainer", "jobs"],
    # the string options, read by the trainer's config without loading torch
    "cel_torchrec/choices.py": ["torch", "torchrec", "fbgemm_gpu", "numpy", "cel_torchrec.algorithm",
                                "cel_torchrec.modules", "cel_torchrec.distributed", "trainer", "jobs"],
    # the library's ClusteringConfig, reused by the trainer's config (so no torch either)
    "cel_torchrec/config.py": ["torch", "torchrec", "fbgemm_gpu", "numpy", "cel_torchrec.algorithm",
                               "cel_torchrec.modules", "cel_torchrec.distributed", "trainer", "jobs"],
    # the trainer knows no CEL math: it uses the library's public packages (modules,
    # distributed, phases, choices), never cel_torchrec.algorithm
    "trainer": ["jobs", "cel_torchrec.algorithm"],
    "data_pipeline": ["cel_torchrec", "trainer", "jobs"],
}


def _imports(path: pathlib.Path):
    tree = ast.parse(path.read_text(), filename=str(path))
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            yield node.module


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_imports_point_one_way(package):
    path = ROOT / package
    files = [path] if path.is_file() else sorted(path.rglob("*.py"))
    assert files, f"{package} has no Python files"
    bad = []
    for f in files:
        for name in _imports(f):
            for prefix in FORBIDDEN[package]:
                if name == prefix or name.startswith(prefix + "."):
                    bad.append(f"{f.relative_to(ROOT)} imports {name}")
    assert not bad, "\n".join(bad)
