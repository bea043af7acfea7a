"""Ratios against fp32 and the Keras student, and a side-by-side text table.

Goals of issue #5 (full-integer int8 vs fp32): >= 3.5x smaller, <= 0.5 pt top-1 drop
(QAT: <= 0.3 pt), latency <= 1/1.5 of fp32's.
"""

from __future__ import annotations

SIZE_RATIO_GOAL = 3.5
TOP1_DROP_GOAL_PTS = 0.5
QAT_TOP1_DROP_GOAL_PTS = 0.3
LATENCY_SPEEDUP_GOAL = 1.5


def add_ratios(report: dict) -> dict:
    """Adds `size_ratio_vs_fp32`, `speedup_vs_fp32` and `top1_drop_pts` to each variant.

    `size_ratio_vs_fp32` = fp32 bytes / variant bytes (higher is smaller);
    `speedup_vs_fp32` = fp32 latency / variant latency; `top1_drop_pts` = Keras top-1
    minus variant top-1, in percentage points (positive = worse than Keras).
    """
    variants = report.get("tflite", {})
    fp32 = variants.get("fp32")
    keras_top1 = report.get("keras", {}).get("top1")
    for result in variants.values():
        if fp32:
            result["size_ratio_vs_fp32"] = fp32["size_bytes"] / result["size_bytes"]
            result["speedup_vs_fp32"] = (
                fp32["latency_ms_median"] / result["latency_ms_median"]
            )
        if keras_top1 is not None:
            result["top1_drop_pts"] = 100.0 * (keras_top1 - result["top1"])
    return report


def goals(report: dict) -> dict:
    """Which goals each full-integer variant meets (None where fp32 is missing)."""
    out = {}
    variants = report.get("tflite", {})
    for name in ("int8", "int8_float_io", "qat_int8"):
        result = variants.get(name)
        if not result or "size_ratio_vs_fp32" not in result:
            continue
        drop_goal = QAT_TOP1_DROP_GOAL_PTS if name == "qat_int8" else TOP1_DROP_GOAL_PTS
        out[name] = {
            f"size >= {SIZE_RATIO_GOAL}x smaller": result["size_ratio_vs_fp32"] >= SIZE_RATIO_GOAL,
            f"top-1 drop <= {drop_goal} pt": result["top1_drop_pts"] <= drop_goal,
            f"latency <= 1/{LATENCY_SPEEDUP_GOAL} of fp32": (
                result["speedup_vs_fp32"] >= LATENCY_SPEEDUP_GOAL
            ),
        }
    return out


def format_table(report: dict) -> str:
    """Plain-text table of every variant side by side, with ratios vs fp32."""
    header = (
        f"{'variant':<14} {'size KB':>9} {'x smaller':>9} {'top-1 %':>8} {'drop pt':>8} "
        f"{'agree %':>8} {'latency ms':>10} {'speedup':>8}"
    )
    lines = [header, "-" * len(header)]
    keras_top1 = report.get("keras", {}).get("top1")
    if keras_top1 is not None:
        lines.append(f"{'keras (float)':<14} {'':>9} {'':>9} {100 * keras_top1:>8.2f}")
    for name, result in report.get("tflite", {}).items():
        lines.append(
            f"{name:<14} {result['size_bytes'] / 1024:>9.1f} "
            f"{result.get('size_ratio_vs_fp32', float('nan')):>9.2f} "
            f"{100 * result['top1']:>8.2f} {result.get('top1_drop_pts', float('nan')):>8.2f} "
            f"{100 * (result['agreement'] or 0):>8.2f} {result['latency_ms_median']:>10.3f} "
            f"{result.get('speedup_vs_fp32', float('nan')):>8.2f}"
        )
    return "\n".join(lines)
