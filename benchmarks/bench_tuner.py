"""Every tuner-cost benchmark in one go: step time, peak memory, inference, and (--profile) the top ops.

Forwards the shared model options (see common.add_model_args) to step_time.py, memory.py, inference.py and
profile_ops.py, which run with their own defaults otherwise and each write <script>_h<hidden>.json/.md under
benchmarks/results/<device>/. Run a script on its own for its specific options (--steps, --mem-steps, ...).

    nice -n 5 python benchmarks/bench_tuner.py [--hidden 384|768] [--device cpu|cuda] [--dtype fp32|bf16] [--profile]
"""

from __future__ import annotations

import argparse
import sys

import common
import inference
import memory
import profile_ops
import step_time


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else list(argv)
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    common.add_model_args(p)
    p.add_argument("--profile", action="store_true", help="also profile one step of each method")
    p.parse_args(argv)  # reject options the scripts below do not share before anything runs
    forwarded = [a for a in argv if a != "--profile"]
    for script in (step_time, memory, inference, *((profile_ops,) if "--profile" in argv else ())):
        script.main(forwarded)


if __name__ == "__main__":
    main()
