"""Data layout on this CPU: the same conv training step in NHWC vs NCHW, side by side.

Two 3x3 convolutions (64 -> 64 channels, 32x32, batch 64, ReLU between), forward +
backward + an update, as one `tf.function`, in each layout; median of 5 windows of 5
steps after one warm-up call, then the NCHW/NHWC time ratio. The models use NHWC
(Keras' `channels_last`); this shows what the other layout would cost.

    python benchmarks/data_layout.py
"""

from __future__ import annotations

import time

import numpy as np
import tensorflow as tf


def step_time(data_format: str, batch: int = 64, size: int = 32, channels: int = 64) -> float:
    if data_format == "NHWC":
        shape = (batch, size, size, channels)
    else:
        shape = (batch, channels, size, size)
    rng = np.random.default_rng(0)
    images = tf.constant(rng.random(shape, dtype=np.float32))
    kernel = tf.Variable(0.01 * rng.standard_normal((3, 3, channels, channels), dtype=np.float32))

    @tf.function
    def step():
        with tf.GradientTape() as tape:
            x = tf.nn.conv2d(images, kernel, 1, "SAME", data_format=data_format)
            x = tf.nn.conv2d(tf.nn.relu(x), kernel, 1, "SAME", data_format=data_format)
            loss = tf.reduce_mean(x * x)
        kernel.assign_sub(1e-3 * tape.gradient(loss, kernel))
        return loss

    step()  # tracing and oneDNN primitive creation
    windows = []
    for _ in range(5):
        start = time.perf_counter()
        for _ in range(5):
            step()
        windows.append((time.perf_counter() - start) / 5)
    return float(np.median(windows))


def main() -> None:
    times = {layout: step_time(layout) for layout in ("NHWC", "NCHW")}
    for layout, seconds in times.items():
        print(f"{layout}: {1000 * seconds:.1f} ms/step")
    print(f"NCHW / NHWC step time: {times['NCHW'] / times['NHWC']:.2f}")


if __name__ == "__main__":
    main()
