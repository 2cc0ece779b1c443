"""The README's runnable examples (```python blocks) run and their assertions hold.

Blocks fenced as ```py are illustrative (signatures, files that do not exist here)
and are not run.
"""

import pathlib
import re

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"


def test_readme_python_blocks_run():
    blocks = re.findall(r"^```python\n(.*?)^```", README.read_text(), re.S | re.M)
    assert len(blocks) >= 3, "the README lost its runnable examples"
    namespace = {}
    for i, block in enumerate(blocks):
        exec(compile(block, f"README.md python block {i + 1}", "exec"), namespace)
    assert namespace["w2"].dtype.name == "float32"  # the folding example ran to the end
