"""PiToMe's model patches as the authors' code configures and runs them (hchautran/PiToMe:
their DeiT / ViT, MAE and BERT patches over ``algo/pitome/merge.py``).

A tiny random timm ViT and a tiny random BertModel, patched with method="pitome" and the
authors' presets, against loops written here from the description of the authors' code: the
block as they run it (attention, the merge on the keys averaged over heads, the MLP), each
block's merges decided by a plain-Python oracle of their algorithm (float64, ``math.fsum``).
The oracle is the one of tests/contract/test_pitome_authors.py (tests/contract/pitome_oracle.py),
here without that file's handling of exact ties: random model activations have none.
"""

import copy
import math
import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
timm = pytest.importorskip("timm")
try:
    import transformers
except ImportError:  # the BERT test below is skipped, the timm ones still run
    transformers = None
needs_transformers = pytest.mark.skipif(transformers is None, reason="transformers is not installed")

import tome_kernels.patch as tome_patch  # noqa: E402
from tests.contract.pitome_oracle import decide, metric_rows  # noqa: E402
from tests.helpers import assert_within_twice_reference_error, cpu_backend_cases  # noqa: E402
from tome_kernels.patch import state as state_module  # noqa: E402

BACKENDS = ["reference", *cpu_backend_cases()]
CANDIDATES = 12  # images / sentences per batch
MIN_KEPT = 3  # of them free of near-ties in every block, or the test fails


# ---------------------------------------------------------------------------------------------
# The authors' algorithm for one batch row (the oracle).


def authors_block(keys_row, r, split, margin, alpha, form):
    """The merges of one block from its keys (H, N, Dh) of one batch row, token 0 protected
    (``pitome_oracle.decide`` on the head means of the others): (merged {source:
    destination}, in unprotected indices; the smallest decisive energy gap; the smallest
    decisive similarity gap)."""
    assert form in ("elu", "gaussian")  # continuous: no gap to the margin to check
    decision = decide(metric_rows(keys_row.double().tolist())[1:], r, split, margin, alpha, form)
    energy, sim, order, best = decision.energy, decision.sim, decision.order, decision.best
    ranks = {"alternate": range(2 * r), "halves": (r - 1, 2 * r - 1)}.get(split, range(len(order)))
    score_gaps = []
    if split == "bipartite" and len(decision.sources) > r:
        ranked = sorted(decision.sources, key=lambda s: (-sim[s][best[s]], s))
        score_gaps.append(sim[ranked[r - 1]][best[ranked[r - 1]]] - sim[ranked[r]][best[ranked[r]]])
    for s in decision.merged:
        others = [sim[s][d] for d in decision.destinations if d != best[s]]
        score_gaps.append(sim[s][best[s]] - max(others, default=-math.inf))
    energy_gaps = [energy[order[k]] - energy[order[k + 1]] for k in ranks if k + 1 < len(order)]
    return decision.merged, min(energy_gaps, default=math.inf), min(score_gaps, default=math.inf)


def step_map(n, merged, protected=1):
    """(N,) output row of every token of one block: tokens not merged in token order, each
    merged source in its destination's row."""
    into = {s + protected: d + protected for s, d in merged.items()}
    rows, row = {}, 0
    for t in range(n):
        if t not in into:
            rows[t], row = row, row + 1
    return torch.tensor([rows[into.get(t, t)] for t in range(n)])


def merge_rows(x, size, maps):
    """Size-weighted merge of x (B, N, C) and sizes by the maps (B, N), in x's dtype."""
    rows = int(maps[0].max()) + 1
    index = maps[..., None].to(x.device)
    total = size.new_zeros(x.shape[0], rows, 1).scatter_add(1, index, size)
    weighted = x.new_zeros(x.shape[0], rows, x.shape[-1]).scatter_add(1, index.expand_as(x), x * size)
    return weighted / total, total


