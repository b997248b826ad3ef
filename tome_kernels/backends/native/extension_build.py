"""Loads the native extensions (csrc/): an installed ahead-of-time build, else a JIT build.

``load("cpu")`` / ``load("cuda")`` make the ``torch.ops.tome_native.*`` operators with that
device's kernels available, or raise :class:`ExtensionUnavailable` with the reason.

1. An ahead-of-time build installed in the package (``tome_kernels._C`` / ``_C_cuda``, from
   setup.py) wins.
2. Otherwise the sources are compiled with ``torch.utils.cpp_extension.load`` (ninja) from
   the repository's ``csrc/`` beside the package, else the copy shipped in the package
   (``tome_kernels/_csrc/``), into ``$TOME_KERNELS_CACHE`` (default
   ``~/.cache/tome_kernels``), in a folder named by a hash of every file of the source tree,
   the flags, torch, Python and the kind: a change to any of them is a new build, and an
   unchanged tree is a cache hit in any later process (also across checkouts and installs
   whose sources are identical).

Environment:
- ``TOME_KERNELS_NO_JIT=1``: never compile; a missing ahead-of-time build is the reason.
- ``TOME_KERNELS_VERBOSE_BUILD=1``: show the compiler's output while it runs.
- ``TOME_KERNELS_CACHE``: where JIT builds live.
- ``TOME_KERNELS_CSRC``: JIT-build this source tree instead; an installed ahead-of-time
  build is then ignored (asking for a source tree means wanting it compiled: the hook for
  working on the kernels over a stale in-place build, and for the tests).
- ``TORCH_CUDA_ARCH_LIST`` (cuda): the architectures, default :data:`DEFAULT_CUDA_ARCHS`.
- ``CUDA_HOME`` (cuda): the toolkit. When neither it nor ``CUDA_PATH`` is set, it is set to
  the toolkit the ``nvcc`` on PATH belongs to (:func:`cuda_home_of_nvcc`).

This file is also read by setup.py (flags and the source list), so it imports nothing
from the package and nothing heavy at import time.
"""

import contextlib
import hashlib
import importlib
import importlib.util
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import torch

__all__ = ["ExtensionUnavailable", "load", "status", "loaded_from", "build_state"]

KINDS = ("cpu", "cuda")
AOT_MODULES = {"cpu": "tome_kernels._C", "cuda": "tome_kernels._C_cuda"}
GROUPS = ("module", "cpu", "cuda")

# No -std: torch's build helpers (cpp_extension, TorchConfig.cmake) pass the standard its
# headers need (C++20 from torch 2.13; torch 2.14's ATen refuses C++17 with an #error), and
# a -std here would override theirs. The sources themselves stay within C++17.
# -fopenmp at compile AND link: at::parallel_for is inline OpenMP in the headers, so without
# it the CPU kernels would silently run on one thread. No -march: the build must be portable.
CXX_FLAGS = ["-O3", "-fopenmp"]
LD_FLAGS = ["-fopenmp"]
CUDA_CXX_FLAGS = ["-O3"]
NVCC_FLAGS = ["-O3", "--expt-relaxed-constexpr"]
# When TORCH_CUDA_ARCH_LIST is unset, torch would query the visible GPUs at build time; we
# never do. +PTX lets GPUs newer than sm_90 JIT the kernels from PTX.
DEFAULT_CUDA_ARCHS = "8.0;9.0+PTX"
# Part of the cache key: bump when this loader changes how a build is made.
BUILD_SCHEME = 1

ENV_NO_JIT = "TOME_KERNELS_NO_JIT"
ENV_VERBOSE = "TOME_KERNELS_VERBOSE_BUILD"
ENV_CACHE = "TOME_KERNELS_CACHE"
ENV_CSRC = "TOME_KERNELS_CSRC"

# The tome_kernels package folder: this file is backends/native/extension_build.py in it.
PACKAGE = Path(__file__).resolve().parents[2]


class ExtensionUnavailable(RuntimeError):
    """A native extension could not be loaded; the message says why and what to do."""


# ----------------------------------------------------------------------------- sources


