# Sourced by scripts/bench.sh and scripts/test.sh: picks the Python to run with and, on a
# machine without a GPU, sets up a virtual environment for it. Sets $PYTHON.
#
# - A python whose torch can use a GPU (the GPU machine, which may have no package
#   registry) is used as it is: nothing is installed.
# - Otherwise .venv/ is created in the repository and given the pinned CPU torch and the
#   test and build tools. It is reused while requirements/*.txt is unchanged. A CUDA build
#   of torch on a machine without a GPU gets .venv/ too: such a python lacks the pinned
#   versions and tools (the CUDA build check has its own, scripts/env_cuda.sh).

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
    echo "env: setting up $VENV (pinned CPU torch and test tools; about a minute)" >&2
    "$BASE_PYTHON" -m venv "$VENV"
    pip_install() { "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check "$@"; }
    pip_install -r "$ROOT/requirements/torch.txt"
    pip_install -r "$ROOT/requirements/cpu.txt" -c "$ROOT/requirements/constraints.txt"
    pip_install --no-deps -r "$ROOT/requirements/no-deps.txt"
    echo "$wanted" > "$STAMP"
  fi
  PYTHON=$VENV/bin/python
fi
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
cd "$ROOT"