def rounding(keys_row, delta, margin, alpha, form):
    """(|dS|, |dE|) bounds of how far the patched model's similarities and energies of one
    batch row can be from the oracle's, with the notation of tests/contract/
    test_pitome_authors.py: u = eps(float32) / 2; its keys' rows off by a relative ``delta``
    from the oracle's (0 when the oracle reads the model's own keys), which moves their unit
    rows by 2 delta and a similarity by 4 delta; its float32 scoring adds the head mean
    (H u kappa per row), the unit rows and the dot product ((2 Dh + 6) u); f is Lipschitz
    (L: 1 for elu with alpha = 1, 1 / (1 - m) for gaussian) and bounded by 1, the mean of T
    terms adds (T + 4) u. A decisive gap must exceed twice the bound (both sides move)."""
    heads, tokens, width = keys_row.shape
    values = keys_row.double()
    kappa = (values.abs().mean(0).norm(dim=-1) / values.mean(0).norm(dim=-1)).max().item()
    u = torch.finfo(torch.float32).eps / 2
    ds = 4 * delta + (2 * width + 6 + 2 * heads * kappa) * u
    lipschitz = 1.0 / (1.0 - margin) if form == "gaussian" else max(1.0, alpha)
    return ds, lipschitz * ds + (tokens + 4) * u


def authors_margins_splits(preset, blocks):
    """Their configurations, written from their patches: DeiT / ViT: margin 0.75 (1 - l / L),
    pitome_bsm in the first ceil(L / 2) blocks and pitome after; MAE: the two swapped; BERT:
    margin 0.9 - 0.25 l / L, pitome_text everywhere."""
    first = math.ceil(blocks / 2)
    if preset == "authors_text":
        return [0.9 - 0.25 * block / blocks for block in range(blocks)], ["halves"] * blocks
    early, late = ("bipartite", "alternate") if preset == "authors_vit" else ("alternate", "bipartite")
    return [0.75 * (1 - block / blocks) for block in range(blocks)], [early] * first + [late] * (blocks - first)


# ---------------------------------------------------------------------------------------------
# timm ViT.

_BUILT = {}


def tiny_vit(depth):
    """A fresh copy of a seeded ViT-S/8, narrowed to 96 features in 3 heads (Triton's
    interpreter is slow), on 32 x 32 images: 4 x 4 patches and a class token."""
    if depth not in _BUILT:
        torch.manual_seed(0)
        _BUILT[depth] = timm.create_model("vit_small_patch16_224", pretrained=False, img_size=32, patch_size=8,
                                          depth=depth, num_classes=10, embed_dim=96, num_heads=3).eval()
    return copy.deepcopy(_BUILT[depth])


def images(batch=CANDIDATES):
    return torch.randn(batch, 3, 32, 32, generator=torch.Generator().manual_seed(3))


@pytest.mark.parametrize("depth", [4, 5])
@pytest.mark.parametrize("preset", [None, "authors_vit", "authors_mae"])
def test_vit_preset_chooses_split_and_margin_per_block(depth, preset, monkeypatch):
    """patch.timm(model, r, method="pitome") takes the authors' DeiT / ViT configuration
    (preset "authors_vit"): block l of L matches with the bipartite split (their pitome_bsm)
    for l < ceil(L / 2) and the alternating one (their pitome) after, margin 0.75 (1 - l / L),
    ELU energy, alpha 1, no proportional attention; "authors_mae" swaps the splits. Read from
    the calls the blocks make, for an odd and an even L."""
    calls = []
    real = state_module.pitome_match

    def spy(keys, r, **options):
        calls.append(options)
        return real(keys, r, **options)

    monkeypatch.setattr(state_module, "pitome_match", spy)
    model = tome_patch.timm(tiny_vit(depth), 2, method="pitome", preset=preset, backend="reference")
    assert tome_patch.get_state(model).prop_attn is False
    with torch.no_grad():
        model(images(2))
    margins, splits = authors_margins_splits(preset or "authors_vit", depth)
    assert [c["split"] for c in calls] == splits
    assert [c["margin"] for c in calls] == pytest.approx(margins, rel=1e-12, abs=1e-15)
    assert {(c["energy_form"], c["alpha"], c["class_token"], c["distill_token"]) for c in calls} == {
        ("elu", 1.0, True, False)}


