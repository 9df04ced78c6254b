"""The README's "CEL inside your own TorchRec model" block runs as written: a stock TorchRec
DLRM with a ClusteredEmbeddingBagCollection, sharded by DMP with the CEL sharder, trained, with
splits and reassignments from `cel_torchrec.phases`."""
import pathlib
import re
import subprocess
import sys

README = pathlib.Path(__file__).resolve().parents[2] / "README.md"


def example_code() -> str:
    text = README.read_text()
    match = re.search(r"<!-- readme-example: dlrm -->\n```python\n(.*?)```", text, re.S)
    assert match, "README lost its DLRM example block"
    return match.group(1)


def test_readme_dlrm_example_runs_and_grows_the_clusters(tmp_path):
    script = tmp_path / "example.py"
    script.write_text(example_code())
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=600,
                          cwd=README.parent)
    assert proc.returncode == 0, proc.stderr[-3000:]
    last = proc.stdout.strip().splitlines()[-1]
    # 8 split events double 1 -> 64 user and 1 -> 16 ad clusters; the loss is finite and falls
    # below the 0.693 of a constant predictor on this learnable toy label
    assert last.startswith("{'user': 64, 'ad': 16}"), last
    loss = float(re.search(r"loss ([0-9.]+)", last).group(1))
    assert 0 <= loss < 0.6, last
    assert len(example_code().strip().splitlines()) <= 50
