"""What loader worker processes run: decode and prepare one batch. Kept free of JAX and flax, so that
spawning a worker costs only numpy, Pillow and the dataset's own reader."""

from __future__ import annotations

import numpy as np


class LoadBatch:
    """Decodes and prepares the examples of one batch of row indices; picklable."""

    def __init__(self, dataset, split: str, prepare):
        self.dataset, self.split, self.prepare = dataset, split, prepare

    def __call__(self, indices: np.ndarray) -> dict[str, np.ndarray]:
        images, labels = [], []
        for i in indices:
            image, label = self.dataset.example(self.split, int(i))
            images.append(self.prepare(image))
            labels.append(label)
        return {"image": np.stack(images), "label": np.asarray(labels, np.int64),
                "index": np.asarray(indices, np.int64)}
