#!/usr/bin/env python3
"""Sums up an ONNX Runtime profile written by `audiocap bench --profile DIR`.

    python3 benchmarks/ort-profile-summary.py DIR/ort-profile-decoder_*.json [--top 15]

For each file: the session runs (count, mean and total wall time), then the time spent in
node kernels by operator type (count, total, share of the runs' time, mean per call).
On the CUDA provider a node's time is the host time to launch its kernels (they run
asynchronously): when the nodes' sum is close to the runs' time the step is bound by the
host, when it is much smaller the GPU is the bottleneck.
"""

import argparse
import collections
import json
import sys


def summarise(path, top):
    with open(path) as f:
        events = json.load(f)
    runs = [e["dur"] for e in events if e.get("cat") == "Session" and e.get("name") == "model_run"]
    by_op = collections.defaultdict(lambda: [0, 0])
    providers = collections.Counter()
    for e in events:
        if e.get("cat") != "Node" or not e.get("name", "").endswith("_kernel_time"):
            continue
        args = e.get("args", {})
        op = args.get("op_name", "?")
        by_op[op][0] += 1
        by_op[op][1] += e["dur"]
        providers[args.get("provider", "?")] += 1
    run_total = sum(runs)
    node_total = sum(t for _, t in by_op.values())
    print(f"{path}")
    if runs:
        print(
            f"  runs: {len(runs)}, mean {run_total / len(runs) / 1000:.2f} ms, "
            f"total {run_total / 1000:.1f} ms"
        )
    print(
        f"  node kernels: {sum(c for c, _ in by_op.values())} calls, {node_total / 1000:.1f} ms"
        + (f" ({100 * node_total / run_total:.0f}% of the runs)" if run_total else "")
    )
    print(f"  providers: {dict(providers)}")
    print(f"  {'operator':32} {'calls':>8} {'total ms':>10} {'share':>7} {'mean us':>9}")
    ranked = sorted(by_op.items(), key=lambda kv: -kv[1][1])
    for op, (count, total) in ranked[:top]:
        share = 100 * total / run_total if run_total else 0.0
        print(f"  {op:32} {count:8d} {total / 1000:10.2f} {share:6.1f}% {total / count:9.1f}")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("files", nargs="+")
    parser.add_argument("--top", type=int, default=15)
    args = parser.parse_args()
    for path in args.files:
        try:
            summarise(path, args.top)
        except (OSError, ValueError, KeyError) as e:
            print(f"{path}: {e}", file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
