"""The README's Python examples run as written."""

import os
import re

from tests.helpers import ROOT


def test_readme_examples_run():
    with open(os.path.join(ROOT, "README.md")) as f:
        blocks = re.findall(r"```python\n(.*?)```", f.read(), flags=re.S)
    assert len(blocks) >= 2
    namespace = {}
    for block in blocks:
        exec(compile(block, "README.md", "exec"), namespace)
    assert namespace["x"].shape == (8, 181, 768) and namespace["size"].shape == (8, 181, 1)
    assert namespace["restored"].shape == (8, 197, 768) and namespace["plan"].r == 16
    # Beyond ToMe: the shapes the README states.
    assert namespace["x_p"].shape == (8, 181, 768) and namespace["x_w"].shape == (8, 157, 768)
    assert namespace["grid_plan"].r == 2048 and namespace["h_full"].shape == (2, 4096, 320)
    kth_plan = namespace["kth_plan"]
    assert kth_plan.num_tokens - kth_plan.r == 50 and namespace["random_plan"].r == 16
    # ToMe in a model: the shapes and the FLOP count the README states.
    assert namespace["logits"].shape == (2, 1000)
    assert namespace["state"].size.shape == (2, 41, 1) and namespace["state"].token_map.shape == (2, 197)
    assert round(namespace["gflops"], 3) == 2.706