def read_sources(csrc: Path) -> Dict[str, List[str]]:
    """``{group: [path relative to csrc, ...]}`` from ``csrc/sources.txt``."""
    groups: Dict[str, List[str]] = {g: [] for g in GROUPS}
    listing = Path(csrc) / "sources.txt"
    for number, line in enumerate(listing.read_text().splitlines(), 1):
        fields = line.split("#", 1)[0].split()
        if not fields:
            continue
        if len(fields) != 2 or fields[0] not in GROUPS:
            raise ValueError(f"{listing}:{number}: expected '<{'|'.join(GROUPS)}> <path>', got {line!r}")
        groups[fields[0]].append(fields[1])
    return groups


def extension_sources(groups: Dict[str, List[str]], kind: str) -> List[str]:
    """The sources of one Python extension: its group and the module file."""
    return groups["module"] + groups[kind]


def source_dir() -> Optional[Path]:
    """The source tree a JIT build would use, or None when there is none."""
    if os.environ.get(ENV_CSRC):
        return Path(os.environ[ENV_CSRC]).resolve()
    for candidate in (PACKAGE.parent / "csrc", PACKAGE / "_csrc"):
        if (candidate / "sources.txt").is_file():
            return candidate
    return None


def _tree_files(csrc: Path) -> List[Path]:
    # Hidden files (editor swap files) and caches are not sources; setup.py ships the same set.
    return sorted(
        p for p in csrc.rglob("*")
        if p.is_file() and not any(part.startswith(".") or part == "__pycache__" for part in p.relative_to(csrc).parts)
    )


def _flags(kind: str) -> Dict[str, object]:
    if kind == "cpu":
        return {"cxx": CXX_FLAGS, "ld": LD_FLAGS}
    archs = os.environ.get("TORCH_CUDA_ARCH_LIST", DEFAULT_CUDA_ARCHS)
    return {"cxx": CUDA_CXX_FLAGS, "nvcc": NVCC_FLAGS, "archs": archs}


def cache_key(kind: str, csrc: Path) -> str:
    """Hash of every file under csrc (names and contents), the flags, torch, Python, kind."""
    digest = hashlib.sha256()
    for path in _tree_files(csrc):
        digest.update(path.relative_to(csrc).as_posix().encode() + b"\0")
        digest.update(path.read_bytes() + b"\0")
    context = {
        "kind": kind, "flags": _flags(kind), "scheme": BUILD_SCHEME,
        "torch": [torch.__version__, getattr(torch.version, "git_version", None), torch.version.cuda],
        "python": [sys.version, sys.implementation.cache_tag], "machine": platform.machine(),
        "compiler": [os.environ.get("CXX"), os.environ.get("CC")],
    }
    digest.update(json.dumps(context, sort_keys=True).encode())
    return digest.hexdigest()[:20]


def cache_root() -> Path:
    default = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "tome_kernels"
    return Path(os.environ.get(ENV_CACHE) or default).expanduser()


# ----------------------------------------------------------------------------- the CUDA toolkit


def cuda_home_of_nvcc(nvcc: Optional[str] = None) -> Optional[str]:
    """The root of the CUDA toolkit that ``nvcc`` (default: the one on PATH) belongs to, or
    None: the folder whose ``include/cuda_runtime.h`` exists.

    torch's guess (cpp_extension: the parent of the folder of ``which nvcc``) is wrong when
    ``nvcc`` is a wrapper script, such as ``/usr/local/bin/nvcc`` running
    ``/usr/local/cuda-13.0/bin/nvcc "$@"``: it gives ``/usr/local``, with no CUDA headers. So
    nvcc is asked instead: ``--dryrun`` prints the real compiler's settings, among them
    ``#$ TOP=<toolkit>/bin/..``, without compiling anything (the input need not exist).
    """
    nvcc = nvcc or shutil.which("nvcc")
    if nvcc is None:
        return None
    candidates = []
    try:
        with tempfile.TemporaryDirectory() as tmp:
            proc = subprocess.run([nvcc, "--dryrun", "-c", os.path.join(tmp, "probe.cu")], cwd=tmp,
                                  capture_output=True, text=True, timeout=60)
        for line in (proc.stdout + proc.stderr).splitlines():
            setting = line.removeprefix("#$").strip()
            if setting.startswith("TOP="):
                candidates.append(setting[len("TOP="):])
            elif setting.startswith("_HERE_="):  # the real nvcc's own folder: <toolkit>/bin
                candidates.append(os.path.join(setting[len("_HERE_="):], ".."))
    except (OSError, subprocess.SubprocessError):  # not runnable: the paths below may still tell
        pass
    # A symlinked nvcc (no wrapper) resolves to its toolkit; torch's own guess comes last.
    candidates += [os.path.join(os.path.dirname(os.path.realpath(nvcc)), ".."),
                   os.path.join(os.path.dirname(nvcc), "..")]
    for candidate in candidates:
        home = os.path.realpath(candidate)
        if os.path.isfile(os.path.join(home, "include", "cuda_runtime.h")):
            return home
    return None


