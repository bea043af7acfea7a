"""`results.md` and the plots of a study, made only from its `results.json` (and the runs'
own histories for the learning curves), so changing a run's metric changes the table.
"""

from __future__ import annotations

import math
import os
import statistics
from typing import NamedTuple

from sokd_tf.stages import workdir as workdir_lib


def _mean_std(values):
    values = [v for v in values if v is not None]
    if not values:
        return None, None, 0
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return statistics.fmean(values), std, len(values)


def _cell(values) -> str:
    mean, std, n = _mean_std(values)
    if mean is None:
        return "–"
    return f"{mean:.2f} ± {std:.2f}" if n > 1 else f"{mean:.2f}"


def summarize(results: dict) -> list[dict]:
    """One row per variant (in run order): mean/std of every reported number."""
    by_variant: dict[str, list[dict]] = {}
    for run in results["runs"]:
        by_variant.setdefault(run["variant"], []).append(run)
    rows = []
    for variant, runs in by_variant.items():
        def pick(*keys, runs=runs):
            out = []
            for run in runs:
                value = run
                for key in keys:
                    value = value.get(key) if isinstance(value, dict) else None
                out.append(value)
            return out

        rows.append({
            "variant": variant,
            "method": runs[0]["method"],
            "seeds": sorted(run["seed"] for run in runs),
            "best": pick("student", "best_top1"),
            "last": pick("student", "last_top1"),
            "teacher": pick("teacher", "top1"),
            "teacher_equal_budget": pick("teacher_equal_budget", "top1"),
            "peer_path": pick("peer_path", "top1"),
            "wall_s": pick("wall_s"),
            "teacher_bn_mode": runs[0].get("teacher_bn_mode"),
        })
    return rows


def markdown(results: dict) -> str:
    rows = summarize(results)
    lines = [
        f"# Study `{results['study']}`",
        "",
        results.get("description", ""),
        "",
        f"Command: `{results.get('command', '')}`",
        "",
        f"Machine this report was written on: {results['machine']['cpu']} "
        f"({', '.join(results['machine']['isa']) or 'no AVX2'}), {results['machine']['cores']} "
        "cores; each run's own CPU is in the Runs table.",
        "",
        "Student test top-1 (%), mean ± std over seeds. *best* = the best epoch's test "
        "top-1 (best on test, as the paper reports), *last* = the final epoch's.",
        "",
        f"| variant | method | seeds | student best | student last | last − {BASELINE} | "
        "teacher BN | wall time per run (s) |",
        "|---|---|---|---:|---:|---:|---|---:|",
    ]
    baseline = {row["variant"]: _mean_std(row["last"])[0] for row in rows}.get(BASELINE)
    for row in rows:
        mean_wall, _, _ = _mean_std(row["wall_s"])
        mean_last = _mean_std(row["last"])[0]
        delta = ("–" if baseline is None or mean_last is None or row["variant"] == BASELINE
                 else f"{mean_last - baseline:+.2f}")
        lines.append(
            f"| {row['variant']} | {row['method']} | {','.join(map(str, row['seeds']))} | "
            f"{_cell(row['best'])} | {_cell(row['last'])} | {delta} | "
            f"{row['teacher_bn_mode'] or '–'} | {'–' if mean_wall is None else f'{mean_wall:.0f}'} |"
        )
    peer_rows = [row for row in rows if any(v is not None for v in row["peer_path"])]
    if peer_rows:
        lines += [
            "",
            "## Peer path (reconstructed teacher) vs the teacher",
            "",
            "The peer trains for the distillation epochs on top of the teacher's, so the fair "
            "control is the same teacher architecture trained for teacher + distillation "
            "epochs with the same schedule shape (*teacher, equal budget*).",
            "",
            "| variant | teacher | teacher, equal budget | peer path (last epoch) |",
            "|---|---:|---:|---:|",
        ]
        for row in peer_rows:
            lines.append(
                f"| {row['variant']} | {_cell(row['teacher'])} | {_cell(row['teacher_equal_budget'])} | "
                f"{_cell(row['peer_path'])} |"
            )
    lines += _verdict(rows)
    if results.get("pending"):
        lines += ["", f"Not finished yet: {', '.join(results['pending'])}."]
    lines += ["", "## Runs", "",
              "| variant | seed | best | last | best epoch | teacher | wall (s) | resumed | CPU |",
              "|---|---:|---:|---:|---:|---:|---:|---|---|"]
    for run in results["runs"]:
        lines.append(
            f"| {run['variant']} | {run['seed']} | {run['student']['best_top1']} | "
            f"{run['student']['last_top1']} | {run['student'].get('best_epoch')} | "
            f"{run.get('teacher', {}).get('top1', '–')} | {run['wall_s']} | {run.get('resumed', False)} | "
            f"{run.get('cpu', 'not recorded')} |"
        )
    return "\n".join(lines) + "\n"


