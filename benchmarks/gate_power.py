"""How wide the gate's paired interval is at the test set sizes the product uses, and how many
bootstrap resamples it needs: the figures the eval.* defaults are chosen from.

    python -m benchmarks.gate_power [--sizes 24,500,2426] [--csv REF.csv QUANT.csv]

There is no MLS test split here, so the per-utterance errors come from a stated model (every
parameter is a flag and is written to the JSON): utterance lengths ~ Poisson(--words) words; the
reference model's error rate per utterance ~ Beta with mean --wer and concentration
--concentration (most utterances clean, a few bad); the compared model differs from it on a share
of the utterances, by a signed amount:
  - "quantized": the same weights quantized (qat_<scheme> vs qat_fp32): --discord-quantized of the
    utterances differ, by +-1 error;
  - "other model": QAT-trained vs the baseline (qat_<scheme> vs base_fp32): --discord-other differ,
    by +-(1 + Poisson(--other-extra)) errors.
Both with no true difference (the width barely depends on it). With --csv, the pairs are instead
resampled from two `utterances_<variant>.csv` files of a real evaluate step (same ids, same order).

For each size: --draws test sets drawn from the model, each scored with contract/quality.py
`paired_difference` (the gate's own function, --samples resamples, --confidence); reports the
median and 90th percentile half-width of the upper side (high - diff), the largest true degradation
the gate then lets pass at --max-deg, and `needed_utterances` for a true difference of 0.
Then the bootstrap's own noise: the upper bound under --seeds different resample seeds, for several
resample counts, at each size. Writes benchmarks/gate_power.json.
"""
from __future__ import annotations

import argparse
import csv
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from contract.quality import needed_utterances, paired_difference  # noqa: E402

# MLS French test split: 2,426 utterances (Pratap et al. 2020, "MLS: A Large-Scale Multilingual
# Dataset for Speech Research", table of per-language splits).
MLS_FRENCH_TEST = 2426


def model_pairs(n: int, rng: np.random.Generator, a: argparse.Namespace, scenario: str):
    """((ref errors, words), (compared errors, words)) of n utterances drawn from the stated model."""
    words = np.maximum(rng.poisson(a.words, n), 3)
    mean = a.wer / 100
    p = rng.beta(mean * a.concentration, (1 - mean) * a.concentration, n)
    ref = rng.binomial(words, p)
    if scenario == "quantized":
        size = np.ones(n, dtype=np.int64)
        share = a.discord_quantized
    else:
        size = 1 + rng.poisson(a.other_extra, n)
        share = a.discord_other
    differs = rng.random(n) < share
    sign = rng.choice([-1, 1], n)
    other = np.clip(ref + differs * sign * size, 0, None)
    return (ref, words), (other, words)


def csv_pairs(ref_csv: Path, quant_csv: Path):
    """Per-utterance (errors, words) of two evaluate CSVs (columns `errors`, `words`)."""
    def read(p):
        with open(p, newline="", encoding="utf-8") as f:
            rows = list(csv.DictReader(f))
        return [r["id"] for r in rows], np.array([int(r["errors"]) for r in rows]), np.array([int(r["words"]) for r in rows])
    ia, ea, wa = read(ref_csv)
    ib, eb, wb = read(quant_csv)
    if ia != ib:
        raise SystemExit(f"{ref_csv} and {quant_csv} do not hold the same utterances in the same order")
    return (ea, wa), (eb, wb)