def use_real_cuda_home() -> Optional[str]:
    """Points torch's extension builder at the toolkit of the ``nvcc`` on PATH, unless the
    user chose one (``CUDA_HOME`` / ``CUDA_PATH``). Returns the toolkit chosen or found; None
    leaves torch's own guess in place.

    ``CUDA_HOME`` is set in the environment because cpp_extension reads it once, at import,
    and also warns naming its wrong guess then; if cpp_extension was already imported, its
    module-level ``CUDA_HOME`` (which its functions read at call time) is set as well.
    """
    chosen = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if chosen or torch.version.cuda is None:  # a CPU torch builds nothing CUDA, whatever the toolkit
        return chosen
    home = cuda_home_of_nvcc()
    if home is not None:
        os.environ["CUDA_HOME"] = home
        cpp_extension = sys.modules.get("torch.utils.cpp_extension")
        if cpp_extension is not None:
            cpp_extension.CUDA_HOME = home
    return home


# ----------------------------------------------------------------------------- loading

# One lock for the whole loader: "cuda" loads "cpu" under it (hence reentrant), and two
# threads must never build or register the same extension twice.
_lock = threading.RLock()
_loaded: Dict[str, str] = {}
_failed: Dict[str, str] = {}


def load(kind: str) -> None:
    """Make ``torch.ops.tome_native.*`` with ``kind``'s kernels available, or raise
    :class:`ExtensionUnavailable`. Idempotent and thread-safe; a failure is remembered for
    the rest of the process (later calls raise it again without retrying)."""
    _check_kind(kind)
    with _lock:
        if kind in _loaded:
            return
        if kind not in _failed:
            try:
                _loaded[kind] = _load(kind)
                return
            except ExtensionUnavailable as error:
                _failed[kind] = str(error)
            except Exception as error:  # a bad sources.txt, an unwritable cache: still a reason
                _failed[kind] = f"loading the {kind} extension failed: {type(error).__name__}: {error}"
        raise ExtensionUnavailable(_failed[kind])


def loaded_from(kind: str) -> Optional[str]:
    """The shared library that provides ``kind`` in this process (None: not loaded)."""
    _check_kind(kind)
    return _loaded.get(kind)


def status(kind: str) -> Optional[str]:
    """Why ``kind`` cannot load, as far as is known without building anything.

    A string is a reason ``load`` fails (or has failed) with. None means loaded, or nothing
    known against it: an installed or cached build, or a JIT build not yet tried, which only
    ``load`` can tell (whether the compiler accepts the sources is known by compiling them).
    """
    _check_kind(kind)
    if kind in _loaded:
        return None
    if kind in _failed:
        return _failed[kind]
    if kind == "cuda":
        if torch.version.cuda is None:
            return _no_cuda_torch()
        cpu_reason = status("cpu")
        if cpu_reason:
            return f"the cuda extension needs the cpu one, which cannot load: {cpu_reason}"
    if not os.environ.get(ENV_CSRC) and importlib.util.find_spec(AOT_MODULES[kind]) is not None:
        return None
    return _jit_obstacle(kind)


