"""The torch-free `.pth` reader on hostile files: nothing in a checkpoint may make it allocate
much more than the bytes the file stores (stride tricks, lying element counts, deflate
bombs, oversized pickle lengths), and every refusal is an UnsupportedCheckpointError that
names the tensor, storage or zip member at fault."""

from __future__ import annotations

import collections
import io
import json
import pickle
import struct
import subprocess
import sys
import textwrap
import types
import zipfile
import zlib

import numpy as np
import pytest

from featdp.extraction.backbones.torch_checkpoint import UnsupportedCheckpointError, load_torch_state_dict

_KINDS = {"FloatStorage": np.float32, "LongStorage": np.int64}


# --- a minimal torch.save look-alike whose every count and stride can lie -----------------


class _Store:
    """A storage: ``numel`` is what the pickle declares, ``data`` what the file stores."""

    def __init__(self, key: str, data: np.ndarray, numel: int | None = None, kind="FloatStorage",
                 view: tuple[int, int] | None = None):
        self.key, self.kind, self.view = key, kind, view
        self.data = np.ascontiguousarray(data, dtype=_KINDS[kind]).ravel()
        self.numel = self.data.size if numel is None else numel


class _Tensor:
    def __init__(self, store: _Store, shape: tuple, stride: tuple, offset: int = 0):
        self.store, self.shape, self.stride, self.offset = store, shape, stride, offset


@pytest.fixture
def fake_torch(monkeypatch):
    """Stand-in ``torch`` so that pickles name torch's globals without torch installed."""
    torch = types.ModuleType("torch")
    utils = types.ModuleType("torch._utils")

    def _rebuild_tensor_v2(*args):
        raise AssertionError("never called: the reader has its own")

    _rebuild_tensor_v2.__module__, _rebuild_tensor_v2.__qualname__ = "torch._utils", "_rebuild_tensor_v2"
    utils._rebuild_tensor_v2 = _rebuild_tensor_v2
    for name in _KINDS:
        setattr(torch, name, type(name, (), {"__module__": "torch"}))
    torch._utils = utils
    monkeypatch.setitem(sys.modules, "torch", torch)
    monkeypatch.setitem(sys.modules, "torch._utils", utils)
    return torch


def _pickle(torch, state: dict, legacy: bool) -> tuple[bytes, dict[str, _Store]]:
    stores: dict[str, _Store] = {}

    class Pickler(pickle.Pickler):
        def persistent_id(self, obj):
            if not isinstance(obj, _Store):
                return None
            stores[obj.key] = obj
            pid = ("storage", getattr(torch, obj.kind), obj.key, "cpu", obj.numel)
            if legacy:
                pid += ((f"{obj.key}v", *obj.view),) if obj.view else (None,)
            return pid

        def reducer_override(self, obj):
            if isinstance(obj, _Tensor):
                args = (obj.store, obj.offset, obj.shape, obj.stride, False, collections.OrderedDict())
                return torch._utils._rebuild_tensor_v2, args
            return NotImplemented

    buf = io.BytesIO()
    Pickler(buf, protocol=2).dump(collections.OrderedDict(state))
    return buf.getvalue(), stores


def _write_zip(path, torch, state, data_pkl: bytes | None = None):
    pkl, stores = _pickle(torch, state, legacy=False)
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as zf:
        zf.writestr("archive/data.pkl", pkl if data_pkl is None else data_pkl)
        zf.writestr("archive/byteorder", "little")
        for key, s in stores.items():
            zf.writestr(f"archive/data/{key}", s.data.astype(s.data.dtype.newbyteorder("<")).tobytes())


def _write_legacy(path, torch, state, counts: dict[str, int] | None = None):
    pkl, stores = _pickle(torch, state, legacy=True)
    with open(path, "wb") as f:
        for header in (0x1950A86A20F9469CFC6C, 1001, {"protocol_version": 1001, "little_endian": True}):
            pickle.dump(header, f, protocol=2)
        f.write(pkl)
        pickle.dump(sorted(stores), f, protocol=2)
        for key in sorted(stores):
            s = stores[key]
            f.write(struct.pack("<q", (counts or {}).get(key, s.numel)))
            f.write(s.data.astype(s.data.dtype.newbyteorder("<")).tobytes())


