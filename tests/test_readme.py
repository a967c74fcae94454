"""The README's Python API snippet runs as written (in a scratch directory laid out like the checkout)."""

import re
import subprocess
import sys

from conftest import GOLDEN, ROOT


def test_python_api_snippet_runs(tmp_path):
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Python API", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    work = tmp_path / "checkout"
    work.mkdir()
    (work / "specs").symlink_to(ROOT / "specs")
    (tmp_path / "shared").mkdir()
    (tmp_path / "shared" / "golden").symlink_to(GOLDEN)
    done = subprocess.run([sys.executable, "-c", code + "\nprint(logits.shape, out.shape)"], cwd=work,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.split()[:2] == ["torch.Size([2,", "1,"]
