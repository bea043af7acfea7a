"""What a model and an exporter need to know about a dataset."""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
    """Static facts about an image-classification dataset.

    Attributes:
      name: dataset label, e.g. "fashion_mnist", "cifar100".
      num_classes: number of classes; labels are integers in [0, num_classes).
      image_shape: (height, width, channels) of the images the models see, after the
        pipeline's optional resize (`DataConfig.image_size`) and grayscale -> RGB
        repeat (`DataConfig.channels`).
      class_names: one name per class, index = label.
      split_sizes: examples per split after the validation hold-out, e.g.
        {"train": 55000, "validation": 5000, "test": 10000}.
      mean, std: per-channel normalisation applied to pixels scaled to [0, 1]:
        normalised = (pixels / 255 - mean) / std, one value per *raw* channel.
        Exporters fold this into the graph.
      raw_image_shape: (height, width, channels) of the stored images, which exported
        models accept; None (the default) = `image_shape` (no resize, no channel change).
    """

    name: str
    num_classes: int
    image_shape: tuple[int, int, int]
    class_names: tuple[str, ...]
    split_sizes: dict[str, int]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    raw_image_shape: tuple[int, int, int] | None = None

    def __post_init__(self):
        if self.raw_image_shape is None:
            object.__setattr__(self, "raw_image_shape", tuple(self.image_shape))