WRITERS = pytest.mark.parametrize("writer", [_write_zip, _write_legacy], ids=["zip", "legacy"])


# --- tensors may not expand their storage ------------------------------------------------


@WRITERS
@pytest.mark.parametrize("shape,stride", [
    ((4096, 4096), (0, 0)),  # one float broadcast into 64 MiB
    ((4096, 4096), (1, 0)),  # stride 0 in one dimension only
    ((2048, 2048), (1, 1)),  # overlapping rows: 4095 stored elements, 4M in the copy
], ids=["stride0", "stride0-inner", "overlap"])
def test_strides_cannot_expand_a_small_storage(tmp_path, fake_torch, writer, shape, stride):
    extent = sum((n - 1) * s for n, s in zip(shape, stride)) + 1
    path = tmp_path / "expand.pth"
    writer(path, fake_torch, {"ok": _Tensor(_Store("0", np.ones(3)), (3,), (1,)),
                              "blowup": _Tensor(_Store("1", np.ones(extent)), shape, stride)})
    with pytest.raises(UnsupportedCheckpointError, match=r"'blowup'.*expands a storage"):
        load_torch_state_dict(path)


def test_torch_saved_expanded_tensor_is_refused(tmp_path):
    torch = pytest.importorskip("torch")
    for legacy in (False, True):
        path = tmp_path / f"expanded_{legacy}.pth"
        torch.save({"w": torch.zeros(1).expand(4096, 4096)}, path, _use_new_zipfile_serialization=not legacy)
        with pytest.raises(UnsupportedCheckpointError, match="'w'.*expands a storage of 1 elements"):
            load_torch_state_dict(path)


@WRITERS
def test_many_tensors_sharing_one_storage_are_bounded(tmp_path, fake_torch, writer):
    store = _Store("0", np.ones(1 << 18))  # 1 MiB, viewed whole by 100 tensors
    path = tmp_path / "shared.pth"
    writer(path, fake_torch, {f"t{i}": _Tensor(store, (1 << 18,), (1,)) for i in range(100)})
    with pytest.raises(UnsupportedCheckpointError, match=r"tensor 't\d+'.*bytes of storage"):
        load_torch_state_dict(path)
    # A few tensors sharing a storage (tied weights) are fine.
    writer(path, fake_torch, {f"t{i}": _Tensor(store, (1 << 18,), (1,)) for i in range(3)})
    assert len(load_torch_state_dict(path)) == 3


# --- a storage's declared element count must match its stored bytes ----------------------


def test_zip_storage_count_must_match_member_bytes(tmp_path, fake_torch):
    # The tensor only reads the 2 stored floats, but the storage claims 2**40 elements.
    path = tmp_path / "liar.pth"
    _write_zip(path, fake_torch, {"w": _Tensor(_Store("0", [1.0, 2.0], numel=2**40), (2,), (1,))})
    with pytest.raises(UnsupportedCheckpointError, match=r"'archive/data/0' holds 8 bytes, expected 4398046511104"):
        load_torch_state_dict(path)

    _write_zip(path, fake_torch, {"w": _Tensor(_Store("0", [1.0, 2.0], numel=1), (1,), (1,))})
    with pytest.raises(UnsupportedCheckpointError, match=r"'archive/data/0' holds 8 bytes, expected 4"):
        load_torch_state_dict(path)


def test_zip_storage_member_must_exist(tmp_path, fake_torch):
    pkl, _ = _pickle(fake_torch, {"w": _Tensor(_Store("7", [1.0]), (1,), (1,))}, legacy=False)
    path = tmp_path / "missing.pth"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("archive/data.pkl", pkl)
    with pytest.raises(UnsupportedCheckpointError, match=r"storage '7'.*'archive/data/7' is missing"):
        load_torch_state_dict(path)


