"""Pipeline options and metrics shared by the Beam jobs.

Beam >= 2.68 makes its Go "Prism" runner the default of `DirectRunner` for most
pipelines, and Prism is a binary fetched at run time: it cannot start offline. Without
an explicit `--runner`, the jobs here run on the in-process `FnApiRunner` (Beam's
batch-optimised local runner); any other runner comes from the usual Beam options.

Reference: docs/BATCH.md, "Runners".
"""

from __future__ import annotations

from collections.abc import Sequence

from apache_beam.metrics.metric import MetricsFilter
from apache_beam.options.pipeline_options import PipelineOptions, StandardOptions

LOCAL_RUNNER = "FnApiRunner"


def pipeline_options(beam_args: Sequence[str] = ()) -> PipelineOptions:
    """Beam options from command-line style arguments (`["--runner=DataflowRunner", ...]`).

    The runner defaults to the in-process `FnApiRunner` when `beam_args` names none.
    """
    options = PipelineOptions(list(beam_args))
    standard = options.view_as(StandardOptions)
    if not standard.runner:
        standard.runner = LOCAL_RUNNER
    return options


def counter_values(result, namespace: str) -> dict[str, int]:
    """Final values of the `namespace` counters of a finished pipeline, summed over steps.

    Committed values where the runner reports them, else attempted ones.
    """
    totals: dict[str, int] = {}
    query = result.metrics().query(MetricsFilter().with_namespace(namespace))
    for counter in query["counters"]:
        value = counter.committed if counter.committed is not None else counter.attempted
        name = counter.key.metric.name
        totals[name] = totals.get(name, 0) + int(value or 0)
    return totals


def format_counters(job: str, counters: dict[str, int]) -> str:
    """One line per counter, sorted, for the end-of-job summary."""
    return "\n".join(f"{job}: {name} = {value}" for name, value in sorted(counters.items()))