def authors_vit(model, x, r, preset, decided=None):
    """The authors' forward of a timm ViT, in the dtype of ``model`` and ``x``: per block,
    x = x + attn(norm1(x)) with the model's attention; the merge, on the keys (from
    attn.qkv) averaged over heads, protecting the class token; x = x + mlp(norm2(x)); then
    the final norm and the head (class-token pooling). Each block's merges are the oracle's
    on its own keys, or, given ``decided`` (the merges of a previous run), those.

    Returns (logits, keys per block, merges per block and row, gaps per block and row as
    (energy gap, similarity gap), the composed token map (B, N_input))."""
    blocks = len(model.blocks)
    margins, splits = authors_margins_splits(preset, blocks)
    with torch.no_grad():
        x = model.norm_pre(model.patch_drop(model._pos_embed(model.patch_embed(x))))
        batch, n = x.shape[:2]
        size = x.new_ones(batch, n, 1)
        token_map = torch.arange(n).repeat(batch, 1)
        all_keys, all_merged, all_gaps = [], [], []
        for index, block in enumerate(model.blocks):
            h = block.norm1(x)
            attn = block.attn
            qkv = attn.qkv(h).reshape(batch, n, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
            keys = attn.k_norm(qkv[1])
            x = x + block.ls1(attn(h))
            r_block = min(r, (n - 1) // 2)
            if decided is None:
                results = [authors_block(keys[b], r_block, splits[index], margins[index], 1.0,
                                         "elu") for b in range(batch)]
                merged, gaps = [m for m, _, _ in results], [(e, s) for _, e, s in results]
            else:
                merged, gaps = decided[index], None
            step = torch.stack([step_map(n, m) for m in merged])
            x, size = merge_rows(x, size, step)
            token_map = step.gather(1, token_map)
            n = x.shape[1]
            x = x + block.ls2(block.mlp(block.norm2(x)))
            all_keys.append(keys)
            all_merged.append(merged)
            all_gaps.append(gaps)
        return model.forward_head(model.norm(x)), all_keys, all_merged, all_gaps, token_map


def relative_row_error(keys, exact):
    """max over tokens of |row - exact row| / |exact row| of the keys averaged over heads."""
    a, b = keys.double().mean(0), exact.double().mean(0)
    return ((a - b).norm(dim=-1) / b.norm(dim=-1)).max().item()


# Triton's interpreter takes seconds per model: the odd depth only (three bipartite blocks).
VIT_CASES = [("reference", 4, "authors_vit"), ("reference", 5, "authors_vit"), ("reference", 4, "authors_mae"),
             ("cpu", 4, "authors_vit"), ("cpu", 5, "authors_vit"), ("cpu", 5, "authors_mae"),
             ("triton", 5, "authors_vit")]
MARKS = {case.values[0]: case.marks for case in cpu_backend_cases()}


@pytest.mark.parametrize("backend,depth,preset", [pytest.param(*case, marks=MARKS.get(case[0], ()))
                                                  for case in VIT_CASES])
def test_vit_end_to_end_matches_the_authors_loop(backend, depth, preset):
    """A tiny random ViT patched with method="pitome" and the preset ("authors_vit", or
    "authors_mae"), r = 3, against the authors' forward written here in float64 as truth: the
    final token map of every image is the loop's composed map, and the logits are within the
    tolerance rule (the patched model on the backend against it on the reference; for the
    reference, against the same loop in float32 with the same merges). Only images whose
    every decisive gap exceeds its rounding bound (``rounding``, with delta the float32
    loop's measured error in the keys, doubled as the tolerance rule allows the patched
    model) are compared; enough must be."""
    r = 3
    x = images()
    exact, keys64, merged, gaps, token_map = authors_vit(tiny_vit(depth).double(), x.double(), r, preset)
    loop32, keys32, _, _, _ = authors_vit(tiny_vit(depth), x, r, preset, decided=merged)
    margins, _ = authors_margins_splits(preset, depth)
    kept = []
    for b in range(x.shape[0]):
        safe = True
        for block in range(depth):
            delta = 2 * relative_row_error(keys32[block][b], keys64[block][b])
            ds, de = rounding(keys64[block][b, :, 1:], delta, margins[block], 1.0, "elu")
            energy_gap, score_gap = gaps[block][b]
            safe &= energy_gap > 2 * de and score_gap > 2 * ds
        if safe:
            kept.append(b)
    assert len(kept) >= MIN_KEPT, f"only images {kept} of {x.shape[0]} are free of near-ties"
    models = {name: tome_patch.timm(tiny_vit(depth), r, method="pitome", preset=preset, trace_source=True,
                                    backend=name) for name in dict.fromkeys(["reference", backend])}
    with torch.no_grad():
        out = {name: model(x) for name, model in models.items()}
    for name, model in models.items():
        got = tome_patch.get_state(model).token_map
        assert torch.equal(got[kept], token_map[kept]), f"{name}: token maps\n{got[kept]}\nexpected\n{token_map[kept]}"
    ref = loop32 if backend == "reference" else out["reference"]
    assert_within_twice_reference_error(out[backend][kept], ref[kept], exact[kept], msg=backend)


# ---------------------------------------------------------------------------------------------
# BERT.


def tiny_bert(layers=4):
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=97, hidden_size=32, num_hidden_layers=layers, num_attention_heads=4,
                                     intermediate_size=64, max_position_embeddings=128)
    model = transformers.BertModel(config).eval()
    model.set_attn_implementation("sdpa")
    return model


@needs_transformers
@pytest.mark.parametrize("backend", BACKENDS)
def test_bert_text_energy_matches_the_oracle(backend):
    """A tiny random BertModel patched with method="pitome" (preset "authors_text": Gaussian
    energy of width 1 - m, the r highest-energy tokens merged into the next r, margin
    0.9 - 0.25 l / L) on an unpadded batch: each layer's keys, recorded at the key
    projection (after the previous layer's merge), give the oracle's merges, [CLS]
    protected; their composition is the patched model's token map. Only sentences whose
    every decisive gap exceeds its rounding bound (``rounding``, the oracle reading the
    model's own keys) are compared; enough must be."""
    layers, r = 4, 4
    model = tome_patch.bert(tiny_bert(layers), r, method="pitome", trace_source=True, backend=backend)
    heads = model.config.num_attention_heads
    keys = []
    hooks = [layer.attention.self.key.register_forward_hook(lambda m, i, out: keys.append(out.detach()))
             for layer in model.encoder.layer]
    ids = torch.randint(1, 97, (CANDIDATES, 24), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        model(input_ids=ids, attention_mask=torch.ones_like(ids))
    for hook in hooks:
        hook.remove()
    margins, splits = authors_margins_splits("authors_text", layers)
    token_map = torch.arange(ids.shape[1]).repeat(ids.shape[0], 1)
    safe = [True] * ids.shape[0]
    for layer, k in enumerate(keys):
        batch, n, width = k.shape
        k = k.view(batch, n, heads, width // heads).transpose(1, 2)  # (B, H, N, Dh)
        r_layer = min(r, (n - 1) // 2)
        steps = []
        for b in range(batch):
            merged, energy_gap, score_gap = authors_block(k[b], r_layer, splits[layer],
                                                          margins[layer], 1.0, "gaussian")
            ds, de = rounding(k[b, :, 1:], 0.0, margins[layer], 1.0, "gaussian")
            safe[b] = safe[b] and energy_gap > 2 * de and score_gap > 2 * ds
            steps.append(step_map(n, merged))
        token_map = torch.stack(steps).gather(1, token_map)
    kept = [b for b in range(len(safe)) if safe[b]]
    assert len(kept) >= MIN_KEPT, f"only sentences {kept} of {len(safe)} are free of near-ties"
    got = tome_patch.get_state(model).token_map
    assert torch.equal(got[kept], token_map[kept]), f"token maps\n{got[kept]}\nexpected\n{token_map[kept]}"
