"""Could one replayed deep run stand for several variants? Offline, from the H100 benchmark's JSON
(runs 10 + 11): for each configuration, take the 1+2-layer estimate (no deep run) and scale it by a
reference variant's ratio of its deep-run estimate to its own 1+2-layer estimate (or add their
difference), then compare with the full model. References: the variant itself (what runs now), the
fp16 variant, the variant with the same weight format, with the same weight and KV formats, with
the same weight format and pruning. Usage: python bench/probes/probe_shared_deep_run.py [RUN.json ...]
(default: the four files of runs 10 and 11 under results/)."""

import json
import statistics
import sys
from pathlib import Path

R = Path(__file__).resolve().parents[2] / "results"
DEFAULT = [
    *(f"{R}/2026-11-22-h100-fingerprint-run10/run10-{m}.json" for m in ("llama-2-7b", "llama-3-8b", "llama-2-13b")),
    f"{R}/2026-11-22-h100-fingerprint-run11/run11-llama-2-13b.json",
]


def load(paths):
    models: dict[str, dict] = {}
    for path in paths:  # later files replace earlier ones' configurations
        for m in json.loads(Path(path).read_text())["models"]:
            cur = models.setdefault(m["model"], {})
            for kind in ("comparisons", "no_replay"):
                for c in m[kind]:
                    if c["points"]:
                        cur.setdefault(c["config"], {})[kind] = {(p["what"], p["at"]): p for p in c["points"]}
    return models


def knobs(key: str) -> tuple[str, str, str]:
    _, _, w, kv, p = key.split("-")
    return w[1:], kv[2:], p[1:]


def p90(xs):
    xs = sorted(xs)
    return xs[int(0.9 * (len(xs) - 1))]


def evaluate(models, reference, mode):
    errs = {"ttft": [], "tpot": []}
    for cfgs in models.values():
        for key, d in cfgs.items():
            ref = cfgs.get(reference(key), {})
            if "no_replay" not in d or "comparisons" not in ref or "no_replay" not in ref:
                continue
            for point, p in d["no_replay"].items():
                deep, plain = ref["comparisons"].get(point), ref["no_replay"].get(point)
                if point[0] not in errs or deep is None:
                    continue
                if mode == "scale":
                    est = p["estimated"] * deep["estimated"] / plain["estimated"]
                else:
                    est = p["estimated"] + deep["estimated"] - plain["estimated"]
                errs[point[0]].append(abs(est / p["measured"] - 1))
    return errs


def main(paths):
    models = load(paths or DEFAULT)
    refs = {
        "its own deep run (now)": lambda k: k,
        "the fp16 variant's": lambda k: "tp1-pp1-wfp16-kvfp16-pnone",
        "same weight format": lambda k: "tp1-pp1-w{}-kvfp16-pnone".format(knobs(k)[0]),
        "same weight + KV format": lambda k: "tp1-pp1-w{}-kv{}-pnone".format(*knobs(k)[:2]),
        "same weight format + pruning": lambda k: "tp1-pp1-w{}-kvfp16-p{}".format(knobs(k)[0], knobs(k)[2]),
    }
    print(f"{'deep run taken from':<30} {'mode':<6} {'TTFT median':>11} {'p90':>7} {'TPOT median':>11} {'p90':>7}")
    for name, ref in refs.items():
        for mode in ("scale", "add"):
            e = evaluate(models, ref, mode)
            print(
                f"{name:<30} {mode:<6} {100 * statistics.median(e['ttft']):>10.2f}% {100 * p90(e['ttft']):>6.2f}% "
                f"{100 * statistics.median(e['tpot']):>10.2f}% {100 * p90(e['tpot']):>6.2f}%"
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
