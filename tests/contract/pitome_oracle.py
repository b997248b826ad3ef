"""PiToMe as its authors' public code runs it (hchautran/PiToMe: ``algo/pitome/merge.py``,
``pitome`` / ``pitome_bsm`` / ``pitome_text``), as a loop oracle for one batch row.

Plain Python over floats (``math``, ``fsum`` sums), written from the description of the
authors' algorithm, not from the package: unit rows; S[i][j] their dot products (self
included); energy[i] = mean_j f(S[i][j]); the tokens ranked by energy, descending, ties to
the lower index; the split into sources and destinations; each source into its most similar
destination (ties to the lower index). The caller leaves the protected tokens out. Used by
tests/contract/test_pitome_authors.py (every backend) and tests/patch/test_patch_pitome_authors.py
(the model presets).
"""

import math
from typing import Dict, List, NamedTuple


def metric_rows(values) -> List[List[float]]:
    """The metric of one batch row as float64 rows: (N, D) as it is, keys (H, N, Dh) averaged
    over the heads (the authors' ``k.mean(1)``)."""
    if isinstance(values[0][0], list):
        heads = len(values)
        return [[math.fsum(values[h][n][d] for h in range(heads)) / heads for d in range(len(values[0][0]))]
                for n in range(len(values[0]))]
    return values


def similarities(rows: List[List[float]]) -> List[List[float]]:
    """S[i][j]: dot products of the rows scaled to unit L2 norm."""
    unit = []
    for row in rows:
        norm = math.sqrt(math.fsum(v * v for v in row))
        unit.append([v / norm for v in row])
    return [[math.fsum(a * b for a, b in zip(u, w)) for w in unit] for u in unit]


def f(s: float, margin: float, alpha: float, form: str) -> float:
    if form == "gaussian":
        return math.exp(-0.5 * ((1.0 - s) / (1.0 - margin)) ** 2)
    if form == "elu":
        z = s - margin
        return z if z > 0 else alpha * (math.exp(z) - 1.0)
    return s if s >= margin else alpha * (math.exp(s - margin) - 1.0)  # "paper"


def energies(sim: List[List[float]], margin: float, alpha: float, form: str) -> List[float]:
    return [math.fsum(f(s, margin, alpha, form) for s in row) / len(row) for row in sim]


class Decision(NamedTuple):
    """One batch row's decisions, over the unprotected tokens (indices 0 .. T-1 among them)."""

    energy: List[float]
    sim: List[List[float]]
    order: List[int]  # by energy, descending, ties to the lower index
    sources: List[int]
    destinations: List[int]
    best: Dict[int, int]  # each source's most similar destination
    merged: Dict[int, int]  # the sources that merge -> their destination


def decide(rows, r: int, split: str, margin: float, alpha: float, form: str, also_in_mean=()) -> Decision:
    """The authors' decisions on the rows of the unprotected tokens for r tokens to remove
    (already clamped to T // 2). ``also_in_mean``: rows that count in every energy's mean
    but take no role (what the energy would be if the protected tokens were not left out)."""
    extra = len(also_in_mean)
    everything = similarities(list(also_in_mean) + list(rows))
    sim = [row[extra:] for row in everything[extra:]]
    energy = energies(everything, margin, alpha, form)[extra:]
    order = sorted(range(len(rows)), key=lambda t: (-energy[t], t))
    if split == "alternate":  # their ``pitome``
        sources, destinations = order[0:2 * r:2], order[1:2 * r:2]
    elif split == "halves":  # their ``pitome_text``
        sources, destinations = order[:r], order[r:2 * r]
    else:  # "bipartite", their ``pitome_bsm``: every token, then ToMe's r best edges
        sources, destinations = order[0::2], order[1::2]
    best = {s: max(destinations, key=lambda d: (sim[s][d], -d)) for s in sources}
    merging = sorted(sources, key=lambda s: (-sim[s][best[s]], s))[:r] if split == "bipartite" else sources
    return Decision(energy, sim, order, sources, destinations, best, {s: best[s] for s in merging})
