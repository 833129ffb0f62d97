"""What loader worker processes run: decode and prepare one batch. Kept free of JAX and flax, so that
spawning a worker costs only numpy, Pillow and the dataset's own reader."""

from __future__ import annotations

import numpy as np

from featdp.extraction.augment import Augmentation


class LoadBatch:
    """Decodes and prepares the examples of one batch of row indices; picklable.

    With `augmentation` whose views for `split` are V > 1, each example becomes V images (its views,
    `featdp.extraction.augment`), example-major: images [i·V, (i+1)·V) are example i's, and its label and
    index are repeated V times, as the feature file stores them."""

    def __init__(self, dataset, split: str, prepare, augmentation: Augmentation | None = None):
        self.dataset, self.split, self.prepare = dataset, split, prepare
        self.augmentation = augmentation

    def __call__(self, indices: np.ndarray) -> dict[str, np.ndarray]:
        views = 1 if self.augmentation is None else self.augmentation.views_of(self.split)
        images, labels = [], []
        for i in indices:
            image, label = self.dataset.example(self.split, int(i))
            prepared = self.prepare(image)
            if views > 1:
                images.extend(self.augmentation.views_for(prepared, self.split))
            else:
                images.append(prepared)
            labels.append(label)
        return {"image": np.stack(images), "label": np.repeat(np.asarray(labels, np.int64), views),
                "index": np.repeat(np.asarray(indices, np.int64), views)}
