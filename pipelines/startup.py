"""A quiet start for every entry point: TensorFlow's C++ start-up lines are hidden.

TensorFlow 2.21 prints, on import and on its first device probe, C++ lines nobody running
sokd-tf acts on: oneDNN and CPU-feature notices, "Could not find cuda drivers", "failed
call to cuInit" and absl's "All log messages before absl::InitializeLog()" notice. Some
of them honour `TF_CPP_MIN_LOG_LEVEL`, others (the absl-logged ones) are written before
TensorFlow reads it. So, unless the user set `TF_CPP_MIN_LOG_LEVEL` (then every line is
shown, as they asked), `quiet_tensorflow` sets it to 2 and imports TensorFlow and probes
its devices with file descriptor 2 redirected to a temporary file; afterwards it writes
back everything that is not a C++ log line of that window (Python warnings, tracebacks).
It must run before anything imports TensorFlow: `pipelines/__init__.py` calls it.
"""

from __future__ import annotations

import os
import re
import sys
import tempfile

LOG_LEVEL_VARIABLE = "TF_CPP_MIN_LOG_LEVEL"
# absl / TSL C++ log lines: "I0000 00:00:1796165066.862425   21489 port.cc:153] ...".
_CPP_LOG_LINE = re.compile(rb"^[IWE]\d{4} \d\d:\d\d:\d+\.\d+ +\d+ [\w./-]+:\d+\] ")
_ABSL_NOTICE = b"WARNING: All log messages before absl::InitializeLog() is called are written to STDERR"
# The second line of TSL's CPU-feature notice (its first line is a C++ log line).
_CONTINUATION = b"To enable the following instructions:"


def quiet_tensorflow() -> None:
    """Imports TensorFlow without its C++ start-up lines (see the module docstring)."""
    if "tensorflow" in sys.modules or LOG_LEVEL_VARIABLE in os.environ:
        return
    os.environ[LOG_LEVEL_VARIABLE] = "2"
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as captured:
        os.dup2(captured.fileno(), 2)
        try:
            import tensorflow as tf

            tf.config.list_physical_devices()  # CUDA probing happens here, once
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            captured.seek(0)
            kept = [line for line in captured.read().splitlines(keepends=True) if not _is_start_up(line)]
            if kept:
                sys.stderr.buffer.write(b"".join(kept))
                sys.stderr.flush()


def _is_start_up(line: bytes) -> bool:
    return bool(_CPP_LOG_LINE.match(line)) or line.startswith((_ABSL_NOTICE, _CONTINUATION))