# The variant every other one is compared with (the table's difference column, the verdict).
BASELINE = "sokd"


class Comparison(NamedTuple):
    """Two samples' difference of means and how it stands against their spread."""

    difference: float
    judged: str
    beyond_spread: bool  # the difference exceeds the seed-to-seed spread (a ranking)


def compare(mine: list, theirs: list) -> Comparison:
    """`mine`'s mean minus `theirs`', judged against the seed-to-seed spread.

    The spread is the larger of the two samples' standard deviations; a difference within
    it is noise, not a ranking. With fewer than two seeds on either side there is no
    spread to compare with, and the text says so.
    """
    mean_mine, std_mine, n_mine = _mean_std(mine)
    mean_theirs, std_theirs, n_theirs = _mean_std(theirs)
    difference = mean_mine - mean_theirs
    if min(n_mine, n_theirs) < 2:
        return Comparison(difference, "one seed, so no seed-to-seed spread to judge it by", False)
    spread = max(std_mine, std_theirs)
    if abs(difference) <= spread:
        return Comparison(difference, f"within the seed-to-seed spread ({spread:.2f}): noise, "
                          "not a ranking", False)
    return Comparison(difference, f"larger than the seed-to-seed spread ({spread:.2f})", True)


def _verdict(rows) -> list[str]:
    """Plain statements of the ranking as measured (last-epoch top-1), judged against the
    seeds' own spread."""
    by_variant = {row["variant"]: row for row in rows}
    lines = []
    mine = by_variant.get(BASELINE)
    if mine is not None and _mean_std(mine["last"])[0] is not None:
        for other in ("kd", "dml", "vanilla"):
            theirs = by_variant.get(other)
            if theirs is None or _mean_std(theirs["last"])[0] is None:
                continue
            difference, judged, beyond_spread = compare(mine["last"], theirs["last"])
            name = other.upper() if other != "vanilla" else "vanilla"
            if beyond_spread:
                relation = f"beats {name}'s" if difference > 0 else f"trails {name}'s"
            else:
                relation = f"is {'above' if difference > 0 else 'below'} {name}'s"
            lines.append(
                f"- SOKD's student {relation} by {difference:+.2f} pt (last epoch, mean "
                f"{_mean_std(mine['last'])[0]:.2f} vs {_mean_std(theirs['last'])[0]:.2f}), "
                f"{judged}.")
        for row in rows:
            if row["variant"] == BASELINE or row["method"] != "sokd":
                continue
            difference, judged, _ = compare(row["last"], mine["last"])
            lines.append(f"- {row['variant']} vs {BASELINE}: {difference:+.2f} pt (last epoch), "
                         f"{judged}.")
    for row in rows:
        peer, control = _mean_std(row["peer_path"])[0], _mean_std(row["teacher_equal_budget"])[0]
        teacher = _mean_std(row["teacher"])[0]
        if peer is not None and teacher is not None:
            lines.append(
                f"- {row['variant']}: peer path {peer:.2f} vs teacher {teacher:.2f}"
                + ("" if control is None else f" vs equal-budget teacher {control:.2f}")
                + (" — beats the equal-budget control." if control is not None and peer > control
                   else " — does not beat the equal-budget control." if control is not None else ".")
            )
    return ["", "## As measured", "", *lines] if lines else []