def test_legacy_storage_longer_than_the_file_is_refused(tmp_path, fake_torch):
    # Pickle and per-storage header agree on 2**60 elements; the file holds 2.
    path = tmp_path / "liar_legacy.pth"
    _write_legacy(path, fake_torch, {"w": _Tensor(_Store("0", [1.0, 2.0], numel=2**60), (2,), (1,))})
    with pytest.raises(UnsupportedCheckpointError, match=r"storage '0' declares 1152921504606846976 elements"):
        load_torch_state_dict(path)


def test_legacy_storage_view_must_lie_inside_its_storage(tmp_path, fake_torch):
    path = tmp_path / "view.pth"
    store = _Store("0", np.arange(4.0), view=(2, 10))  # elements 2..11 of a 4-element storage
    _write_legacy(path, fake_torch, {"w": _Tensor(store, (2,), (1,))})
    with pytest.raises(UnsupportedCheckpointError, match=r"storage '0': view of 10 elements at offset 2"):
        load_torch_state_dict(path)


# --- decompression and pickle lengths are bounded by what is stored -----------------------


def _raw_zip(members: list[tuple[str, bytes, int, int, int]]) -> bytes:
    """A zip of (name, stored payload, declared uncompressed size, CRC-32, method) members,
    written by hand: zipfile cannot write a member whose compressed bytes are given."""
    out, directory = io.BytesIO(), io.BytesIO()
    for name, payload, size, crc, method in members:
        offset, encoded = out.tell(), name.encode()
        out.write(struct.pack("<4s5H3L2H", b"PK\x03\x04", 20, 0, method, 0, 0, crc, len(payload), size,
                              len(encoded), 0) + encoded + payload)
        directory.write(struct.pack("<4s6H3L5H2L", b"PK\x01\x02", 20, 20, 0, method, 0, 0, crc, len(payload),
                                    size, len(encoded), 0, 0, 0, 0, 0, offset) + encoded)
    start, central = out.tell(), directory.getvalue()
    out.write(central + struct.pack("<4s4H2LH", b"PK\x05\x06", 0, 0, len(members), len(members),
                                    len(central), start, 0))
    return out.getvalue()


def _deflate_bomb(megabytes: int) -> tuple[bytes, int]:
    """Raw deflate of ``megabytes`` MiB of zeros (~1 KB per MiB) and its CRC, built fast:
    after a full flush the compressor's output for another MiB of zeros repeats exactly."""
    zeros = bytes(1 << 20)
    co = zlib.compressobj(9, zlib.DEFLATED, -15)
    block = co.compress(zeros) + co.flush(zlib.Z_FULL_FLUSH)
    assert co.compress(zeros) + co.flush(zlib.Z_FULL_FLUSH) == block
    crc = 0
    for _ in range(megabytes):
        crc = zlib.crc32(zeros, crc)
    return block * megabytes + co.flush(), crc


