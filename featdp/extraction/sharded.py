"""Stage one on N processes: each extracts its share of every split into its own part file, and process 0
writes the manifest that makes the parts one feature file (layout: `featdp.featurefile_parts`).

* Shares: process i of N takes the source rows `distributed.row_range(n, i, N)` of each split (n after
  --limit): contiguous, within one row of equal, every example exactly once, none dropped at the
  remainder. A part's `index` keeps the rows' positions in the source. Shares are counted in examples:
  with V views per example (`--views`, the train split) process i writes rows [V·first, V·stop), so no
  example's views are split between parts.
* Each process extracts with its own devices (`extract.ShardedForward` over its local devices) and never
  waits for the others while it works: the processes meet only before (to agree on the run) and after
  (to hand process 0 their parts' checksums).
* The run: a part records the run it belongs to (`run_id` in its `part` attribute). Before anything is
  written the processes compare the runs their existing parts (and an existing manifest) belong to: one
  run is resumed, part by part, from each part's `rows_done`; none starts a new run; several are an error
  naming the parts (pass --overwrite to start afresh). So a part from another run is never appended to,
  and never listed in a manifest.
* Nothing half-written: the manifest is written last, atomically, after every part is complete and
  described (size, SHA-256, chunk digests); until then `<out>` does not exist (--overwrite removes the old
  one before any part changes), so a reader never sees a manifest whose parts are being rewritten. Process
  0 holds the manifest's lock and each process its part's from the start, so a second extraction onto the
  same files, or a fit reading them, stops at once.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import pathlib

from featdp import featurefile_parts as parts
from featdp.featurefile import FeatureFile, FeatureFileError, FeatureFileLock


@dataclasses.dataclass(frozen=True)
class Shard:
    """What one process writes: its part's identity and, per split, its source examples [first, stop)."""

    identity: dict
    rows: dict[str, tuple[int, int]]


def extract_parts(config, on_progress, backbone, out: pathlib.Path, dataset, splits, batch_size, dtype,
                  group) -> pathlib.Path:
    """`extract.extract` on process `group.index` of `group.count`; returns the manifest's path."""
    from featdp.extraction.extract import ExtractError, _extract_locked, views_of

    totals = {s: dataset.splits[s] if config.limit is None else min(config.limit, dataset.splits[s]) for s in splits}
    rows = {s: group.row_range(total) for s, total in totals.items()}  # examples of the source
    mine = parts.part_path(out, group.index, group.count)
    with contextlib.ExitStack() as held:
        if group.is_leader:
            held.enter_context(FeatureFileLock(out))
        try:
            mine.parent.mkdir(exist_ok=True)
        except OSError as error:
            raise ExtractError(f"cannot create the parts folder {mine.parent}: {error.strerror or error}") from None
        part_lock = held.enter_context(FeatureFileLock(mine))
        run_id = _agree_on_run(config, out, mine, group)
        first_rows = {s: r[0] * views_of(config, s) for s, r in rows.items()}  # the part's first row in the file
        identity = parts.part_identity(run_id, group.index, group.count, first_rows)
        _extract_locked(config, on_progress, backbone, mine, dataset, splits, batch_size, dtype, part_lock,
                        Shard(identity, rows))
        description = parts.describe_part(mine, identity)
        part_lock.release()  # process 0 opens every part below, as a reader
        descriptions = [json.loads(d) for d in group.gather(json.dumps(description).encode())]
        if group.is_leader:
            with FeatureFile(mine) as first:
                metadata = first.metadata
            parts.write_manifest(out, metadata, run_id, descriptions)
            try:
                FeatureFile(out).close()  # every check a reader makes, before the run reports success
            except FeatureFileError:
                out.unlink(missing_ok=True)
                raise
    return out


def _agree_on_run(config, out: pathlib.Path, mine: pathlib.Path, group) -> str:
    """The run every process's part belongs to (module docstring, "The run"), agreed before any writing."""
    found = "" if config.overwrite else _run_of_part(mine)
    runs = [r.decode() for r in group.gather(found.encode())]
    decision = b""
    if group.is_leader:
        decision = _decide(config, out, mine.parent, group.count, runs).encode()
    return group.broadcast(decision).decode()


def _run_of_part(path: pathlib.Path) -> str:
    if not path.exists():
        return ""
    identity = parts.read_part_identity(path)
    if not identity:
        raise FeatureFileError(f"{path}: is not a part of a sharded feature file; remove it, or pass --overwrite")
    return str(identity.get("run_id", ""))


def _decide(config, out: pathlib.Path, folder: pathlib.Path, count: int, runs: list[str]) -> str:
    """Process 0: the run to write (an existing one to resume, or a new one); removes what --overwrite
    replaces. Raises when the files on disk belong to different runs or another kind of extraction."""
    from featdp.extraction.extract import ExtractError

    stale = sorted(p.name for p in folder.glob("part-*-of-*.h5") if not p.name.endswith(f"-of-{count:05d}.h5"))
    if config.overwrite:
        out.unlink(missing_ok=True)
        for name in stale:
            (folder / name).unlink(missing_ok=True)
        return parts.new_run_id()
    if stale:
        raise ExtractError(
            f"{folder} holds parts of an extraction with another number of processes ({stale[0]}); run it with "
            "that --num-processes to resume it, or pass --overwrite to start afresh"
        )
    claimed = {parts.part_name(i, count): run for i, run in enumerate(runs) if run}
    if out.exists():
        run = parts.read_run_id(out)
        if run is None:
            raise ExtractError(f"{out} exists as a feature file written by one process; pass --overwrite to "
                               "replace it with a sharded one")
        claimed[out.name] = run
    distinct = sorted(set(claimed.values()))
    if len(distinct) > 1:
        shown = ", ".join(f"{name}: run {run[:12]}" for name, run in sorted(claimed.items()))
        raise ExtractError(f"the files of {out} belong to different extraction runs ({shown}); pass --overwrite to "
                           "start afresh")
    return distinct[0] if distinct else parts.new_run_id()
