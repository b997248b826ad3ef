"""A patched model is an ordinary nn.Module: called from several threads, copied, pickled,
saved and loaded, wrapped, compiled, it behaves as the patched model it was (issue 16, part
1). Each check runs on a timm ViT and on a BERT encoder (random weights, padded batches), with
merging on: a check that passed only because nothing merged would prove nothing."""

import copy
import io
import os
import pickle
import subprocess
import sys
import threading

import pytest
import torch
from torch import nn

timm = pytest.importorskip("timm")
transformers = pytest.importorskip("transformers")

import tome_kernels.patch as tome_patch  # noqa: E402
from tests.helpers import ROOT, assert_within_twice_reference_error  # noqa: E402


def vit():
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, depth=4, img_size=96).eval()
    return tome_patch.timm(model, 8)


def vit_inputs(seed):
    return ((torch.randn(2, 3, 96, 96, generator=torch.Generator().manual_seed(seed)),), {})


def bert():
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=97, hidden_size=32, num_hidden_layers=4, num_attention_heads=4,
                                     intermediate_size=64, max_position_embeddings=128)
    model = transformers.BertModel(config).eval()
    model.set_attn_implementation("sdpa")
    return tome_patch.bert(model, 3)


def bert_inputs(seed):
    ids = torch.randint(1, 97, (2, 24), generator=torch.Generator().manual_seed(seed))
    mask = torch.ones(2, 24, dtype=torch.long)
    mask[1, 10 + seed % 5:] = 0
    return ((), {"input_ids": ids, "attention_mask": mask})


def bert_output(out):
    return out.last_hidden_state


SUBJECTS = {
    "timm": (vit, vit_inputs, lambda out: out),
    "bert": (bert, bert_inputs, bert_output),
}


def call(subject, model, inputs):
    _, _, output = SUBJECTS[subject]
    args, kwargs = inputs
    with torch.no_grad():
        return output(model(*args, **kwargs))


def merged_tokens(model):
    """Tokens after the last block of the calling thread's last pass."""
    return tome_patch.get_state(model).size.shape[1]


def output_tokens(subject, model, inputs):
    """The token count of the model's last hidden states."""
    if subject == "timm":
        with torch.no_grad():
            return model.forward_features(*inputs[0]).shape[1]
    return call(subject, model, inputs).shape[1]


@pytest.fixture(params=sorted(SUBJECTS))
def subject(request):
    return request.param


def test_two_threads_calling_one_model(subject):
    """The issue's example: each thread's outputs equal the model's sequential outputs."""
    make, inputs, _ = SUBJECTS[subject]
    model = make()
    a, b = inputs(1), inputs(2)
    expected = {1: call(subject, model, a), 2: call(subject, model, b)}
    tokens = merged_tokens(model)
    assert tokens < tome_patch.get_state(model).num_input_tokens  # merging happened
    wrong, errors = [], []
    barrier = threading.Barrier(2)

    def work(seed, x):
        barrier.wait()
        for _ in range(20):
            try:
                if not torch.equal(call(subject, model, x), expected[seed]):
                    wrong.append(seed)
                # Each thread reads the sizes of its own last pass.
                if merged_tokens(model) != tokens:
                    wrong.append(("size", seed))
            except Exception as exc:  # recorded, not raised: a thread's exception would be lost
                errors.append(repr(exc))

    threads = [threading.Thread(target=work, args=(seed, x)) for seed, x in ((1, a), (2, b))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors, errors[:3]
    assert not wrong


def test_a_new_thread_sees_no_pass_of_another():
    model = vit()
    call("timm", model, vit_inputs(1))
    seen = []
    thread = threading.Thread(target=lambda: seen.append(tome_patch.get_state(model).size))
    thread.start()
    thread.join()
    assert seen == [None]


def check_copy(subject, original, copied):
    """``copied`` is patched, gives the original's outputs, and is independent of it."""
    _, inputs, _ = SUBJECTS[subject]
    x = inputs(3)
    assert tome_patch.is_patched(copied)
    assert tome_patch.get_state(copied) is not tome_patch.get_state(original)
    assert torch.equal(call(subject, copied, x), call(subject, original, x))
    assert merged_tokens(copied) == merged_tokens(original)
    tome_patch.remove(copied)
    assert tome_patch.is_patched(original) and not tome_patch.is_patched(copied)
    assert not any(hasattr(m, "_tome_state") for m in copied.modules())
    hooks = [h for m in copied.modules() for h in (*m._forward_hooks.values(), *m._forward_pre_hooks.values())]
    assert not any(type(h).__module__.startswith("tome_kernels") for h in hooks)
    # The original still merges, and the unpatched copy does not.
    assert output_tokens(subject, copied, x) > output_tokens(subject, original, x)


def test_deepcopy(subject):
    make, _, _ = SUBJECTS[subject]
    model = make()
    check_copy(subject, model, copy.deepcopy(model))


def test_deepcopy_after_a_forward_pass(subject):
    """The copy of a model that has run starts with no pass of its own."""
    make, inputs, _ = SUBJECTS[subject]
    model = make()
    call(subject, model, inputs(1))
    copied = copy.deepcopy(model)
    assert tome_patch.get_state(copied).size is None
    check_copy(subject, model, copied)


def test_pickle_and_torch_save(subject):
    make, _, _ = SUBJECTS[subject]
    model = make()
    check_copy(subject, model, pickle.loads(pickle.dumps(model)))
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    assert type(loaded).__name__ == type(model).__name__
    check_copy(subject, model, loaded)


def test_torch_load_in_a_fresh_process(tmp_path):
    """Unpickling makes the patched classes again where none exists yet."""
    model = vit()
    x = vit_inputs(4)[0][0]
    torch.save({"model": model, "x": x, "y": call("timm", model, ((x,), {}))}, tmp_path / "model.pt")
    script = (
        "import sys, torch, tome_kernels.patch as tp\n"
        f"saved = torch.load({str(tmp_path / 'model.pt')!r}, weights_only=False)\n"
        "model = saved['model']\n"
        "assert tp.is_patched(model)\n"
        "with torch.no_grad():\n"
        "    assert torch.equal(model(saved['x']), saved['y'])\n"
        "tp.remove(model)\n"
        "assert not tp.is_patched(model) and type(model).__module__ == 'timm.models.vision_transformer'\n"
        "print('ok')\n"
    )
    path = os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")])
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": path})
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-2000:]


