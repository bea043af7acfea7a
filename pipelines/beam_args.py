"""absl flags plus Beam pipeline options on one command line.

Our flags are parsed by absl; every argument absl does not know (`--runner=DataflowRunner`,
`--project=...`, `--direct_num_workers=2`) is handed to Beam's `PipelineOptions`.
"""

from __future__ import annotations

import sys

from absl import app, flags

from sokd_tf.errors import UserError

FLAGS = flags.FLAGS


def _parse(argv: list[str]) -> list[str]:
    # known_only keeps the unknown (Beam) arguments instead of rejecting them.
    return FLAGS(argv, known_only=True)


def run(body) -> None:
    """absl `app.run` of `body(beam_args)`; a UserError becomes one line and exit status 2."""

    def main(argv):
        try:
            body(list(argv[1:]))
        except UserError as error:
            print(f"error: {error}", file=sys.stderr)
            sys.exit(2)

    app.run(main, flags_parser=_parse)