def _learning_curves(results: dict, root: str) -> dict:
    """variant -> per-epoch test top-1 (%) of the student, averaged over seeds."""
    curves: dict[str, list[list[float]]] = {}
    for run in results["runs"]:
        history = workdir_lib.read_json(
            workdir_lib.Workdir(os.path.join(root, run["workdir"])).distill.history_json, []
        )
        values = [100 * row["test_student/top1"] for row in history if "test_student/top1" in row]
        if values:
            curves.setdefault(run["variant"], []).append(values)
    return {
        variant: [statistics.fmean(epoch) for epoch in zip(*runs, strict=False)]
        for variant, runs in curves.items()
    }


def plot(results: dict, root: str) -> list[str]:
    """plots/{accuracy,peer_path,learning_curves,wall_time}.png; returns the paths."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot

    rows = summarize(results)
    if not rows:
        return []
    plots = os.path.join(root, "plots")
    os.makedirs(plots, exist_ok=True)
    written = []

    def save(figure, name):
        path = os.path.join(plots, name)
        figure.tight_layout()
        figure.savefig(path, dpi=100)
        pyplot.close(figure)
        written.append(path)

    names = [row["variant"] for row in rows]
    figure, axis = pyplot.subplots(figsize=(max(6, 1.2 * len(names)), 4))
    width = 0.38
    for offset, key in ((-width / 2, "best"), (width / 2, "last")):
        stats = [_mean_std(row[key]) for row in rows]
        axis.bar([i + offset for i in range(len(rows))], [s[0] or 0 for s in stats], width,
                 yerr=[s[1] or 0 for s in stats], capsize=3, label=key)
    finite = [v for row in rows for v in row["best"] + row["last"] if v is not None]
    if finite:
        axis.set_ylim(max(0, math.floor(min(finite)) - 2), min(100, math.ceil(max(finite)) + 1))
    axis.set_xticks(range(len(rows)), names, rotation=30, ha="right")
    axis.set(ylabel="student test top-1 (%)", title=f"{results['study']}: mean ± std over seeds")
    axis.legend()
    save(figure, "accuracy.png")

    peer_rows = [row for row in rows if any(v is not None for v in row["peer_path"])]
    if peer_rows:
        figure, axis = pyplot.subplots(figsize=(6, 4))
        labels = ["teacher", "teacher, equal budget", "peer path"]
        for i, row in enumerate(peer_rows):
            stats = [_mean_std(row[k]) for k in ("teacher", "teacher_equal_budget", "peer_path")]
            axis.bar([j + i * 0.8 / len(peer_rows) for j in range(3)], [s[0] or 0 for s in stats],
                     0.8 / len(peer_rows), yerr=[s[1] or 0 for s in stats], capsize=3, label=row["variant"])
        axis.set_xticks(range(3), labels)
        axis.set(ylabel="test top-1 (%)", title="peer path vs teacher")
        axis.legend()
        save(figure, "peer_path.png")

    curves = _learning_curves(results, root)
    if curves:
        figure, axis = pyplot.subplots(figsize=(6, 4))
        for variant, values in curves.items():
            axis.plot(range(1, len(values) + 1), values, marker="o", label=variant)
        axis.set(xlabel="epoch", ylabel="student test top-1 (%)", title="learning curves (mean over seeds)")
        axis.legend()
        save(figure, "learning_curves.png")

    figure, axis = pyplot.subplots(figsize=(max(6, 1.2 * len(names)), 4))
    axis.bar(names, [(_mean_std(row["wall_s"])[0] or 0) / 60 for row in rows])
    axis.set(ylabel="minutes per run", title="wall time per run")
    axis.tick_params(axis="x", rotation=30)
    save(figure, "wall_time.png")
    return written


def write_tables(results: dict, root: str) -> str:
    """Writes root/results.md and root/plots/*.png; returns the markdown path."""
    written = plot(results, root)
    text = markdown(results)
    if written:
        text += "\n## Plots\n\n" + "\n".join(
            f"![{os.path.basename(p)}](plots/{os.path.basename(p)})" for p in written
        ) + "\n"
    path = os.path.join(root, "results.md")
    workdir_lib.write_text(path, text)
    return path
