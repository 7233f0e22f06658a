"""Step profiler of model pairs: the same program as `mokd bench throughput` (arguments and output identical).

    python benchmarks/throughput.py --preset demo --batch 64 --switches removed --json benchmarks/results/throughput_cpu.json
    python benchmarks/throughput.py --preset r101_vit_b,r50_vit_s --batch 64,128 --json OUT.json   # on a GPU

See README, "Profiling a pair", for how to read the output.
"""

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from mokd.launch.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["bench", "throughput", *sys.argv[1:]]))
