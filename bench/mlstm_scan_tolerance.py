"""The errors behind tests/reference.py's MLSTM_SCAN_GRAD_* tolerances: test_mlstm_scan_matches_the_chunkwise_form's
comparison (mLSTM on the scan kernels in GPU interpret mode against xlstm.mlstm_chunked in float32, on the same
inputs) over many draws, one JSON line per draw with each output's and gradient's error (relative RMS in
bfloat16, relative max in float32, as the test measures them), then a summary per quantity.

    JAX_PLATFORMS=cpu python bench/mlstm_scan_tolerance.py --dtype bfloat16 --seeds 0-71,809549362
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent.parent / "tests"))
import test_scan_kernels as scan_tests  # noqa: E402
from reference import relative_error, relative_rms_error  # noqa: E402

GRADIENTS = ("q", "k", "v", "log_i", "log_f")


def seeds(text):
    for part in text.split(","):
        low, _, high = part.partition("-")
        yield from range(int(low), int(high) + 1) if high else [int(low)]


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    parser.add_argument("--seeds", default="0-71")
    args = parser.parse_args()
    error = relative_rms_error if args.dtype == "bfloat16" else relative_error
    rows = []
    for seed in seeds(args.seeds):
        rng = np.random.default_rng(seed)  # as the rng fixture with ZOO_TEST_SEED=seed
        ((h, _), grads), ((h_ref, _), grads_ref) = scan_tests.mlstm_against_chunkwise(rng, "gpu", args.dtype)
        row = {"seed": seed, "h": error(h, h_ref),
               **{n: error(grads[n], grads_ref[n]) for n in GRADIENTS},
               "C": error(grads["state"]["C"], grads_ref["state"]["C"])}
        print(json.dumps(row), flush=True)
        rows.append(row)
    for key in ("h", *GRADIENTS, "C"):
        values = sorted(r[key] for r in rows)
        print(f"{key}: median {statistics.median(values):.2e}, p95 {values[max(0, int(0.95 * len(values)) - 1)]:.2e}, "
              f"max {values[-1]:.2e} (seed {max(rows, key=lambda r: r[key])['seed']})")


if __name__ == "__main__":
    main()
