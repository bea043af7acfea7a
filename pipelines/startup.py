"""A quiet start for every entry point: TensorFlow's C++ start-up lines are hidden.

TensorFlow 2.21 prints, on import and on its first device probe, C++ lines nobody running
sokd-tf acts on: oneDNN and CPU-feature notices, "Could not find cuda drivers", "failed
call to cuInit" and absl's "All log messages before absl::InitializeLog()" notice. Some
honour `TF_CPP_MIN_LOG_LEVEL`, others (the absl-logged ones) are written before TensorFlow
reads it. So `quiet_tensorflow` imports TensorFlow and probes its devices with file
descriptor 2 redirected to a temporary file, then writes back everything except those
C++ lines: all of them when `TF_CPP_MIN_LOG_LEVEL` is unset (it is then set to 2 for the
rest of the run), else those below the user's level (0 shows every line, 3 hides errors
too). Python warnings and tracebacks of that window are always written back. It must run
before anything imports TensorFlow: `pipelines/__init__.py` calls it.
"""

from __future__ import annotations

import os
import re
import sys
import tempfile

LOG_LEVEL_VARIABLE = "TF_CPP_MIN_LOG_LEVEL"
# absl / TSL C++ log lines: "I0000 00:00:1796165066.862425   21489 port.cc:153] ...".
_CPP_LOG_LINE = re.compile(rb"^([IWE])\d{4} \d\d:\d\d:\d+\.\d+ +\d+ [\w./-]+:\d+\] ")
_SEVERITY = {b"I": 0, b"W": 1, b"E": 2}
_ABSL_NOTICE = b"WARNING: All log messages before absl::InitializeLog() is called are written to STDERR"
# The second line of TSL's CPU-feature notice (its first line is a C++ log line).
_CONTINUATION = b"To enable the following instructions:"


def quiet_tensorflow() -> None:
    """Imports TensorFlow without its C++ start-up lines (see the module docstring)."""
    if "tensorflow" in sys.modules:
        return
    user_level = os.environ.get(LOG_LEVEL_VARIABLE)
    if user_level is None:
        os.environ[LOG_LEVEL_VARIABLE] = "2"
        hidden_below = 3  # every start-up line
    else:
        hidden_below = int(user_level) if user_level.strip().isdigit() else 0
    if hidden_below == 0:
        return
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
            kept = [line for line in captured.read().splitlines(keepends=True)
                    if not _is_hidden(line, hidden_below)]
            if kept:
                sys.stderr.buffer.write(b"".join(kept))
                sys.stderr.flush()


def _is_hidden(line: bytes, hidden_below: int) -> bool:
    match = _CPP_LOG_LINE.match(line)
    if match:
        return _SEVERITY[match.group(1)] < hidden_below
    return line.startswith((_ABSL_NOTICE, _CONTINUATION))
