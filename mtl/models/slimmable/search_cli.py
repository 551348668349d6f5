"""``python -m mtl.models.slimmable.search_cli RUN_DIR/width_table.json --budget 40M --preference depth=0.7,semseg=0.3 [--method rule]``

Prints the configuration the controller picks for a FLOPs budget (per image; K/M/G suffixes) and a task
preference vector (non-negative, summing to 1; tasks not named get 0), its FLOPs and the validation
metrics expected there. ``--json`` prints it as JSON.
"""
from __future__ import annotations

import argparse
import json
import math
import sys

from mtl.io import strict_json
from mtl.models.slimmable.control import SEARCH_METHODS, parse_budget, search
from mtl.models.slimmable.table import WidthTable

def parse_preference(text: str, tasks: list[str]) -> dict[str, float]:
    pref = {t: 0.0 for t in tasks}
    seen = set()
    for part in filter(None, (p.strip() for p in text.split(","))):
        name, sep, value = part.partition("=")
        if not sep:
            raise ValueError(f"--preference entries look like task=value, got {part!r}")
        if name.strip() in seen:
            raise ValueError(f"--preference names task {name.strip()!r} twice")
        seen.add(name.strip())
        try:
            pref[name.strip()] = float(value)
        except ValueError:
            raise ValueError(f"--preference value of {name.strip()!r} is not a number: {value!r}") from None
    return pref


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m mtl.models.slimmable.search_cli", description=__doc__.splitlines()[2])
    ap.add_argument("table", help="width_table.json of a slimmable run (written by experiment=scenes_slimmable)")
    ap.add_argument("--budget", required=True, help="FLOPs per image, e.g. 42M")
    ap.add_argument("--preference", required=True, help="task=value,... (non-negative, sum 1)")
    ap.add_argument("--method", default="measured", choices=SEARCH_METHODS,
                    help="measured: best preference-weighted validation metrics (default); rule: ECMT's quantile rule")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    try:
        table = WidthTable.load(args.table)
        choice = search(table, parse_budget(args.budget), parse_preference(args.preference, table.tasks), args.method)
    except (ValueError, KeyError, OSError) as e:  # OSError: a folder or an unreadable file given as the table
        print(f"error: {e.args[0] if isinstance(e, KeyError) else e}", file=sys.stderr)
        return 1
    if choice.skipped:  # the table's missing cells were named when it was read
        print(f"note: {choice.skipped} configuration(s) within the budget skipped: a task's primary metric is missing "
              f"there in {args.table}", file=sys.stderr)
    if args.json:  # a missing metric as null: strict JSON, as the table stores it
        out = {"config": choice.config, "flops": choice.flops, "expected": choice.expected, "skipped": choice.skipped}
        print(json.dumps(strict_json(out, "choice"), indent=2))
        return 0
    print(f"encoder width: {choice.config['encoder']:g}")
    for t, w in choice.config["decoders"].items():
        metrics = ", ".join(f"{k}={v:.4f}" if math.isfinite(v) else f"{k}=missing" for k, v in choice.expected[t].items())
        print(f"  {t}: decoder width {w:g}; expected {metrics}")
    print(f"FLOPs per image: {choice.flops:,} ({choice.flops / 1e6:.2f} M) within budget {parse_budget(args.budget):,.0f}")
    return 0


if __name__ == "__main__":
    try:
        code = main()
        sys.stdout.flush()
    except BrokenPipeError:  # `... --json | head`: the reader left; no traceback for that
        import os

        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # the exit-time flush must not fail again
        code = 1
    sys.exit(code)