def test_deflate_bomb_is_refused_without_decompressing(tmp_path, fake_torch):
    megabytes = 1000  # 1.05e9 zero bytes in a ~1 MB file
    size = megabytes << 20
    payload, crc = _deflate_bomb(megabytes)
    assert zlib.decompressobj(-15).decompress(payload, 1 << 20) == bytes(1 << 20)
    # A consistent checkpoint: data.pkl declares exactly the bomb's float count.
    store = _Store("0", np.zeros(1), numel=size // 4)
    pkl, _ = _pickle(fake_torch, {"w": _Tensor(store, (size // 4,), (1,))}, legacy=False)
    path = tmp_path / "bomb.pth"
    path.write_bytes(_raw_zip([
        ("archive/data.pkl", pkl, len(pkl), zlib.crc32(pkl), zipfile.ZIP_STORED),
        ("archive/data/0", payload, size, crc, zipfile.ZIP_DEFLATED),
    ]))
    with zipfile.ZipFile(path) as zf:  # a well-formed zip that declares the true size
        info = zf.getinfo("archive/data/0")
        assert (info.file_size, info.compress_type) == (size, zipfile.ZIP_DEFLATED)
        assert zf.read("archive/data.pkl") == pkl
        with zf.open(info) as member:
            assert member.read(1 << 20) == bytes(1 << 20)

    # In a fresh process, so that its peak RSS measures this load alone.
    script = textwrap.dedent(f"""
        import json, resource, sys
        from featdp.extraction.backbones.torch_checkpoint import UnsupportedCheckpointError, load_torch_state_dict
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        try:
            load_torch_state_dict({str(path)!r})
            error = None
        except UnsupportedCheckpointError as err:
            error = str(err)
        after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        print(json.dumps({{"error": error, "grew_kib": after - before}}))
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["error"] is not None and "'archive/data/0'" in result["error"]
    assert "decompression bomb" in result["error"]
    assert result["grew_kib"] < 64 << 10  # far below the 1 GiB the member would expand to


def test_members_compressed_other_than_deflate_are_refused(tmp_path, fake_torch):
    # zipfile inflates bzip2 and lzma members with no output limit, so none is read.
    path = tmp_path / "bz2.pth"
    _write_zip(path, fake_torch, {"w": _Tensor(_Store("0", [1.0, 2.0]), (2,), (1,))})
    with zipfile.ZipFile(path) as src:
        members = {name: src.read(name) for name in src.namelist()}
    with zipfile.ZipFile(path, "w") as zf:
        for name, data in members.items():
            zf.writestr(name, data, zipfile.ZIP_BZIP2 if name == "archive/data/0" else zipfile.ZIP_STORED)
    with pytest.raises(UnsupportedCheckpointError, match=r"'archive/data/0' uses compression method 12"):
        load_torch_state_dict(path)


def test_pickle_length_beyond_the_data_is_refused(tmp_path):
    # BINBYTES8 declaring 2**62 bytes: the unpickler would allocate that before reading.
    evil = b"\x80\x04\x8e" + struct.pack("<Q", 2**62) + b"abc."
    path = tmp_path / "long.pth"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("archive/data.pkl", evil)
    with pytest.raises(UnsupportedCheckpointError, match="malformed pickle"):
        load_torch_state_dict(path)

    path = tmp_path / "long_legacy.pth"
    path.write_bytes(pickle.dumps(0x1950A86A20F9469CFC6C, protocol=2) + pickle.dumps(1001, protocol=2)
                     + evil)
    with pytest.raises(UnsupportedCheckpointError, match="malformed pickle"):
        load_torch_state_dict(path)


# --- paths that are not checkpoint files -------------------------------------------------


def test_directory_is_a_clear_error(tmp_path):
    with pytest.raises(UnsupportedCheckpointError, match="is a directory"):
        load_torch_state_dict(tmp_path)


# --- and real checkpoints still load exactly ---------------------------------------------


def test_efficientnet_lite0_weights_load_bit_identically():
    weights = pytest.importorskip("featdp.extraction.backbones.efficientnet_lite_weights")
    torch = pytest.importorskip("torch")
    try:
        path = weights.checkpoint_path("lite0")
    except FileNotFoundError as err:
        pytest.skip(str(err))
    ours = load_torch_state_dict(path)
    theirs = torch.load(path, map_location="cpu", weights_only=True)
    assert list(ours) == list(theirs)
    for key, tensor in theirs.items():
        expected = tensor.numpy()
        assert ours[key].dtype == expected.dtype and ours[key].shape == expected.shape, key
        assert ours[key].tobytes() == expected.tobytes(), key


@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy"])
def test_torch_saved_views_and_dtypes_round_trip(tmp_path, legacy):
    torch = pytest.importorskip("torch")
    base = torch.arange(24, dtype=torch.float32).reshape(4, 6)
    state = {"t": base.t(), "slice": base[1:3, 2:5], "half": base.half()[0], "long": torch.arange(5),
             "scalar": torch.tensor(3.5, dtype=torch.float64), "bool": torch.tensor([True, False]),
             "empty": torch.zeros(0, 7)}
    path = tmp_path / "views.pth"
    torch.save(state, path, _use_new_zipfile_serialization=not legacy)
    loaded = load_torch_state_dict(path)
    for key, tensor in state.items():
        np.testing.assert_array_equal(loaded[key], tensor.numpy(), err_msg=key)
        assert loaded[key].dtype == tensor.numpy().dtype, key
