"""How far the golden curves (tests/recipes/test_golden.py) move with the CPU's kernels, run by hand.

CI lands on whichever CPU it is given (AMD EPYC with AVX512-BF16, AMD with AVX2 only, Intel Xeon
with AMX); the tiny runs are fp32, but the matrix kernels a CPU picks sum in another order, and
those last-bit differences grow over six optimizer steps. One machine cannot be all three, so
this runs the golden test under every kernel path this machine can take (thread counts; MKL's
conditional-numerical-reproducibility code paths, which are other kernels with other summation
orders; ATen's vectorised kernels on and off) and prints, for each curve, the largest relative
difference from the committed golden, step by step. Record the result in
tests/recipes/golden/SPREAD.md and set test_golden.TOLERANCE from it.

    .venv/bin/python scripts/golden_spread.py            # every condition, about 5 minutes
    .venv/bin/python scripts/golden_spread.py -k dpo     # one curve family
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
GOLDEN = ROOT / "tests" / "recipes" / "golden"

CONDITIONS = {  # name: environment
    "threads=2": {"TETHER_TEST_THREADS": "2"},
    "threads=1": {"TETHER_TEST_THREADS": "1"},
    "mkl=COMPATIBLE": {"MKL_CBWR": "COMPATIBLE", "TETHER_TEST_THREADS": "2"},  # ~9 min alone
    "mkl=SSE4_2": {"MKL_CBWR": "SSE4_2", "TETHER_TEST_THREADS": "2"},
    "mkl=AVX": {"MKL_CBWR": "AVX", "TETHER_TEST_THREADS": "1"},
    "aten=default": {"ATEN_CPU_CAPABILITY": "default", "TETHER_TEST_THREADS": "2"},
}


def relative_gap(got: float, want: float, floor: float = 1e-6) -> float:
    """|got - want| / max(|want|, floor): the quantity pytest.approx(rel=...) bounds."""
    return abs(got - want) / max(abs(want), floor)


def stored_curves(golden: dict) -> dict[str, list[float]]:
    return golden["curves"] if "curves" in golden else {"loss": golden["losses"]}


def run_condition(env: dict[str, str], select: str | None) -> dict[str, dict]:
    with tempfile.TemporaryDirectory() as out:
        cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
               "tests/recipes/test_golden.py", *(["-k", select] if select else [])]
        proc = subprocess.run(cmd, cwd=ROOT, env={**os.environ, **env, "TETHER_GOLDEN_OUT": out},
                              capture_output=True, text=True)
        got = {p.stem: json.loads(p.read_text())["curves"] for p in Path(out).glob("*.json")}
        if not got:
            print(f"{env}: no curve came back; pytest said:\n{proc.stdout[-2000:]}", flush=True)
        return got


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("-k", dest="select")
    args = parser.parse_args()
    worst: dict[tuple[str, str], float] = {}
    for condition, env in CONDITIONS.items():
        for name, curves in sorted(run_condition(env, args.select).items()):
            golden = stored_curves(json.loads((GOLDEN / f"{name}.json").read_text()))
            for key, want in golden.items():
                got = curves.get(key) or next(iter(curves.values()))
                gaps = [relative_gap(g, w) for g, w in zip(got, want)]
                worst[name, key] = max(worst.get((name, key), 0.0), max(gaps))
                print(f"{condition:16s} {name:16s} {key:12s} max rel {max(gaps):.2e}  "
                      f"by step {' '.join(f'{x:.0e}' for x in gaps)}", flush=True)
    print("\nlargest relative difference over all conditions:")
    for (name, key), gap in sorted(worst.items()):
        print(f"  {name:16s} {key:12s} {gap:.2e}")


if __name__ == "__main__":
    main()
