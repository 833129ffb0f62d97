"""Two stand-ins for a `Releaser` (both implement `mechanism.ReleaserInterface`) that let an audit, and
the tests, see a fit's transcript.

* `Recorder` wraps a real releaser (the project's, or a test's deliberately broken one): every call goes
  through it unchanged, and the clean statistic and the released one are kept side by side.
* `Replay` adds no noise at all: it hands a method the outputs recorded from an earlier fit, so that a fit
  on other data follows exactly that fit's public trajectory, and keeps the clean statistics it is given.
  It is an instrument for computing what the canaries contributed; nothing it returns is private.
"""

from __future__ import annotations

from typing import Iterable

import numpy as np

from featdp.mechanism import Release, ReleaserInterface, independent_coordinates


class Recorder:
    """Forwards every release to `inner` and records (clean value, released value)."""

    def __init__(self, inner: ReleaserInterface):
        self._inner = inner
        self.clean: list[np.ndarray] = []
        self.released: list[np.ndarray] = []

    @property
    def releases(self) -> list[Release]:
        return self._inner.releases

    def release(self, name: str, value: np.ndarray, **kwargs) -> np.ndarray:
        out = self._inner.release(name, value, **kwargs)
        # Copies: the method may go on to change its arrays in place.
        self.clean.append(np.array(value, np.float64))
        self.released.append(np.array(out, np.float64))
        return out

    def release_stack(self, name: str, values: Iterable[np.ndarray], shape: tuple[int, ...], **kwargs):
        # Materialized at once, so that the records stay in call order.
        values = [np.array(v, np.float64) for v in values]
        noisy = list(self._inner.release_stack(name, iter(values), shape, **kwargs))
        self.clean.append(np.stack(values))
        self.released.append(np.stack(noisy).astype(np.float64))
        return iter(noisy)

    def poisson_mask(self, step: int, block: int, rows: int, probability: float) -> np.ndarray:
        return self._inner.poisson_mask(step, block, rows, probability)


class Replay:
    """Returns the recorded `outputs` of another fit, release by release, and keeps the clean statistics.

    Without `masks`, every row is sampled: on the canaries-alone data this gives each canary's
    contribution as if it had been drawn into the batch, which is what an attacker who does not know the
    secret sample assumes. With `masks` (a releaser), its Poisson masks are used.
    """

    def __init__(self, outputs: list[np.ndarray], masks: ReleaserInterface | None = None):
        self._outputs = outputs
        self._masks = masks
        self.clean: list[np.ndarray] = []
        self.names: list[str] = []
        self.releases: list[Release] = []  # as declared; nothing is noised here

    def _next(self, name: str, clean: np.ndarray) -> np.ndarray:
        index = len(self.clean)
        if index >= len(self._outputs):
            raise ReplayMismatch(f"the replayed fit made more releases than the recorded one ({index + 1})")
        out = self._outputs[index]
        if out.shape != clean.shape:
            raise ReplayMismatch(f"release {index} ({name!r}) has shape {clean.shape}, recorded {out.shape}")
        self.clean.append(clean)
        self.names.append(name)
        return out

    def _declare(self, name, shape, *, sensitivity, noise_multiplier, symmetric=False, sampling_probability=1.0,
                 step=None):
        self.releases.append(Release(name, tuple(shape), float(sensitivity), float(noise_multiplier), symmetric,
                                     float(sampling_probability), step,
                                     independent_coordinates(tuple(shape), symmetric)))

    def release(self, name: str, value: np.ndarray, **kwargs) -> np.ndarray:
        value = np.asarray(value, np.float64)
        self._declare(name, value.shape, **kwargs)
        return self._next(name, value).copy()

    def release_stack(self, name: str, values: Iterable[np.ndarray], shape: tuple[int, ...], **kwargs):
        self._declare(name, shape, **kwargs)
        return iter(self._next(name, np.stack([np.asarray(v, np.float64) for v in values])).copy())

    def poisson_mask(self, step: int, block: int, rows: int, probability: float) -> np.ndarray:
        if self._masks is not None:
            return self._masks.poisson_mask(step, block, rows, probability)
        return np.ones(rows, dtype=bool)


class ReplayMismatch(RuntimeError):
    """A fit on other data made different releases from the same transcript: its head used the data
    outside the releaser, which the privacy accounting does not cover."""


def independent_entries(record: Release, array: np.ndarray) -> np.ndarray:
    """The entries that carry independent noise, flattened per leading item: upper triangles of symmetric
    statistics (noise is mirrored below), everything otherwise."""
    array = np.asarray(array)
    if record.symmetric:
        rows, cols = np.triu_indices(array.shape[-1])
        return array[..., rows, cols]
    return array


def replay_contributions(method, alone, noise_scale: float, recorder: Recorder, weights: np.ndarray):
    """(what the canaries add to each release along the recorded fit's trajectory, whether the head is
    post-processing): `method` is fitted on `alone` (the canaries after zero rows, same n) with the
    recorded outputs replayed. A method whose head depends on its data only through the releases makes
    the same releases and returns the same head; any other gives (zeros, False)."""
    replay = Replay(recorder.released)
    try:
        replayed = method.fit(alone, noise_scale, replay)
    except ReplayMismatch:
        replayed = None
    if replayed is None or len(replay.clean) != len(recorder.released):
        return [np.zeros_like(r) for r in recorder.released], False
    return replay.clean, bool(np.allclose(replayed, weights, rtol=1e-6, atol=1e-9))
