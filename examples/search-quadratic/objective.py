"""A tiny objective for `aimass search`: a shifted quadratic bowl with a categorical twist.

Standard library only, so it runs with any python3 on the compute nodes. It reads its
parameters from the command line (the spec's ``{x}``/``{y}``/``{shape}`` placeholders), reports
intermediate values to ``$AIMASS_RUN_DIR/metrics.jsonl`` (what pruning looks at), and prints
the final value as its last line (what the search optimises). The minimum, 0, is at
``x = 1.5, y = -0.5, shape = "bowl"``.
"""

from __future__ import annotations

import argparse
import json
import os
import time


def value(x: float, y: float, shape: str) -> float:
    """The objective: a bowl, or a tilted ridge that never gets below 0.3."""
    base = (x - 1.5) ** 2 + 2.0 * (y + 0.5) ** 2
    return base if shape == "bowl" else 0.3 + 0.5 * base + 0.2 * abs(x * y)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--x", type=float, required=True)
    parser.add_argument("--y", type=float, required=True)
    parser.add_argument("--shape", choices=["bowl", "ridge"], required=True)
    parser.add_argument("--steps", type=int, default=5, help="intermediate reports")
    parser.add_argument("--seconds", type=float, default=2.0, help="how long to 'train'")
    args = parser.parse_args()

    final = value(args.x, args.y, args.shape)
    run_dir = os.environ.get("AIMASS_RUN_DIR")
    for step in range(1, args.steps + 1):
        time.sleep(args.seconds / args.steps)
        # a "training curve" that converges to the final value
        current = final + 1.0 / step
        if run_dir:
            with open(os.path.join(run_dir, "metrics.jsonl"), "a", encoding="utf-8") as fh:
                fh.write(json.dumps({"kind": "step", "step": step, "loss": current}) + "\n")
    print(f"trial {os.environ.get('AIMASS_TRIAL_ID', '?')}: x={args.x:.4f} y={args.y:.4f}")
    print(final)  # the last line that parses as a number is the trial's value


if __name__ == "__main__":
    main()
