"""The current default's 3-seed results, put together from stored per-seed runs of `benchmarks/continual.py`.

The default adapts SimpleCIL's backbone before every task and RanPAC's before the first task only. Each host's
rows depend only on its own trajectory (tested in tests/test_runner.py), so they are taken from the runs that
already have them instead of running both trajectories again:

- the frozen hosts and `simplecil+mist` (every task): `continual_<suite>/seed<S>/results.json`;
- `ranpac+mist` (first task only, fused): the RanPAC row of `seed<S>-first/results.json` (`--adapt first`, both
  hosts) where that run exists, else `seed<S>-ranpac-first/results.json` (`--host ranpac --adapt first`).

    python benchmarks/compose_default.py --suite image     # writes continual_image/default.{md,json}
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from continual import summarise, table

RESULTS = Path(__file__).resolve().parent / "results"


def compose(suite: str, seeds: list[str]) -> list[dict]:
    """One results dict per seed with the default's rows (and where each came from)."""
    per_seed = []
    for seed in seeds:
        folder = RESULTS / f"continual_{suite}"
        every = json.loads((folder / f"seed{seed}" / "results.json").read_text())
        first_path = next(p for p in (folder / f"seed{seed}-first" / "results.json",
                                      folder / f"seed{seed}-ranpac-first" / "results.json") if p.exists())
        first = json.loads(first_path.read_text())
        methods = {name: row for name, row in every["methods"].items()
                   if name == "ranpac" or name.startswith("simplecil")}  # with SimpleCIL's @none / @sdc rows
        methods["ranpac+mist"] = first["methods"]["ranpac+mist"]
        per_seed.append({"methods": methods, "config": every["config"],
                         "sources": {"simplecil+mist": f"{folder.name}/seed{seed}",
                                     "ranpac+mist": str(first_path.parent.relative_to(RESULTS))}})
    return per_seed


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--suite", required=True, choices=["image", "fashion", "clinc150"])
    p.add_argument("--seeds", default="1993,1994,1995")
    args = p.parse_args()
    per_seed = compose(args.suite, args.seeds.split(","))
    summary = summarise(per_seed)
    md = table(summary, len(per_seed))
    out = RESULTS / f"continual_{args.suite}"
    (out / "default.json").write_text(json.dumps({"suite": args.suite, "seeds": args.seeds, "summary": summary,
                                                  "sources": [s["sources"] for s in per_seed]}, indent=2))
    (out / "default.md").write_text(md + "\n")
    print(md)


if __name__ == "__main__":
    main()
