"""`report.md` and its plots, made from the artifacts in a run's workdir."""

from __future__ import annotations

import os

from sokd_tf.config import HISTORY_KEY
from sokd_tf.stages import divergence
from sokd_tf.stages import workdir as workdir_lib


def _pct(value) -> str:
    return "–" if value is None else f"{100 * value:.2f}"


def describe_resources(record: dict) -> str:
    """One line from `run.json`, e.g. `13 min 39 s wall, peak memory 1.25 GB`."""
    minutes, seconds = divmod(round(record["wall_seconds"]), 60)
    text = (f"{minutes} min {seconds} s wall, peak memory "
            f"{record['peak_rss_bytes'] / 1e9:.2f} GB")
    return text + (" (resumed: only the stages this invocation ran)" if record["resumed"] else "")


def _plot(paths: workdir_lib.Workdir, histories: dict, bars: dict) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot

    os.makedirs(paths.plots_dir, exist_ok=True)
    written = []
    for stage, rows in histories.items():
        if not rows:
            continue
        roles = sorted({key.split("/")[0] for row in rows for key in row if key.endswith("/top1")
                        and "/" in key and not key.startswith(("val_", "test_"))})
        figure, (loss_axis, accuracy_axis) = pyplot.subplots(1, 2, figsize=(11, 4))
        epochs = [row["epoch"] for row in rows]
        for key in ("loss", "val_loss"):
            if key in rows[0]:
                loss_axis.plot(epochs, [row.get(key) for row in rows], label=key)
        loss_axis.set(xlabel="epoch", ylabel="loss", title=f"{stage}: loss")
        loss_axis.legend()
        for role in roles:
            for prefix, style in (("", ":"), ("val_", "--"), ("test_", "-")):
                key = f"{prefix}{role}/top1"
                if key in rows[0]:
                    accuracy_axis.plot(
                        epochs, [100 * row.get(key, float("nan")) for row in rows], style,
                        label=f"{role} {prefix.rstrip('_') or 'train'}",
                    )
        accuracy_axis.set(xlabel="epoch", ylabel="top-1 (%)", title=f"{stage}: accuracy per role")
        accuracy_axis.legend(fontsize=8)
        figure.tight_layout()
        path = os.path.join(paths.plots_dir, f"{stage}_curves.png")
        figure.savefig(path, dpi=100)
        pyplot.close(figure)
        written.append(path)
    if bars:
        figure, axis = pyplot.subplots(figsize=(8, 4))
        names = list(bars)
        values = [100 * bars[name] for name in names]
        axis.bar(names, values, color="tab:blue")
        for index, value in enumerate(values):
            axis.text(index, value, f"{value:.2f}", ha="center", va="bottom", fontsize=8)
        axis.set(ylabel="test top-1 (%)", title="test accuracy")
        axis.set_ylim(max(0, min(values) - 10), 100)
        pyplot.setp(axis.get_xticklabels(), rotation=20, ha="right")
        figure.tight_layout()
        path = os.path.join(paths.plots_dir, "accuracy.png")
        figure.savefig(path, dpi=100)
        pyplot.close(figure)
        written.append(path)
    return written