def build_state(kind: str) -> str:
    """Where ``kind``'s kernels come from here, without building anything: loaded from a
    library, an installed ahead-of-time build, a cached JIT build, or a JIT build still to
    make (with its folder), else why none can be made."""
    _check_kind(kind)
    if kind in _loaded:
        return f"loaded from {_loaded[kind]}"
    if not os.environ.get(ENV_CSRC) and importlib.util.find_spec(AOT_MODULES[kind]) is not None:
        return f"installed ahead-of-time build ({AOT_MODULES[kind]})"
    reason = status(kind)
    if reason:
        return f"cannot load: {reason}"
    csrc = source_dir()
    _, build_dir, done = _build_folder(kind, csrc)
    if done.is_file():
        return f"cached JIT build in {build_dir}"
    return f"not built yet: its first use compiles {csrc} into {build_dir} (minutes)"


def _check_kind(kind: str) -> None:
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")


def _no_cuda_torch() -> str:
    return (f"the cuda extension needs a CUDA build of torch, and this torch ({torch.__version__}) "
            "has no CUDA (torch.version.cuda is None)")


def _jit_obstacle(kind: str, aot_error: Optional[str] = None) -> Optional[str]:
    """Why a JIT build of ``kind`` cannot even start, or None."""
    if os.environ.get(ENV_NO_JIT) == "1":
        why = f"it failed to import: {aot_error}" if aot_error else f"{AOT_MODULES[kind]} is not installed"
        return (f"no ahead-of-time build of the {kind} extension is usable ({why}) and JIT builds are "
                f"disabled ({ENV_NO_JIT}=1); install the package with its extensions "
                f"(pip install --no-build-isolation .) or unset {ENV_NO_JIT}")
    csrc = source_dir()
    if csrc is None or not (csrc / "sources.txt").is_file():
        where = f"{ENV_CSRC}={os.environ[ENV_CSRC]}" if os.environ.get(ENV_CSRC) else "csrc/ or tome_kernels/_csrc/"
        return (f"no ahead-of-time build of the {kind} extension is installed and there are no sources "
                f"to build it from ({where} has no sources.txt)")
    if _build_folder(kind, csrc)[2].is_file():
        # A cached build loads without the compiler or ninja, so nothing here needs
        # cpp_extension, whose import logs "No CUDA runtime is found" with a CUDA torch on a
        # machine without a GPU: noise on every first use of the cpu backend there.
        return None
    # For either kind: cpp_extension fixes its CUDA_HOME when first imported, which a "cpu"
    # build does first, and warns then naming the toolkit it found.
    use_real_cuda_home()
    if kind == "cpu":
        # Found as cpp_extension finds it (ninja on PATH), without importing cpp_extension
        # before a build: its import logs "No CUDA runtime is found" with a CUDA torch on a
        # machine without a GPU, noise for a status query (python -m tome_kernels).
        if shutil.which("ninja") is None:
            return f"building the {kind} extension needs ninja (pip install ninja), which is not installed"
        return None
    from torch.utils import cpp_extension

    if not cpp_extension.is_ninja_available():
        return f"building the {kind} extension needs ninja (pip install ninja), which is not installed"
    if kind == "cuda" and cpp_extension.CUDA_HOME is None:
        return "building the cuda extension needs the CUDA toolkit (nvcc), and none was found; set CUDA_HOME"
    return None


def _load(kind: str) -> str:
    if kind == "cuda":
        if torch.version.cuda is None:  # fail fast: nothing CUDA can link against this torch
            raise ExtensionUnavailable(_no_cuda_torch())
        try:
            load("cpu")  # the operator schemas live in the cpu extension
        except ExtensionUnavailable as error:
            raise ExtensionUnavailable(f"the cuda extension needs the cpu one, which cannot load: {error}") from None
    aot_error = None
    if not os.environ.get(ENV_CSRC) and importlib.util.find_spec(AOT_MODULES[kind]) is not None:
        try:
            module = importlib.import_module(AOT_MODULES[kind])
            _warn_if_stale(module.__file__)
            return module.__file__
        except ImportError as error:  # e.g. built against another torch: try the sources
            aot_error = f"{type(error).__name__}: {error}"
    obstacle = _jit_obstacle(kind, aot_error)
    if obstacle:
        raise ExtensionUnavailable(obstacle)
    library = _jit_build(kind, source_dir())
    if aot_error:
        warnings.warn(f"tome_kernels: the installed {AOT_MODULES[kind]} could not be imported ({aot_error}); "
                      f"using a JIT build of the sources instead", RuntimeWarning, stacklevel=3)
    return library


