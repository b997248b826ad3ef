"""benchmarks.plot draws saved results, and says so in one line when matplotlib is missing."""

import json
import os
import sys

import pytest

from benchmarks import plot, spread

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
RECORD = os.path.join(ROOT, "benchmarks", "results")
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


# benchmarks.e2e_vit's records (e2e_<device>_...), not e2e_dit's (e2e_dit_<device>_...).
E2E_VIT = ("e2e_cpu_", "e2e_cuda_")


def saved(prefix):
    """The newest committed results of one benchmark (kernels: no prefix)."""
    names = sorted(n for n in os.listdir(RECORD) if n.endswith(".json") and
                   (n.startswith(prefix) if prefix else n.startswith(("cpu_", "cuda_"))))
    if not names:
        pytest.skip(f"no saved {prefix or 'kernels'} results in {RECORD}")
    return os.path.join(RECORD, names[-1])


def assert_png(path):
    with open(path, "rb") as f:
        data = f.read()
    assert data.startswith(PNG_SIGNATURE) and len(data) > 10_000


def test_plot_of_the_saved_record(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    out = tmp_path / "picture.png"
    minilm = saved("minilm_")
    written = plot.main([saved(""), saved(E2E_VIT), minilm, "--out", str(out)])
    assert written == str(out)
    assert_png(out)
    captured = capsys.readouterr()
    assert f"plot {out}" in captured.out and f"{minilm} holds minilm results, not plotted" in captured.err


def test_default_picture_goes_beside_the_first_file(tmp_path):
    pytest.importorskip("matplotlib")
    results = tmp_path / "e2e_cpu_x.json"
    results.write_text(open(saved(E2E_VIT)).read())
    assert plot.main([str(results)]) == str(tmp_path / "plot_e2e_cpu_x.png")
    assert_png(tmp_path / "plot_e2e_cpu_x.png")


def test_plot_of_new_results_with_spreads_and_flags(tmp_path):
    """Results as the benchmarks now save them: whiskers from the spreads, flagged rows drawn
    apart, the r sweep with the unpatched model at r = 0."""
    pytest.importorskip("matplotlib")
    times = [1e-3, 1.1e-3, 1.2e-3]

    def kernels_row(provider, shape, speedup, flags=()):
        return {"shape": shape, "pass": "fwd", "provider": provider, "status": "ok", "speedup_vs_reference": speedup,
                "speedup_iqr_range": [speedup * 0.9, speedup * 1.1], "flags": list(flags)}

    kernels = {"benchmark": "kernels", "device": {"name": "test CPU"}, "settings": {"dtype": "float32"},
               "rows": [kernels_row("cpu", "a", 5.0), kernels_row("reference", "a", 1.0),
                        kernels_row("cpu", "b", 1299.0, ["bandwidth", "baseline"]),
                        {"shape": "b", "pass": "fwd", "provider": "triton", "status": "unavailable", "reason": "x"}]}

    def e2e_row(provider, r, images_per_s, flags=()):
        return {"model": "vit", "provider": provider, "backend": None if r == 0 else provider, "r": r, "batch": 4,
                "status": "ok", "images_per_s": images_per_s, "spread": spread.spread(times), "flags": list(flags)}

    e2e = {"benchmark": "e2e_vit", "settings": {"dtype": "float32"},
           "rows": [e2e_row("unpatched", 0, 3.0)] + [e2e_row(p, r, 3.0 + r / 4, ["spread"] if r == 8 else [])
                                                     for r in (4, 8, 16) for p in ("tome_reference", "tome_cpu")]}
    paths = []
    for name, results in (("kernels.json", kernels), ("e2e.json", e2e)):
        paths.append(str(tmp_path / name))
        with open(paths[-1], "w") as f:
            json.dump(results, f)
    out = tmp_path / "new.png"
    assert plot.main(paths + ["--out", str(out)]) == str(out)
    assert_png(out)


def test_without_matplotlib_it_says_so_in_one_line(tmp_path, monkeypatch, capsys):
    # None in sys.modules makes an import fail as if the package were not installed.
    for name in ("matplotlib", "matplotlib.figure", "matplotlib.backends", "matplotlib.backends.backend_agg"):
        monkeypatch.setitem(sys.modules, name, None)
    out = tmp_path / "picture.png"
    assert plot.main([saved(E2E_VIT), "--out", str(out)]) is None
    printed = capsys.readouterr().out
    assert printed.splitlines() == [plot.SKIPPED]
    assert "plot skipped" in printed and "pip install tome_kernels[plot]" in printed
    assert not out.exists()


def test_nothing_to_plot_is_an_error(tmp_path):
    path = tmp_path / "minilm.json"
    path.write_text(json.dumps({"benchmark": "minilm", "rows": []}))
    pytest.importorskip("matplotlib")
    with pytest.raises(SystemExit, match="nothing to plot"):
        plot.main([str(path), "--out", str(tmp_path / "x.png")])


def test_a_missing_or_broken_results_file_is_named(tmp_path, capsys):
    broken = tmp_path / "broken.json"
    broken.write_text("{not json")
    for path in (tmp_path / "missing.json", broken):
        with pytest.raises(SystemExit) as exit_info:
            plot.main([str(path), "--out", str(tmp_path / "x.png")])
        assert exit_info.value.code == 2
        assert f"cannot read results file {path}" in capsys.readouterr().err
    assert not (tmp_path / "x.png").exists()
