"""Pool the `iserve validate --json` files of several runs: per configuration the worst |error| of
TTFT, TPOT and memory, then the median and p90 |error| over all points. Usage:
python bench/pool_validate.py RUN.json [RUN.json ...]"""

import json
import statistics
import sys
from pathlib import Path


def p90(xs: list[float]) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(0.9 * len(xs)))]


def main(paths: list[str]) -> int:
    errors: dict[str, list[float]] = {"ttft": [], "tpot": [], "memory": []}
    print(f"{'run':<10} {'config':<34} {'ttft worst':>10} {'tpot worst':>10} {'memory':>8}")
    for path in paths:
        doc = json.loads(Path(path).read_text())
        run = Path(path).stem.rsplit("-", 1)[-1]
        for c in doc["comparisons"]:
            if c.get("note"):
                print(f"{run:<10} {c['config']:<34} {c['note']}")
                continue
            worst = {}
            for p in c["points"]:
                e = p["estimated"] / p["measured"] - 1
                errors[p["what"]].append(abs(e))
                if abs(e) >= abs(worst.get(p["what"], 0.0)):
                    worst[p["what"]] = e
            print(
                f"{run:<10} {c['config']:<34} "
                + " ".join(f"{100 * worst.get(w, 0):>+9.2f}%" for w in ("ttft", "tpot"))
                + f" {100 * worst.get('memory', 0):>+7.2f}%"
            )
    print()
    for what, xs in errors.items():
        if xs:
            print(
                f"{what:<7} |error| median {100 * statistics.median(xs):.2f}%  p90 {100 * p90(xs):.2f}%  "
                f"max {100 * max(xs):.2f}%  ({len(xs)} points)"
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