def _warn_if_stale(library: str) -> None:
    # An in-place build (pip install -e .) sits beside the repository's csrc/ and keeps
    # winning after the sources change; say so rather than run old kernels silently.
    csrc = PACKAGE.parent / "csrc"
    if Path(library).resolve().parent != PACKAGE or not csrc.is_dir():
        return
    built = os.path.getmtime(library)
    newer = [p for p in _tree_files(csrc) if p.stat().st_mtime > built]
    if newer:
        more = f" (and {len(newer) - 1} more)" if len(newer) > 1 else ""
        warnings.warn(f"tome_kernels: {library} is older than {newer[0]}{more}: rebuild it "
                      f"(pip install --no-build-isolation -e .) or set {ENV_CSRC}={csrc} to JIT-build the "
                      "current sources", RuntimeWarning, stacklevel=4)


def _build_folder(kind: str, csrc: Path) -> Tuple[str, Path, Path]:
    """(cache key, the JIT build's folder, its completion mark) for this source tree and
    torch. The mark is written only after a build succeeded and loaded."""
    key = cache_key(kind, csrc)
    build_dir = cache_root() / f"{kind}-{key}"
    return key, build_dir, build_dir / "complete.json"


def _jit_build(kind: str, csrc: Path) -> str:
    key, build_dir, done = _build_folder(kind, csrc)
    name = f"tome_native_{kind}_{key}"
    library = build_dir / f"{name}{'.pyd' if os.name == 'nt' else '.so'}"
    if not done.is_file():
        build_dir.mkdir(parents=True, exist_ok=True)
        with _file_lock(build_dir / "build.lock", kind):
            if not done.is_file():  # nobody built it while we waited for the lock
                _compile(kind, csrc, name, build_dir)
                tmp = done.with_suffix(".tmp")
                tmp.write_text(json.dumps({"kind": kind, "sources": str(csrc), "torch": torch.__version__}))
                os.replace(tmp, done)
                return str(library)  # cpp_extension.load has loaded it
    try:
        torch.ops.load_library(str(library))
    except OSError as error:
        cause = f": {error.__cause__}" if error.__cause__ is not None else ""
        raise ExtensionUnavailable(f"loading the cached build {library} of the {kind} extension failed "
                                   f"({error}{cause}); "
                                   f"delete {build_dir} to rebuild it") from None
    return str(library)


@contextlib.contextmanager
def _file_lock(path: Path, kind: str):
    # Our own lock rather than only torch's baton (the "lock" file cpp_extension.load creates
    # with O_EXCL in the build directory): the baton is a file that must be deleted, so a
    # process killed during the minute-long first build (Ctrl-C) leaves it behind and every
    # later process waits on it forever. flock is released by the kernel when its holder
    # dies. Held around the whole build, it also means that a baton found inside is stale.
    try:
        import fcntl
    except ImportError:  # Windows: torch's baton alone serialises the build
        yield
        return
    with open(path, "a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            print(f"tome_kernels: waiting for another process building the {kind} extension in {path.parent}",
                  file=sys.stderr, flush=True)
            fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _excerpt(output: str, count: int = 15) -> str:
    """The compiler's first error and what follows it (later errors mostly cascade from the
    first), else the last lines; without ninja's echo of the (very long) command lines."""
    lines = [
        line[:300] for line in output.splitlines()
        if line.strip() and not line.startswith(("[", "FAILED:", "ninja: build stopped"))
        and "-MMD" not in line and not (" -o " in line and len(line) > 200)
    ]
    first = next((i for i, line in enumerate(lines) if "error" in line.lower()), None)
    return "\n".join(lines[first:first + count] if first is not None else lines[-count:])