def resample_pairs(pairs, n: int, rng: np.random.Generator):
    idx = rng.integers(0, len(pairs[0][0]), n)
    return (pairs[0][0][idx], pairs[0][1][idx]), (pairs[1][0][idx], pairs[1][1][idx])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default=f"24,500,{MLS_FRENCH_TEST}")
    ap.add_argument("--words", type=float, default=37.0, help="mean words per utterance (~15 s clips)")
    ap.add_argument("--wer", type=float, default=5.0, help="reference model's corpus WER, percent")
    ap.add_argument("--concentration", type=float, default=2.0)
    ap.add_argument("--discord-quantized", type=float, default=0.15)
    ap.add_argument("--discord-other", type=float, default=0.5)
    ap.add_argument("--other-extra", type=float, default=1.0)
    ap.add_argument("--csv", nargs=2, type=Path, metavar=("REF_CSV", "QUANT_CSV"))
    ap.add_argument("--draws", type=int, default=20)
    ap.add_argument("--samples", type=int, default=1000)
    ap.add_argument("--confidence", type=float, default=0.95)
    ap.add_argument("--max-deg", type=float, default=0.5)
    ap.add_argument("--seeds", type=int, default=10)
    ap.add_argument("--sample-counts", default="200,1000,2000,5000")
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "gate_power.json")
    a = ap.parse_args()
    sizes = [int(s) for s in a.sizes.split(",")]
    scenarios = ["csv"] if a.csv else ["quantized", "other model"]
    real = csv_pairs(*a.csv) if a.csv else None
    started = time.time()
    out: dict = {"command": "python -m benchmarks.gate_power " + " ".join(sys.argv[1:]),
                 "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "machine": platform.processor() or platform.machine(),
                 "assumed": {k: v for k, v in vars(a).items() if k not in ("out", "csv")} | ({"csv": [str(p) for p in a.csv]} if a.csv else {}),
                 "mls_french_test_utterances": MLS_FRENCH_TEST, "widths": {}, "bootstrap_noise": {}}
    for scenario in scenarios:
        rows = []
        for n in sizes:
            rng = np.random.default_rng(n)
            half, needed = [], []
            for _ in range(a.draws):
                ref, other = resample_pairs(real, n, rng) if real else model_pairs(n, rng, a, scenario)
                d = paired_difference(other, ref, a.samples, a.confidence)
                half.append(d["high"] - d["diff"])
                needed.append(needed_utterances({**d, "diff": 0.0}, a.max_deg, a.confidence) or 0)
            med, p90 = float(np.median(half)), float(np.percentile(half, 90))
            rows.append({"utterances": n, "half_width_median": round(med, 3), "half_width_p90": round(p90, 3),
                         "largest_degradation_passed_median": round(a.max_deg - med, 3),
                         "needed_utterances_at_zero_difference_median": int(np.median(needed))})
            print(f"{scenario:12s} n={n:5d}: upper half-width median {med:.3f}, p90 {p90:.3f} points; "
                  f"passes a true degradation up to {a.max_deg - med:+.3f}; needed at 0: {int(np.median(needed))}",
                  flush=True)
        out["widths"][scenario] = rows
    for scenario in scenarios:
        out["bootstrap_noise"][scenario] = {}
        for n in sizes:
            rng = np.random.default_rng(7)
            ref, other = resample_pairs(real, n, rng) if real else model_pairs(n, rng, a, scenario)
            noise = {}
            for samples in (int(s) for s in a.sample_counts.split(",")):
                t = time.time()
                highs = [paired_difference(other, ref, samples, a.confidence, seed=s)["high"] for s in range(a.seeds)]
                noise[str(samples)] = {"upper_bound_spread": round(max(highs) - min(highs), 4),
                                       "upper_bound_sd": round(float(np.std(highs, ddof=1)), 4),
                                       "seconds_each": round((time.time() - t) / a.seeds, 3)}
                print(f"{scenario:12s} n={n}: {samples} resamples: upper bound spread over {a.seeds} seeds "
                      f"{noise[str(samples)]['upper_bound_spread']:.4f} points, sd "
                      f"{noise[str(samples)]['upper_bound_sd']:.4f}, {noise[str(samples)]['seconds_each']} s each", flush=True)
            out["bootstrap_noise"][scenario][str(n)] = noise
    out["seconds"] = round(time.time() - started, 1)
    a.out.write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
