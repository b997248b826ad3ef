# Sourced by scripts/bench.sh and scripts/test.sh: picks the Python to run with and, on a
# machine without a GPU, sets up a virtual environment for it. Sets $PYTHON.
#
# - A python whose torch can use a GPU (the GPU machine, which may have no package
#   registry) is used as it is: nothing is installed.
# - Otherwise .venv/ is created in the repository with the pinned torch and torchvision
#   (requirements/torch.txt: PyPI's CUDA build of torch 2.11.0, which runs on a CPU too) and
#   the test, build and model tools (requirements/dev.txt). It is reused while
#   requirements/*.txt is unchanged. The first set-up downloads about 1.7 GB and takes
#   1 to 3 minutes; each step prints a line.
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
BASE_PYTHON=${TOME_PYTHON:-python3}

# torch.cuda.is_available(), not torch.version.cuda: the latter is also set in a CUDA build
# on a machine without a GPU, where the suite must run in .venv/ like on any CPU machine.
if "$BASE_PYTHON" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; then
  PYTHON=$(command -v "$BASE_PYTHON")
  echo "env: $PYTHON has a torch that can use a GPU; installing nothing" >&2
else
  VENV=$ROOT/.venv
  STAMP=$VENV/.requirements-sha256
  wanted=$(cat "$ROOT"/requirements/*.txt | sha256sum | cut -d' ' -f1)
  if [ ! -x "$VENV/bin/python" ] || [ "$(cat "$STAMP" 2>/dev/null)" != "$wanted" ]; then
    if ! "$BASE_PYTHON" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else 1)'; then
      echo "env: $BASE_PYTHON is Python $("$BASE_PYTHON" -c 'import platform; print(platform.python_version())'); the pinned requirements need 3.11 or newer (set TOME_PYTHON)" >&2
      exit 2
    fi
    start=$SECONDS
    echo "env: setting up $VENV (first time, or requirements/ changed): 1 to 3 minutes" >&2
    # --clear: a venv left half-made by an interrupted set-up starts empty.
    "$BASE_PYTHON" -m venv --clear "$VENV"
    pip_install() { "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check "$@"; }
    echo "env: [1/3] torch and torchvision (requirements/torch.txt; about 1.7 GB to download)" >&2
    pip_install -r "$ROOT/requirements/torch.txt"
    echo "env: [2/3] test, build and model tools (requirements/dev.txt)" >&2
    pip_install -r "$ROOT/requirements/dev.txt" -c "$ROOT/requirements/constraints.txt"
    # Editable, and with no extension built ahead of time: .venv/bin/python imports this
    # checkout's tome_kernels from any folder, and its first use JIT-builds the extensions
    # from csrc/ (cached), so an edited kernel is rebuilt rather than a stale build loaded.
    echo "env: [3/3] this checkout, editable (pip install -e ., no extension built now)" >&2
    # Its output only on failure: setuptools warns about every editable install.
    if ! out=$(TOME_KERNELS_NO_BUILD=1 pip_install --no-build-isolation --no-deps -e "$ROOT" 2>&1); then
      echo "$out" >&2
      exit 1
    fi
    echo "$wanted" > "$STAMP"
    echo "env: $VENV ready in $((SECONDS - start)) s" >&2
  fi
  PYTHON=$VENV/bin/python
fi
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
cd "$ROOT"
