"""Every benchmark, one after another (`make bench`). Each prints its figures and its ratios against
a reference measured in the same run; none of them asserts anything."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_data  # noqa: E402
import bench_fanout  # noqa: E402
import bench_inference  # noqa: E402
import bench_pipeline  # noqa: E402
import bench_training  # noqa: E402

if __name__ == "__main__":
    for bench in (bench_data, bench_training, bench_inference, bench_fanout, bench_pipeline):
        print(f"\n=== {bench.__name__} ===", flush=True)
        bench.main()
