"""A model patched by tome_kernels.patch.diffusion is an ordinary nn.Module: it deep-copies,
pickles, loads state_dicts, and serves two threads at once (tiny random diffusers models)."""

import copy
import io
import threading

import pytest
import torch

import tome_kernels.patch as tome_patch
from tests.helpers import assert_within_twice_reference_error
from tests.patch.diffusers_models import (
    NO_UNEXPECTED_NO_OPS,
    BasicTransformerBlock,
    NoMergeWarning,
    context,
    make_block,
    make_unet,
    one_thread,  # noqa: F401 (a fixture, used by every test through the mark below)
    run,
    sd_inputs,
    sdxl_unet,
    tokens,
    unet_inputs,
)

pytestmark = [NO_UNEXPECTED_NO_OPS, pytest.mark.usefixtures("one_thread")]


def patched_unet():
    # Random destinations, merged at two levels: any mix-up of passes changes the output.
    return tome_patch.diffusion(make_unet(), 0.5, max_downsample=2, merge_mlp=True, seed=7)


def assert_unpatched(model):
    assert not tome_patch.is_patched(model) and not model._forward_pre_hooks and not model._forward_hooks
    assert all(type(m) is BasicTransformerBlock for m in model.modules() if isinstance(m, BasicTransformerBlock))


def test_deepcopy_is_an_independent_patched_model():
    unet = patched_unet()
    inputs = unet_inputs()
    expected = run(unet, *inputs)
    twin = copy.deepcopy(unet)
    assert tome_patch.is_patched(twin) and tome_patch.get_state(twin) is not tome_patch.get_state(unet)
    assert torch.equal(run(twin, *inputs), expected)
    tome_patch.remove(twin)
    assert_unpatched(twin)
    assert torch.equal(run(twin, *inputs), run(make_unet(), *inputs))
    assert tome_patch.is_patched(unet) and torch.equal(run(unet, *inputs), expected)
    # And the other way round: removing from the original leaves a copy patched.
    twin = copy.deepcopy(unet)
    tome_patch.remove(unet)
    assert torch.equal(run(twin, *inputs), expected)


def test_pickle_round_trip():
    unet = patched_unet()
    inputs = unet_inputs()
    expected = run(unet, *inputs)
    buffer = io.BytesIO()
    torch.save(unet, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    assert tome_patch.is_patched(loaded) and torch.equal(run(loaded, *inputs), expected)
    tome_patch.remove(loaded)
    assert_unpatched(loaded)
    assert tome_patch.is_patched(unet) and torch.equal(run(unet, *inputs), expected)


def test_state_dict_loads_into_patched_and_unpatched_models():
    unet = patched_unet()
    inputs = unet_inputs()
    expected = run(unet, *inputs)
    weights = unet.state_dict()
    assert list(weights) == list(make_unet().state_dict())
    torch.manual_seed(1)
    for target in (make_unet(), patched_unet()):
        # Other weights first, so that the load has something to change.
        for parameter in target.parameters():
            parameter.data.normal_()
        target.load_state_dict(weights)
        tome_patch.diffusion(target, 0.5, max_downsample=2, merge_mlp=True, seed=7)
        assert torch.equal(run(target, *inputs), expected)


def test_two_threads_give_the_sequential_outputs():
    """Each thread's passes have their own latent size and seeded generators: interleaved
    calls with different latent sizes give exactly what one call at a time gives."""
    unet = patched_unet()
    jobs = {name: [unet_inputs(*size)] * 4 for name, size in (("tall", (16, 12)), ("wide", (12, 20)))}
    expected = {name: run(unet, *inputs[0]) for name, inputs in jobs.items()}
    start, results, errors = threading.Barrier(2), {name: [] for name in jobs}, []

    def work(name):
        try:
            start.wait()
            for inputs in jobs[name]:
                results[name].append(run(unet, *inputs))
            results[name].append(tome_patch.get_state(unet).recorded_size)
        except Exception as exc:  # a thread's exception is not the test's: collect it
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(name,)) for name in jobs]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors, errors
    for name, size in (("tall", (16, 12)), ("wide", (12, 20))):
        assert all(torch.equal(out, expected[name]) for out in results[name][:-1]), name
        assert results[name][-1] == size  # each thread reads its own last pass


def test_copies_warn_on_their_own():
    sdxl = tome_patch.diffusion(sdxl_unet(), 0.5)
    inputs = sd_inputs(8, 8)
    with pytest.warns(NoMergeWarning):
        run(sdxl, *inputs)
    run(sdxl, *inputs)  # said once
    with pytest.warns(NoMergeWarning):
        run(copy.deepcopy(sdxl), *inputs)


@pytest.mark.slow
def test_torch_compile():
    """A compiled patched block gives the eager result (within the rounding of the
    compiled path) and still warns once on a pass that merges nothing. Slow: dynamo breaks
    the graph at the random destinations' generator, ~20-40 s on two cores."""
    x, encoder = tokens(), context()
    block = tome_patch.diffusion(make_block(), 0.5, merge_mlp=True)
    eager = run(block, x, encoder_hidden_states=encoder)
    torch._dynamo.reset()
    compiled = run(torch.compile(block), x, encoder_hidden_states=encoder)
    exact = run(tome_patch.diffusion(make_block().double(), 0.5, merge_mlp=True), x.double(),
                encoder_hidden_states=encoder.double())
    assert_within_twice_reference_error(compiled, eager, exact)
    tome_patch.diffusion(block, 0.01)
    torch._dynamo.reset()
    with pytest.warns(NoMergeWarning, match="r = int") as caught:
        for _ in range(2):
            run(torch.compile(block), x, encoder_hidden_states=encoder)
    assert len(caught) == 1
