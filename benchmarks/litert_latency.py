"""Single-image LiteRT latency of every .tflite variant: XNNPACK on/off, 1/2/4 threads.

    python -m benchmarks.litert_latency                               # the quickstart's export
    python -m benchmarks.litert_latency --tflite_dir=workdir/my_run/export/tflite \
        --threads=1,2,4 --delegates=xnnpack,builtin --runs=500 --json=latency.json

For each file in `--tflite_dir` (the export stage writes `fp32.tflite`, `int8.tflite`, ...)
and each delegate (`sokd_tf.export.tflite.DELEGATES`: "xnnpack" = LiteRT's default
XNNPACK delegate, as apps get it; "xnnpack_latest" = the same with its newest operators;
"builtin" = LiteRT's own kernels) and thread count, it times `--runs` single-image
`invoke()` calls after a warm-up, interleaving the configurations round by round so a
burst of load hits all of them alike, and prints the median (and the spread of the
rounds' medians) with the ratio to fp32 under the same setting. A timing window is
dropped when other processes used more than `--max_other_load` CPUs (from /proc/stat),
as `step_throughput.py` does. The header names the CPU (model, ISA flags, class) and
each file's op counts and whether its integer graph is int8 end to end
(`tflite.integer_graph_problems`).

Latency depends on the CPU class (AVX2 vs AVX-512 VNNI int8 kernels) and on the load:
quote only numbers from a quiet machine, with the header.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import numpy as np

from sokd_tf.export import tflite
from sokd_tf.runtime import cpu

DEFAULT_DIR = os.path.join("workdir", "quickstart", "export", "tflite")


def _machine_busy_s() -> float:
    """CPU-seconds all processes have used so far (Linux /proc/stat; 0 elsewhere)."""
    try:
        with open("/proc/stat") as f:
            fields = [int(v) for v in f.readline().split()[1:]]
    except OSError:
        return 0.0
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def _files(directory: str, variants: list[str] | None) -> dict[str, str]:
    names = sorted(name for name in os.listdir(directory) if name.endswith(".tflite"))
    files = {name[: -len(".tflite")]: os.path.join(directory, name) for name in names}
    if variants:
        missing = sorted(set(variants) - set(files))
        if missing:
            raise SystemExit(f"no {missing} in {directory} (it has {sorted(files)})")
        files = {variant: files[variant] for variant in variants}
    return files


def measure(files, delegates, threads, *, runs, rounds, warmup_runs, max_other_load):
    """{(variant, delegate, threads): {"median_ms", "round_medians_ms", "kept_rounds"}}."""
    classifiers, images = {}, {}
    for variant, path in files.items():
        for delegate in delegates:
            for count in threads:
                classifier = tflite.LiteRTClassifier(path, num_threads=count, delegate=delegate)
                shape = classifier.input["shape"][1:]
                images[variant] = np.full(shape, 128, np.uint8)
                classifiers[(variant, delegate, count)] = classifier
    per_round = max(1, runs // rounds)
    medians = {key: [] for key in classifiers}
    for _ in range(rounds):
        for key, classifier in classifiers.items():
            busy, wall = _machine_busy_s(), time.perf_counter()
            cpu_before = time.process_time()
            median = classifier.latency_ms(images[key[0]], runs=per_round,
                                           warmup_runs=warmup_runs)
            wall = time.perf_counter() - wall
            own = time.process_time() - cpu_before
            others = max(0.0, _machine_busy_s() - busy - own) / wall
            if others <= max_other_load:
                medians[key].append(median)
    return {
        key: {
            "median_ms": round(statistics.median(values), 4) if values else None,
            "round_medians_ms": [round(v, 4) for v in values],
            "kept_rounds": len(values),
        }
        for key, values in medians.items()
    }


def table(results, files, delegates, threads) -> str:
    """Rows: delegate and threads; columns: variants; cells: median ms (fp32 ms / ms)."""
    lines = ["| delegate | threads | " + " | ".join(files) + " |",
             "|---|---:|" + "---:|" * len(files)]
    for delegate in delegates:
        for count in threads:
            reference = results.get(("fp32", delegate, count), {}).get("median_ms")
            cells = []
            for variant in files:
                value = results[(variant, delegate, count)]["median_ms"]
                if value is None:
                    cells.append("n/a (load)")
                elif reference:
                    cells.append(f"{value:.3f} ({reference / value:.2f}×)")
                else:
                    cells.append(f"{value:.3f}")
            lines.append(f"| {delegate} | {count} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tflite_dir", default=DEFAULT_DIR,
                        help="directory of .tflite files (an export stage's export/tflite)")
    parser.add_argument("--variants", default="", help="comma list (default: every file)")
    parser.add_argument("--delegates", default="xnnpack,builtin",
                        help=f"comma list of {list(tflite.DELEGATES)}")
    parser.add_argument("--threads", default="1,2,4", help="comma list of thread counts")
    parser.add_argument("--runs", type=int, default=600, help="timed invokes per configuration")
    parser.add_argument("--rounds", type=int, default=6,
                        help="interleaved rounds the runs are split into")
    parser.add_argument("--warmup_runs", type=int, default=20)
    parser.add_argument("--max_other_load", type=float, default=0.25,
                        help="drop a round when other processes used more CPUs than this")
    parser.add_argument("--json", default="", help="write the records here")
    args = parser.parse_args(argv)

    if not os.path.isdir(args.tflite_dir):
        raise SystemExit(f"{args.tflite_dir} does not exist: run the export first "
                         f"(`bash scripts/quickstart.sh` or `python -m benchmarks.export "
                         f"--out_dir=DIR`, then --tflite_dir=DIR/export/tflite)")
    delegates = [d for d in args.delegates.split(",") if d]
    unknown = sorted(set(delegates) - set(tflite.DELEGATES))
    if unknown:
        parser.error(f"unknown --delegates {unknown}; choose from {list(tflite.DELEGATES)}")
    threads = [int(t) for t in args.threads.split(",") if t]
    files = _files(args.tflite_dir, [v for v in args.variants.split(",") if v])

    machine = cpu.detect(gpu_compute_capabilities=[])
    started = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    print(f"# litert_latency {started}; load average {os.getloadavg()[0]:.2f}; "
          f"{os.cpu_count()} CPUs")
    print(f"# CPU: {machine.describe(with_gpu=False)}; class {machine.cpu_class}")
    graphs = {}
    for variant, path in files.items():
        counts = tflite.op_counts(path)
        problems = tflite.integer_graph_problems(path)
        graphs[variant] = {"size_bytes": os.path.getsize(path), "op_counts": counts,
                           "integer_graph_problems": len(problems)}
        integer = "int8 end to end" if not problems else f"{len(problems)} non-int8 ops"
        print(f"# {variant}: {os.path.getsize(path)} bytes, {integer}; ops {json.dumps(counts)}")

    results = measure(files, delegates, threads, runs=args.runs, rounds=args.rounds,
                      warmup_runs=args.warmup_runs, max_other_load=args.max_other_load)
    print()
    print(table(results, files, delegates, threads))
    print(f"\nms = median of the kept rounds' medians (× = fp32's ms / this ms, same row); "
          f"{args.runs} single-image invokes per "
          f"configuration in {args.rounds} interleaved rounds; load average at the end "
          f"{os.getloadavg()[0]:.2f}.")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({
                "started": started, "machine": machine.to_dict(), "graphs": graphs,
                "records": [
                    {"variant": variant, "delegate": delegate, "threads": count, **values}
                    for (variant, delegate, count), values in results.items()
                ],
            }, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