def write_report(workdir: str) -> str:
    """Writes `workdir/report.md` (+ `plots/*.png`) from the run's artifacts; returns its path."""
    paths = workdir_lib.Workdir(workdir)
    config = workdir_lib.read_json(paths.config, {})
    teacher = workdir_lib.read_json(paths.teacher.results)
    distill = workdir_lib.read_json(paths.distill.results)
    evaluation = workdir_lib.read_json(paths.evaluation, {})
    export = workdir_lib.read_json(paths.export_report)
    histories = {
        "teacher": workdir_lib.read_json(paths.teacher.history_json, []),
        "distill": workdir_lib.read_json(paths.distill.history_json, []),
    }

    lines = ["# sokd_tf run report", ""]
    method = config.get("train", {}).get("method", "?")
    data = config.get("data", {})
    lines += [
        f"Method **{method}**, teacher `{config.get('model', {}).get('teacher')}`, student "
        f"`{config.get('model', {}).get('student')}`, data `{data.get('name')}` ({data.get('source')}).",
        "",
    ]
    lines += _divergence_section(paths, config)
    resources = workdir_lib.read_json(paths.run_record)
    if resources:
        lines += [f"Run: {describe_resources(resources)} (`run.json`).", ""]
    if distill:
        terms = distill.get("loss_terms") or {}
        if terms:
            listed = ", ".join(f"`{name}` × {weight:g}" for name, weight in terms.items())
            lines += [f"Loss terms (weight): {listed}.", ""]
        if distill.get("peer"):
            peer = distill["peer"]
            lines += [
                f"SOKD's peer is cut at `{peer['cut_layer']}` "
                f"({'x'.join(map(str, peer['cut_shape']))}): {peer['peer_params']:,} parameters, "
                f"{100 * peer['peer_share']:.1f} % of the teacher's {peer['teacher_params']:,}.",
                "",
            ]
        if distill.get("teacher_bn_mode"):
            lines += [f"Teacher BatchNorm mode: **{distill['teacher_bn_mode']}**.", ""]
    runtime = distill or teacher or {}
    if "precision_used" in runtime:
        requested = config.get("train", {}).get("precision")
        machine = runtime.get("machine", {})
        lines += [
            f"Precision **{runtime['precision_used']}** (requested `{requested}`), BatchNorm "
            f"`{runtime.get('batch_norm_used')}`, CPU {machine.get('cpu_name', machine.get('model_name', '?'))} "
            f"(class `{machine.get('cpu_class', '?')}`).",
            "",
        ]
    selection = (distill or teacher or {}).get("best_epoch_selected_on", "validation")
    lines += [
        "## Results (test split)",
        "",
        f"Best epoch chosen on: **{selection}**. Last = the final epoch.",
        "",
        "| model | params | best epoch | test top-1 @ best | last test top-1 | last test top-5 |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    params = (distill or {}).get("params", {})
    bars = {}
    if teacher:
        role = teacher["roles"]["teacher"]
        lines.append(
            f"| teacher (own training) | {teacher['params']['teacher']:,} | {role['best_epoch']} | "
            f"{_pct(role['best_test_top1'])} | {_pct(role['last_test_top1'])} | {_pct(role['last_test_top5'])} |"
        )
    if distill and "teacher" in distill:
        before = distill["teacher"]["before_distillation"]
        lines.append(
            f"| teacher, before distillation | {params.get('teacher', 0):,} | – | – | "
            f"{_pct(before.get('top1'))} | {_pct(before.get('top5'))} |"
        )
        bars["teacher"] = before["top1"]
        after = distill["teacher"].get("after_distillation_bn_statistics_moved")
        if after:
            lines.append(
                f"| teacher, after distillation (BN statistics moved, official mode) | "
                f"{params.get('teacher', 0):,} | – | – | {_pct(after.get('top1'))} | {_pct(after.get('top5'))} |"
            )
    if distill:
        peer_label = ("peer (DML's second network)" if method == "dml"
                      else "peer path (reconstructed teacher)")
        peer_stem = "peer" if method == "dml" else "reconstructed_teacher"
        for role, label, stem in (("peer", peer_label, peer_stem), ("student", "student", "student")):
            record = distill["roles"].get(role)
            if record is None:
                continue
            count = params.get(stem, params.get(role, 0))
            lines.append(
                f"| {label} | {count:,} | {record['best_epoch']} | {_pct(record['best_test_top1'])} | "
                f"{_pct(record['last_test_top1'])} | {_pct(record['last_test_top5'])} |"
            )
            if record["last_test_top1"] is not None:
                bars[f"{role} (last)"] = record["last_test_top1"]
    lines.append("")
    if evaluation:
        lines += ["## Saved models re-evaluated from disk", "", "| file | params | top-1 | top-5 |", "|---|---:|---:|---:|"]
        for result in evaluation.values():
            lines.append(
                f"| `{os.path.relpath(result['path'], workdir)}` | {result['params']:,} | "
                f"{_pct(result.get('top1'))} | {_pct(result.get('top5'))} |"
            )
        lines.append("")
    if export:
        lines += _export_section(export, workdir)
    written = _plot(paths, histories, bars)
    if written:
        lines += ["## Plots", ""]
        lines += [f"![{os.path.basename(p)}](plots/{os.path.basename(p)})" for p in written]
        lines.append("")
    lines += ["## Resolved config", "", "```json", _json(config), "```", ""]
    workdir_lib.write_text(paths.report, "\n".join(lines))
    return paths.report


def _divergence_section(paths: workdir_lib.Workdir, config: dict) -> list[str]:
    """Where a stopped run diverged, and the changes made to continue earlier ones."""
    lines = []
    for stage, files in (("teacher", paths.teacher), ("distill", paths.distill)):
        record = divergence.read_record(files.root)
        if record is None:
            continue
        epoch, good = record["epoch"], record["last_good_epoch"]
        kept = (f"the last good epoch, {good}, is in `{stage}/checkpoints/backup`" if good
                else "no epoch had completed")
        lines += [
            "## Stopped: the run diverged",
            "",
            f"The **{stage}** stage diverged at epoch {epoch}, step {record['step']} "
            f"({record['phase']}): `{record['term']}` is {record['value']}. Nothing from epoch "
            f"{epoch} was kept; {kept}. The later stages (evaluation, export) did not run.",
            "",
            f"> {record['message']}",
            "",
        ]
    history = config.get(HISTORY_KEY) or []
    if history:
        lines += ["## Continued with changed settings", ""]
        for entry in history:
            changed = ", ".join(
                f"`{name}` {change['from']!r} → {change['to']!r}"
                for name, change in entry["changed"].items()
            )
            where = []
            for stage, state in entry.get("stages", {}).items():
                text = f"{stage} from epoch {state['resumes_at_epoch']}"
                diverged = state.get("after_divergence")
                if diverged:
                    text += (f" after diverging at epoch {diverged['epoch']}, step "
                             f"{diverged['step']} (`{diverged['term']}` {diverged['value']})")
                where.append(text)
            lines.append(f"- {changed}" + (f"; resumed {'; '.join(where)}" if where else ""))
        lines.append("")
    return lines


def _export_section(export: dict, workdir: str) -> list[str]:
    lines = ["## Exports", ""]
    serving = export.get("saved_model") or {}
    if serving:
        lines += [f"SavedModel (TF Serving): `{os.path.relpath(serving.get('path', ''), workdir)}`", ""]
        for signature, check in (serving.get("verification") or {}).items():
            lines.append(
                f"- `{signature}` against the Keras student on {check['num_examples']:,} test "
                f"images: class agreement {_pct(check['agreement'])} %, max |logit difference| "
                f"{check['max_abs_logit_error']:.2g}"
            )
        lines.append("")
    variants = export.get("tflite") or {}
    if variants:
        lines += [
            "| TFLite variant | size (KB) | size vs fp32 | test top-1 | agreement with Keras | latency median (ms, 1 thread) |",
            "|---|---:|---:|---:|---:|---:|",
        ]
        fp32_size = (variants.get("fp32") or {}).get("size_bytes")
        for name, result in variants.items():
            size = result.get("size_bytes")
            ratio = f"{fp32_size / size:.2f}×" if fp32_size and size else "–"
            latency = result.get("latency_ms_median")
            lines.append(
                f"| {name} | {size / 1024:.1f} | {ratio} | {_pct(result.get('top1'))} | "
                f"{_pct(result.get('agreement'))} | {'–' if latency is None else f'{latency:.3f}'} |"
            )
        lines.append("")
    return lines


def _json(value) -> str:
    import json

    return json.dumps(value, indent=2, sort_keys=True)
