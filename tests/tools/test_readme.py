"""The README's Python examples run as written: each block on its own, as a user would paste
it, by this interpreter in a fresh process, from a folder outside the repository, with no
PYTHONPATH. So tome_kernels and timm (with the real torchvision) must be installed in this
environment, as the README's commands install them into .venv/.

Each block is followed by a line that prints, as JSON, the values the README states, which
are then compared here.
"""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import ROOT

# For each block, in README order: what the README states of it (an expression evaluated
# after the block, and the value it must give).
STATED = [
    {  # Using it
        "tuple(x.shape), tuple(size.shape)": [[8, 181, 768], [8, 181, 1]],
        "tuple(restored.shape), plan.r, tuple(plan.token_map.shape)": [[8, 197, 768], 16, [8, 197]],
    },
    {  # Beyond ToMe
        "tuple(x_p.shape), tuple(x_w.shape)": [[8, 181, 768], [8, 157, 768]],
        "grid_plan.r, tuple(h_full.shape)": [2048, [2, 4096, 320]],
        "kth_plan.num_tokens - kth_plan.r, random_plan.r": [50, 16],
    },
    {  # ToMe in a model
        "tuple(logits.shape)": [2, 1000],
        "tuple(state.size.shape), tuple(state.token_map.shape)": [[2, 41, 1], [2, 197]],
        "round(gflops, 3)": 2.706,
        "type(model).__module__": "timm.models.vision_transformer",  # the original model again
    },
    {  # BERT-style encoders
        "tuple(embedding.shape), tuple(encoded.shape)": [[2, 384], [2, 384]],
    },
    {  # Hugging Face vision models
        "tuple(image_embeds.shape), tuple(tome_kernels.patch.get_state(clip).size.shape)": [[2, 128], [2, 14, 1]],
        "tuple(out.last_hidden_state.shape), state.token_map[0, :5].tolist()": [[2, 165, 192], [0, 1, 2, 3, 4]],
        "type(dino).__module__": "transformers.models.dinov2_with_registers.modeling_dinov2_with_registers",
    },
    {  # LLaVA
        "per_image, merged, tuple(inputs['input_ids'].shape)": [64, 54, [1, 59]],
        "tuple(out.shape)": [1, 63],
    },
    {  # Diffusion models
        "tuple(kv.shape), [(c.tokens, list(c.grid), c.r) for c in calls]": [[2, 16, 32, 32],
                                                                          [[256, [16, 16], 128], [256, [16, 16], 128]]],
        "torch.equal(restored, unpatched), distance(kv) < distance(merged)": [True, True],
    },
    {  # Backends
        "sorted(available_backends())": ["cpu", "cuda", "reference", "triton"],
    },
]


def _blocks():
    text = Path(ROOT, "README.md").read_text()
    return re.findall(r"```python\n(.*?)```", text, flags=re.S)


def _clean_env():
    # No PYTHONPATH (the README's environment finds tome_kernels because it is installed) and
    # no backend override; the extension cache stays where it is, so a build is shared.
    return {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "TOME_KERNELS_BACKEND", "TRITON_INTERPRET")}


@pytest.fixture(scope="module")
def outside(tmp_path_factory):
    """A folder outside the repository, where this interpreter imports the installed
    tome_kernels; skipped (saying why) where it is not installed, as on the GPU machine,
    whose suite runs from the checkout. In the README's .venv/ it must be."""
    folder = tmp_path_factory.mktemp("user")
    done = subprocess.run([sys.executable, "-c", "import tome_kernels; print(tome_kernels.__file__)"], cwd=folder,
                          env=_clean_env(), capture_output=True, text=True, timeout=120)
    in_readme_venv = Path(sys.prefix).resolve() == Path(ROOT, ".venv").resolve()
    if done.returncode != 0:
        reason = (f"tome_kernels is not installed in {sys.executable} (bash scripts/test.sh installs it, editable, "
                  f"into .venv/): {done.stderr.strip().splitlines()[-1]}")
        if in_readme_venv:
            pytest.fail(reason)
        pytest.skip(reason)
    # The checkout under test, not some other installed copy.
    assert Path(done.stdout.strip()).resolve().is_relative_to(Path(ROOT).resolve()), done.stdout
    return folder


def test_every_block_is_checked():
    assert len(_blocks()) == len(STATED), "a README example was added or removed: update STATED"


@pytest.mark.parametrize("index", range(len(STATED)))
def test_readme_example_runs_as_written(outside, index):
    block = _blocks()[index]
    checks = list(STATED[index])
    report = f"\nimport json as _json\nprint(_json.dumps([{', '.join(f'({c})' for c in checks)}]))\n"
    script = outside / f"readme_example_{index}.py"
    script.write_text(block + report)
    done = subprocess.run([sys.executable, script.name], cwd=outside, env=_clean_env(), capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, f"README example {index}:\n{block}\nstderr:\n{done.stderr[-4000:]}"
    got = json.loads(done.stdout.strip().splitlines()[-1])
    for check, value in zip(checks, got):
        assert value == STATED[index][check], (index, check, value)