class _BuildProgress:
    """Prints, every ``interval`` seconds while a JIT build runs, how many of its sources are
    compiled, and at the end how long the build took: a first use that compiles for minutes
    must not look hung. Compiled sources are counted as the object files ninja has written
    into the build folder (``<source>.o``, ``<source>.cuda.o``); an object left there by an
    interrupted build counts too, since ninja will not compile it again."""

    def __init__(self, kind: str, build_dir: Path, total: int, quiet: bool = False, interval: float = 15.0):
        self.kind, self.build_dir, self.total, self.interval = kind, build_dir, total, interval
        self.start = time.monotonic()
        self._done = threading.Event()
        self._thread = None
        if not quiet:  # with the compiler's own output shown, ninja already shows [k/n]
            self._thread = threading.Thread(target=self._run, name="tome_kernels-build-progress", daemon=True)
            self._thread.start()

    def compiled(self) -> int:
        return min(self.total, sum(1 for p in self.build_dir.glob("*.o")))

    def _run(self) -> None:
        while not self._done.wait(self.interval):
            print(f"tome_kernels: {self.kind} extension build: {self.compiled()} of {self.total} sources "
                  f"compiled after {time.monotonic() - self.start:.0f} s", file=sys.stderr, flush=True)

    def stop(self) -> None:
        self._done.set()
        if self._thread is not None:
            self._thread.join()
            print(f"tome_kernels: {self.kind} extension build: ended after {time.monotonic() - self.start:.0f} s",
                  file=sys.stderr, flush=True)


def _compile(kind: str, csrc: Path, name: str, build_dir: Path) -> None:
    from torch.utils import cpp_extension

    verbose = os.environ.get(ENV_VERBOSE) == "1"
    sources = [str(csrc / p) for p in extension_sources(read_sources(csrc), kind)]
    missing = [s for s in sources if not os.path.isfile(s)]
    if missing:
        raise ExtensionUnavailable(f"cannot build the {kind} extension: {csrc / 'sources.txt'} lists "
                                   f"sources that do not exist: {', '.join(missing)}")
    print(f"tome_kernels: building the {kind} extension from {csrc} into {build_dir}: {len(sources)} sources, "
          f"first use only, 1 to 4 minutes on two cores ({ENV_VERBOSE}=1 shows the compiler)",
          file=sys.stderr, flush=True)
    (build_dir / "lock").unlink(missing_ok=True)  # a stale baton: see _file_lock
    flags = _flags(kind)
    env_archs = os.environ.get("TORCH_CUDA_ARCH_LIST")
    if kind == "cuda":
        os.environ["TORCH_CUDA_ARCH_LIST"] = flags["archs"]
    progress = _BuildProgress(kind, build_dir, len(sources), quiet=verbose)
    try:
        # is_python_module=False: the extension's Python module is empty; what matters are
        # its static TORCH_LIBRARY registrations, which torch.ops.load_library (dlopen) runs.
        # No module under a hashed name lands in sys.modules, the library is recorded in
        # torch.ops.loaded_libraries, and a cache hit loads the same way without torch's
        # ninja and compiler checks.
        cpp_extension.load(
            name=name, sources=sources, extra_include_paths=[str(csrc)],
            extra_cflags=flags["cxx"], extra_ldflags=flags.get("ld", []), extra_cuda_cflags=flags.get("nvcc"),
            build_directory=str(build_dir), verbose=verbose, is_python_module=False,
        )
    except Exception as error:  # compiler errors come as RuntimeError with ninja's output
        output = str(error)
        if isinstance(error, OSError) and error.__cause__ is not None:  # dlopen's reason
            output += f"\n{error.__cause__}"
        log = build_dir / "build.log"
        log.write_text(output)
        more = f"the full output is in {log}" if not verbose else "the compiler output is above"
        raise ExtensionUnavailable(
            f"building or loading the {kind} extension of tome_kernels from {csrc} failed "
            f"({type(error).__name__}):\n{_excerpt(output)}\n"
            f"({more}; {ENV_VERBOSE}=1 shows the compiler as it runs; {ENV_NO_JIT}=1 turns JIT builds off)"
        ) from None
    finally:
        progress.stop()
        if kind == "cuda":
            if env_archs is None:
                os.environ.pop("TORCH_CUDA_ARCH_LIST", None)
            else:
                os.environ["TORCH_CUDA_ARCH_LIST"] = env_archs