def test_shallow_copy_shares_the_patch(subject):
    make, inputs, _ = SUBJECTS[subject]
    model = make()
    shallow = copy.copy(model)
    assert tome_patch.get_state(shallow) is tome_patch.get_state(model)
    assert torch.equal(call(subject, shallow, inputs(1)), call(subject, model, inputs(1)))


def test_state_dict_round_trips(subject):
    """The state_dict keeps its names while patched; weights move freely between patched
    and unpatched models."""
    make, inputs, _ = SUBJECTS[subject]
    model = make()
    plain = tome_patch.remove(make())
    assert list(model.state_dict()) == list(plain.state_dict())
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01 * torch.randn_like(p))
    plain.load_state_dict(model.state_dict())
    x = inputs(1)
    again = tome_patch.timm(plain, 8) if subject == "timm" else tome_patch.bert(plain, 3)
    assert torch.equal(call(subject, again, x), call(subject, model, x))
    fresh = make()
    fresh.load_state_dict(model.state_dict())
    assert torch.equal(call(subject, fresh, x), call(subject, model, x))


def test_save_pretrained_keeps_the_class_name(tmp_path):
    """transformers writes the class name into config.json ("architectures")."""
    model = bert()
    model.save_pretrained(tmp_path)
    loaded = transformers.AutoModel.from_pretrained(tmp_path).eval()
    assert type(loaded) is transformers.BertModel
    assert loaded.config.architectures == ["BertModel"]
    loaded.set_attn_implementation("sdpa")
    x = bert_inputs(1)
    tome_patch.bert(loaded, 3)
    assert torch.equal(call("bert", loaded, x), call("bert", model, x))


def test_model_ema_tracks_a_patched_model():
    """timm's ModelEmaV3 deep-copies the model (the issue: the copy raised)."""
    from timm.utils import ModelEmaV3

    model = vit()
    ema = ModelEmaV3(model, decay=0.5)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01)
    ema.update(model)
    x = vit_inputs(1)
    assert tome_patch.is_patched(ema.module)
    out = call("timm", ema.module, x)
    assert out.shape == call("timm", model, x).shape and not torch.equal(out, call("timm", model, x))
    assert merged_tokens(ema.module) == merged_tokens(model)


@pytest.mark.parametrize("wrap", ["data_parallel", "functional_call", "sequential", "double"])
def test_wrapped_models(subject, wrap):
    make, inputs, output = SUBJECTS[subject]
    model = make()
    x = inputs(1)
    expected = call(subject, model, x)
    args, kwargs = x
    with torch.no_grad():
        if wrap == "data_parallel":
            # Without GPUs DataParallel runs the module itself: it must still merge.
            got = output(nn.DataParallel(model)(*args, **kwargs))
        elif wrap == "functional_call":
            params = {name: p.clone() for name, p in model.named_parameters()}
            got = output(torch.func.functional_call(model, params, args, kwargs))
        elif wrap == "sequential":
            if subject == "bert":
                pytest.skip("BertModel takes keyword inputs, which nn.Sequential does not pass")
            got = nn.Sequential(nn.Identity(), model)(*args)
        else:
            model64 = copy.deepcopy(model).double()
            got = output(model64(*[a.double() for a in args], **kwargs))
            assert got.dtype == torch.float64
            got = got.float()
            # float64 merges the same tokens here: the same token count, close values.
            assert got.shape == expected.shape
            torch.testing.assert_close(got, expected, rtol=1e-3, atol=1e-4)
            return
    assert torch.equal(got, expected)


@pytest.mark.parametrize("padded", [False, True])
def test_torch_compile_fullgraph_of_a_patched_bert(padded):
    """A compiled pass takes the padded path for any mask, so the unpadded batch checks
    that it merges the same tokens as eager."""
    model = bert()
    x = bert_inputs(1)
    if not padded:
        x[1]["attention_mask"].fill_(1)
    expected = call("bert", model, x)
    sizes = tome_patch.get_state(model).size.clone()
    exact = call("bert", tome_patch.bert(copy.deepcopy(model).double(), 3), x)
    compiled = torch.compile(model, fullgraph=True, backend="eager")
    got = call("bert", compiled, x)
    assert torch.equal(tome_patch.get_state(model).size > 0.5, sizes > 0.5)
    assert_within_twice_reference_error(got, expected, exact)


@pytest.mark.parametrize("not_a_module", [None, "vit", 3])
def test_remove_and_get_state_refuse_what_is_not_a_module(not_a_module):
    with pytest.raises(TypeError, match="model must be a torch.nn.Module"):
        tome_patch.remove(not_a_module)
    with pytest.raises(TypeError, match="model must be a torch.nn.Module"):
        tome_patch.get_state(not_a_module)
    assert not tome_patch.is_patched(not_a_module)
    # An unpatched module is returned as it is.
    plain = nn.Linear(2, 2)
    assert tome_patch.remove(plain) is plain
