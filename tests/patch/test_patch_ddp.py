"""A ToMe-patched timm ViT trained inside DistributedDataParallel (gloo, two CPU processes):
how ToMe is used in training, and the multi-machine path.

Each rank runs tests/patch/ddp_worker.py on its half of a fixed global batch; the test runs the
same steps in one process over the whole batch. Cross-entropy is a mean, so DDP's average of the
ranks' gradients is the one process's gradient, up to float32 rounding (the ranks' matmuls
see other batch sizes, and the all-reduce adds in its own order): the project's rule bounds it
(tests/helpers.py), against the same steps in float64 on the reference backend.
"""

import os
import subprocess
import sys

import pytest
import torch

pytest.importorskip("timm")
import torch.distributed as dist  # noqa: E402

from tests.helpers import ROOT, assert_within_twice_reference_error, cpu_tensor_reasons, runs_cpu_tensors  # noqa: E402
from tests.patch import ddp_worker  # noqa: E402
from tome_kernels.backends import registry  # noqa: E402

WORLD_SIZE = 2
# The backends compared, each on a patched model: the reference, and the C++ extension where it
# takes float32 CPU tensors (else its case is skipped with the reason).
BACKENDS = ["reference", pytest.param("cpu", marks=runs_cpu_tensors("cpu"))]
# Both ranks start Python, torch and timm (~5 s each on two cores) and train for seconds; a
# rank that hangs is killed at this limit (gloo's own timeout, 60 s, usually ends it first).
RUN_LIMIT_S = 180
# Tokens at the first block (4 x 4 patches and the class token), and after each of its blocks.
N_INPUT = (ddp_worker.IMG_SIZE // 16) ** 2 + 1
N_OUTPUT = N_INPUT - ddp_worker.DEPTH * ddp_worker.R

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="torch.distributed with the gloo backend is not available in this torch build")


@pytest.fixture(scope="module")
def ddp_runs(tmp_path_factory):
    """Every rank's records of its DDP training (ddp_worker.train), by backend: one run of the
    ranks for all backends, since starting them is most of the time."""
    backends = ["reference"] + [name for name in ["cpu"] if not cpu_tensor_reasons(name)]
    return run_ranks(tmp_path_factory.mktemp("ddp"), ",".join(backends))


@pytest.fixture(scope="module")
def truth():
    """The contract (the reference) in float64: the truth of every backend's steps."""
    return single_process(ddp_worker.R, "reference", torch.float64)


@pytest.fixture(scope="module")
def unpatched():
    return single_process(0, "reference", torch.float32)


def run_ranks(tmp_path, backends):
    """Every rank's records, after both exited with status 0."""
    env = {k: v for k, v in os.environ.items() if k != registry.ENV_VAR}
    env["PYTHONPATH"] = os.pathsep.join([ROOT] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    init_file, outs = tmp_path / "rendezvous", [tmp_path / f"rank{rank}.pt" for rank in range(WORLD_SIZE)]
    logs = [open(tmp_path / f"rank{rank}.log", "w+") for rank in range(WORLD_SIZE)]
    procs = [subprocess.Popen([sys.executable, "-m", "tests.patch.ddp_worker", str(rank), str(WORLD_SIZE),
                               str(init_file), backends, str(outs[rank])],
                              cwd=ROOT, env=env, stdout=logs[rank], stderr=subprocess.STDOUT)
             for rank in range(WORLD_SIZE)]
    try:
        for proc in procs:
            proc.wait(timeout=RUN_LIMIT_S)
    except subprocess.TimeoutExpired:
        pass
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    failures = []
    for rank, (proc, log) in enumerate(zip(procs, logs)):
        log.seek(0)
        if proc.returncode != 0:
            how = "killed at the limit" if proc.returncode < 0 else f"exit status {proc.returncode}"
            failures.append(f"rank {rank}: {how}; its output ends:\n{log.read()[-3000:]}")
        log.close()
    assert not failures, "\n".join(failures)
    return [torch.load(out, weights_only=True) for out in outs]


def single_process(r, backend, dtype):
    """The same steps in one process over the whole global batch. On one thread, as each rank
    runs: a model this small gains nothing from more, and spends many times the CPU on a busy
    machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        model = ddp_worker.make_model(r, backend, dtype)
        x, y = ddp_worker.global_batch(dtype)
        return ddp_worker.train(model, x, y, patched=model if r else None)
    finally:
        torch.set_num_threads(threads)


def flat(grads):
    return torch.cat([g.flatten() for g in grads.values()])


@pytest.mark.parametrize("backend", BACKENDS)
def test_ddp_training_equals_one_process_over_the_global_batch(ddp_runs, truth, unpatched, backend):
    ranks = [run[backend] for run in ddp_runs]
    one = single_process(ddp_worker.R, backend, torch.float32)
    names = list(one["params"])
    assert all(list(rank["params"]) == names for rank in ranks)

    for step, (mine, exact) in enumerate(zip(one["steps"], truth["steps"])):
        at = f"{backend}, step {step}"
        parts = [rank["steps"][step] for rank in ranks]
        # ToMe merged inside DDP: each rank's last block sees N_OUTPUT tokens, not N_INPUT.
        for rank, part in enumerate(parts):
            assert part["size"].shape == (ddp_worker.GLOBAL_BATCH // WORLD_SIZE, N_OUTPUT, 1), f"{at}, rank {rank}"
        # The ranks merged their images' tokens as the one process did, and as float64 does.
        token_map = torch.cat([part["token_map"] for part in parts])
        assert torch.equal(token_map, mine["token_map"]), f"{at}: the ranks merged other tokens"
        assert torch.equal(mine["token_map"], exact["token_map"]), f"{at}: float64 merged other tokens"
        # DDP hands every rank the same averaged gradient.
        for name in names:
            assert torch.equal(parts[0]["grads"][name], parts[1]["grads"][name]), f"{at}: {name} differs by rank"
        # Each rank's loss is the mean over its half: their mean is the global batch's loss.
        loss = torch.stack([part["loss"] for part in parts]).mean()
        assert_within_twice_reference_error(loss, mine["loss"], exact["loss"], msg=f"{at}: loss")
        for name in names:
            assert_within_twice_reference_error(parts[0]["grads"][name], mine["grads"][name],
                                                exact["grads"][name], msg=f"{at}: grad of {name}")

    for name in names:
        assert torch.equal(ranks[0]["params"][name], ranks[1]["params"][name]), f"{name} differs by rank"
        assert_within_twice_reference_error(ranks[0]["params"][name], one["params"][name], truth["params"][name],
                                            msg=f"{backend}: {name} after {ddp_worker.STEPS} steps")

    # The merging changed the training: the unpatched model's first gradient is far from DDP's
    # (relative difference 7e-2 here, against rounding at ~1e-7).
    ddp_grad, plain_grad = flat(ranks[0]["steps"][0]["grads"]), flat(unpatched["steps"][0]["grads"])
    assert (ddp_grad - plain_grad).norm() > 1e-2 * plain_grad.norm(), "the patch made no difference inside DDP"
