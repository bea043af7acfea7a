"""Classifies images with an exported .tflite student using LiteRT (no TensorFlow needed).

Needs only numpy, pillow and ai-edge-litert:

    pip install ai-edge-litert pillow numpy
    python export/litert_example.py --model=workdir/quickstart/export/tflite/int8.tflite \
        shirt.png boot.png

The class names are read from the `labels.txt` the export writes beside every .tflite
file (`--class_names` names another file); `<variant>.model_card.json` beside it states
the same input/output contract as below.

Every exported variant takes raw pixels: float32 in [0, 255] (fp32, fp16, dynamic_int8,
int8_float_io) or uint8 (int8, qat_int8; input scale 1 and zero point 0 for images
calibrated on 0..255, i.e. the pixels as they are). The normalisation is inside the
model. The single output is `logits` (dequantized here for the uint8 variants).
"""

from __future__ import annotations

import argparse
import os
import sys

import numpy as np


def load_image(path: str, height: int, width: int, channels: int) -> np.ndarray:
    """A PNG/JPEG file as uint8 `[H, W, C]` (grayscale or RGB, resized if needed)."""
    from PIL import Image

    image = Image.open(path).convert("L" if channels == 1 else "RGB")
    if image.size != (width, height):
        image = image.resize((width, height), Image.BILINEAR)
    array = np.asarray(image, np.uint8)
    return array[..., None] if channels == 1 else array


class TFLiteClassifier:
    """Thin LiteRT wrapper: raw uint8 images in, float logits out."""

    def __init__(self, model_path: str, num_threads: int = 1):
        from ai_edge_litert.interpreter import Interpreter

        self.interpreter = Interpreter(model_path=model_path, num_threads=num_threads)
        self.interpreter.allocate_tensors()
        self.input = self.interpreter.get_input_details()[0]
        self.output = self.interpreter.get_output_details()[0]

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return tuple(int(v) for v in self.input["shape"][1:])

    def logits(self, image_uint8: np.ndarray) -> np.ndarray:
        """Float logits `[num_classes]` of one raw image `[H, W, C]`."""
        x = image_uint8[None].astype(np.float32)
        dtype = self.input["dtype"]
        if dtype != np.float32:  # quantized input: q = x / scale + zero_point
            scale, zero_point = self.input["quantization"]
            limits = np.iinfo(dtype)
            x = np.clip(np.round(x / scale + zero_point), limits.min, limits.max).astype(dtype)
        self.interpreter.set_tensor(self.input["index"], x)
        self.interpreter.invoke()
        y = self.interpreter.get_tensor(self.output["index"])[0]
        if self.output["dtype"] != np.float32:
            scale, zero_point = self.output["quantization"]
            y = (y.astype(np.float32) - zero_point) * scale
        return y


def softmax(logits: np.ndarray) -> np.ndarray:
    e = np.exp(logits - np.max(logits))
    return e / e.sum()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", required=True, help=".tflite file")
    parser.add_argument("--class_names",
                        help="class names, one per line (default: labels.txt beside --model)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("images", nargs="+", help="PNG/JPEG files")
    args = parser.parse_args(argv)

    classifier = TFLiteClassifier(args.model, args.threads)
    names = None
    class_names = args.class_names or os.path.join(os.path.dirname(args.model), "labels.txt")
    if os.path.exists(class_names):
        with open(class_names, encoding="utf-8") as f:
            names = [line.rstrip("\n") for line in f]
    for path in args.images:
        probabilities = softmax(classifier.logits(load_image(path, *classifier.image_shape)))
        top = int(np.argmax(probabilities))
        label = names[top] if names else str(top)
        print(f"{path}: class {top} {label!r} p={probabilities[top]:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
