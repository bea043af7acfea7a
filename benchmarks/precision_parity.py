"""Student accuracy under mixed_bfloat16 vs float32: the same distillation, several seeds.

Runs `pipelines.distill` (SOKD, the `--preset`'s recipe) once per (precision, seed)
from ONE trained teacher, so the only differences between the runs of a seed are the
dtype policy, and prints per seed the student's last-epoch test top-1 in both
precisions, their means, the float32 seed-to-seed spread (max - min) and the verdict of
the project's precision goal: the bfloat16 mean lies within the float32 spread of the
float32 mean (docs/SCALING.md).

    python benchmarks/precision_parity.py \
        --teacher_checkpoint=workdir/quickstart/teacher/teacher.keras \
        --workroot=workdir/parity --seeds=8888,8889,8890

Each run has its own workdir under --workroot and is resumable: a rerun skips every run
whose `distill/results.json` exists (so a finished run of the quickstart itself can be
reused by linking its workdir as `<workroot>/float32_<seed>`). Runs go one at a time;
each uses every core.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_one(args, precision: str, seed: int) -> dict:
    workdir = os.path.join(args.workroot, f"{precision}_{seed}")
    results_path = os.path.join(workdir, "distill", "results.json")
    if not os.path.exists(results_path):
        command = [
            sys.executable, "-m", "pipelines.distill",
            f"--preset={args.preset}",
            f"--teacher_checkpoint={os.path.abspath(args.teacher_checkpoint)}",
            f"--workdir={workdir}",
            f"--seed={seed}",
            f"--precision={precision}",
            "--method=sokd",
        ]
        print("$", " ".join(command), flush=True)
        env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
        subprocess.run(command, cwd=REPO, env=env, check=True)
    with open(results_path) as f:
        results = json.load(f)
    return {
        "precision": precision,
        "seed": seed,
        "student_last_test_top1": results["roles"]["student"]["last_test_top1"],
        "peer_last_test_top1": results["roles"]["peer"]["last_test_top1"],
        "workdir": workdir,
    }


def report(records: list[dict], precisions: list[str], seeds: list[int]) -> str:
    by_key = {(r["precision"], r["seed"]): r for r in records}
    lines = [
        "| seed | " + " | ".join(f"student top-1 {p} (%)" for p in precisions) + " |",
        "|---|" + "---|" * len(precisions),
    ]
    for seed in seeds:
        cells = [f"{100 * by_key[(p, seed)]['student_last_test_top1']:.2f}" for p in precisions]
        lines.append(f"| {seed} | " + " | ".join(cells) + " |")
    summary = {}
    for p in precisions:
        values = [100 * by_key[(p, s)]["student_last_test_top1"] for s in seeds]
        summary[p] = (statistics.mean(values), max(values) - min(values))
    lines.append(
        "| mean (spread) | "
        + " | ".join(f"{summary[p][0]:.2f} ({summary[p][1]:.2f})" for p in precisions)
        + " |"
    )
    reference = precisions[0]
    mean_ref, spread_ref = summary[reference]
    for p in precisions[1:]:
        delta = summary[p][0] - mean_ref
        verdict = "within" if abs(delta) <= spread_ref else "OUTSIDE"
        lines.append("")
        lines.append(
            f"{p} - {reference}: mean {delta:+.2f} pt; {reference} seed spread "
            f"{spread_ref:.2f} pt: {verdict} the spread; |delta| <= 0.2 pt: "
            f"{'yes' if abs(delta) <= 0.2 else 'no'}"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--teacher_checkpoint", required=True)
    parser.add_argument("--workroot", default="workdir/parity")
    parser.add_argument("--preset", default="quickstart")
    parser.add_argument("--seeds", default="8888,8889,8890")
    parser.add_argument("--precisions", default="float32,mixed_bfloat16")
    parser.add_argument("--json", default="", help="write the records here")
    args = parser.parse_args()
    if not os.path.isfile(args.teacher_checkpoint):
        sys.exit(f"error: --teacher_checkpoint {args.teacher_checkpoint!r} does not exist")
    seeds = [int(s) for s in args.seeds.split(",")]
    precisions = args.precisions.split(",")
    records = [run_one(args, p, s) for s in seeds for p in precisions]
    if args.json:
        with open(args.json, "w") as f:
            json.dump(records, f, indent=2)
    print(report(records, precisions, seeds))


if __name__ == "__main__":
    main()
