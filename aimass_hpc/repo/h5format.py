"""The on-disk format of one checkpoint file: plain HDF5 that can also be memory-mapped.

Layout (``h5ls -r`` shows it)::

    /                       attrs: aimass_format, kind, name, version
    /aimass/metadata        JSON string: who/when/what (the sidecar holds the same)
    /aimass/manifest        JSON string: per stored buffer (columns): name, kind, dtype, shape,
                            nbytes, at (offset in /aimass/packed, or the dataset's path)
    /aimass/trees           JSON string: the model/optimizer/extra structures
    /aimass/checksums       uint64[n]: XXH3-64 of each buffer's bytes
    /aimass/packed          uint8[...]: all small buffers back to back (64-byte aligned)
    /model/<key>            one contiguous dataset per large tensor
    /optimizer/<path>, /extra/<path>

Why it looks like this:
- Large tensors are contiguous, uncompressed and aligned (default 1 MiB, the usual Lustre
  stripe) so a reader maps them straight from the page cache (``get_offset`` + ``np.memmap``).
- HDF5 has a per-object cost; thousands of small tensors (biases, norms, RNG states) would
  dominate save/load, so they share one packed dataset and an offset table in the manifest.
- The file is written in two steps: h5py lays out every dataset (early allocation, never
  filled) and writes the small metadata; then the raw bytes go in with large ``pwrite`` calls
  at the allocated offsets, hashing each buffer on the way. This keeps saves at raw disk speed.
- bfloat16/fp8 have no HDF5 type: they are stored as unsigned integers of the same width,
  with the logical dtype in the manifest and in a ``dtype`` attribute.
- Files are written with HDF5 1.10 format bounds so Debian's h5ls/h5dump (1.10) can read them.
"""

from __future__ import annotations

import json
import os
import threading
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import xxhash

from aimass_hpc.common.errors import InputError, IntegrityError, NotFoundError
from aimass_hpc.repo.codec import (
    NATURAL_DTYPES,
    Stored,
    TensorPool,
    decode,
    numpy_dtype,
    storage_shape,
)

FORMAT_VERSION = 1
LIBVER = ("v110", "v110")  # readable by HDF5 >= 1.10 (Debian 12's hdf5-tools)
PACK_ALIGN = 64  # alignment of buffers inside the packed dataset
_WRITE_CHUNK = 16 << 20  # pwrite size; writeback of each piece starts right after it
COMPRESSIONS = ("gzip", "lzf")

Stage = Callable[[str], None]


def pack_threshold(alignment: int) -> int:
    """Buffers smaller than this go into the packed dataset (and are not aligned)."""
    return min(max(alignment, 64 << 10), 1 << 20)


def _dataset_name(item: Stored, used: set[str]) -> str:
    section, _, rest = item.name.partition("/")
    rest = rest.replace("%", "%25").replace("/", "%2F")
    if rest in ("", ".", ".."):
        rest = "%" + rest
    name = f"/{section}/{rest}"
    if name in used:
        name = f"{name}#{item.index}"
    used.add(name)
    return name


def _json_dataset(f: Any, name: str, obj: Any) -> None:
    data = json.dumps(obj, separators=(",", ":"), allow_nan=False).encode("utf-8")
    f.create_dataset(name, data=np.array(data, dtype=f"S{max(len(data), 1)}"))


def _start_writeback() -> Callable[[int, int, int], None]:
    """``sync_file_range(fd, off, n, SYNC_FILE_RANGE_WRITE)`` where Linux offers it.

    Starting the writeback of each piece as soon as it is copied overlaps the disk with the
    copying of the next piece, so the final fsync has little left to wait for (about 20%
    faster than write-then-fsync here). It only starts I/O: durability is still the fsync's.
    """
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        fn = libc.sync_file_range
        fn.argtypes = [ctypes.c_int, ctypes.c_longlong, ctypes.c_longlong, ctypes.c_uint]
    except (OSError, AttributeError):
        return lambda fd, off, n: None
    return lambda fd, off, n: fn(fd, off, n, 2)


_writeback = _start_writeback()


def _pwrite_all(fd: int, buf: Any, offset: int, hasher: Any = None) -> None:
    """Write all of ``buf`` at ``offset`` in pieces, hashing each piece as it goes out."""
    view = memoryview(buf).cast("B")
    while view:
        n = os.pwrite(fd, view[:_WRITE_CHUNK], offset)
        if hasher is not None:
            hasher.update(view[:n])  # still in the CPU cache from the copy
        _writeback(fd, offset, n)
        view = view[n:]
        offset += n


def write_file(
    path: Path,
    *,
    pool: TensorPool,
    trees: dict[str, Any],
    metadata: dict[str, Any],
    alignment: int = 1 << 20,
    compression: str | None = None,
    stage: Stage | None = None,
    laid_out: Callable[[int], None] | None = None,
) -> None:
    """Write a complete checkpoint file at ``path`` (a temporary name) and fsync it.

    The caller publishes it with a rename; until then nobody reads it, so a crash here only
    leaves a temporary file behind. ``laid_out(size)`` is called once the file has its final
    size, before the tensor bytes are written (the caller overlaps its own work with them).
    """
    import h5py
    from h5py import h5d, h5p

    if not isinstance(alignment, int) or alignment < 1:
        raise InputError(f"alignment must be a positive number of bytes, got {alignment!r}")
    if compression is not None and compression not in COMPRESSIONS:
        raise InputError(f"unknown compression {compression!r}: use one of {COMPRESSIONS}")
    small = pack_threshold(alignment) if compression is None else 1 << 20
    items = pool.items
    packed = [it for it in items if it.nbytes < small]
    large = [it for it in items if it.nbytes >= small]
    packed_at: dict[int, int] = {}
    size = 0
    for it in packed:
        packed_at[it.index] = size
        size += -(-it.nbytes // PACK_ALIGN) * PACK_ALIGN
    if 0 < size < small and compression is None:
        size = small  # big enough to be aligned like the other datasets (the tail is a hole)

    used: set[str] = set()
    ds_names = {it.index: _dataset_name(it, used) for it in large}
    # Column-wise: a few thousand entries parse and print several times faster than rows.
    manifest = {
        "name": [it.name for it in items],
        "kind": [it.kind for it in items],
        "dtype": [it.dtype for it in items],
        "shape": [it.shape for it in items],
        "nbytes": [it.nbytes for it in items],
        "at": [packed_at.get(it.index, ds_names.get(it.index)) for it in items],
    }

    kwargs: dict[str, Any] = {"libver": LIBVER, "locking": False}
    if compression is None and alignment > 1:
        kwargs.update(alignment_threshold=small, alignment_interval=alignment)
    checksums = np.zeros(len(items), dtype="<u8")
    offsets: list[tuple[int, Any]] = []  # (file offset, buffer) written after h5py closes
    with h5py.File(path, "w", **kwargs) as f:
        f.attrs["aimass_format"] = FORMAT_VERSION
        for key in ("kind", "name", "version"):
            if metadata.get(key) is not None:
                f.attrs[key] = metadata[key]
        _json_dataset(f, "aimass/metadata", metadata)
        _json_dataset(f, "aimass/manifest", manifest)
        _json_dataset(f, "aimass/trees", trees)
        if compression is None:
            dcpl = h5p.create(h5p.DATASET_CREATE)
            dcpl.set_layout(h5d.CONTIGUOUS)
            dcpl.set_alloc_time(h5d.ALLOC_TIME_EARLY)
            dcpl.set_fill_time(h5d.FILL_TIME_NEVER)  # we write every byte ourselves
            for it in large:
                shape, dt = storage_shape(it), it.storage_dtype
                if shape == (it.nbytes,):
                    dt = "|u1"
                ds = f.create_dataset(ds_names[it.index], shape=shape, dtype=dt, dcpl=dcpl)
                if it.kind == "torch" and np.dtype(dt).str != _natural_str(it):
                    ds.attrs["dtype"] = str(it.dtype)
                offsets.append((_offset(ds), it))
            if size:
                ds = f.create_dataset("aimass/packed", shape=(size,), dtype="|u1", dcpl=dcpl)
                offsets.append((_offset(ds), "packed"))
            if len(items):
                ds = f.create_dataset(
                    "aimass/checksums", shape=checksums.shape, dtype="<u8", dcpl=dcpl
                )
                offsets.append((_offset(ds), "checksums"))
            else:
                f.create_dataset("aimass/checksums", data=checksums)
        else:
            _write_compressed(f, large, packed, packed_at, size, ds_names, checksums, compression)
    if stage:
        stage("layout-written")
    if laid_out:
        laid_out(path.stat().st_size)
    if compression is None:
        _write_raw(path, offsets, packed, packed_at, size, checksums, stage)
    else:
        _fsync_path(path)


def _offset(ds: Any) -> int:
    offset = ds.id.get_offset()
    if offset is None:  # early allocation guarantees an offset; anything else is a bug
        raise RuntimeError(f"HDF5 did not allocate {ds.name} contiguously")
    return offset


def _digest(data: np.ndarray) -> int:
    """xxh3-64 of a contiguous array's bytes (the per-tensor checksum)."""
    # numpy's stubs give ndarray a __buffer__ only for Python >= 3.12 (a stub gap: it works).
    return xxhash.xxh3_64_intdigest(data)  # type: ignore[arg-type]


def _natural_str(it: Stored) -> str | None:
    return NATURAL_DTYPES.get(str(it.dtype))


def _write_raw(
    path: Path,
    offsets: list[tuple[int, Any]],
    packed: list[Stored],
    packed_at: dict[int, int],
    size: int,
    checksums: np.ndarray,
    stage: Stage | None,
) -> None:
    """Fill the allocated datasets with ``pwrite`` in file order, then fsync."""
    fd = os.open(path, os.O_WRONLY)
    try:
        for offset, what in sorted(offsets, key=lambda x: x[0]):
            if what == "checksums":
                continue
            if what == "packed":
                blob = np.zeros(size, dtype=np.uint8)
                for it in packed:
                    at = packed_at[it.index]
                    blob[at : at + it.nbytes] = it.raw
                    checksums[it.index] = _digest(it.raw)
                _pwrite_all(fd, blob, offset)
            else:
                hasher = xxhash.xxh3_64()
                _pwrite_all(fd, what.raw, offset, hasher)
                checksums[what.index] = hasher.intdigest()
            if stage:
                stage("data-written")
        for offset, what in offsets:
            if what == "checksums":
                _pwrite_all(fd, checksums, offset)
        os.fsync(fd)
    finally:
        os.close(fd)
    if stage:
        stage("file-synced")


def _write_compressed(
    f: Any,
    large: list[Stored],
    packed: list[Stored],
    packed_at: dict[int, int],
    size: int,
    ds_names: dict[int, str],
    checksums: np.ndarray,
    compression: str,
) -> None:
    """Archive layout: chunked, compressed datasets written through h5py (not mappable)."""
    opts: dict[str, Any] = {"compression": compression, "chunks": True}
    if compression == "gzip":
        opts["compression_opts"] = 4
    for it in large:
        shape = storage_shape(it)
        dt = "|u1" if shape == (it.nbytes,) else it.storage_dtype
        arr = it.raw.view(dt).reshape(shape)
        ds = f.create_dataset(ds_names[it.index], data=arr, shuffle=arr.itemsize > 1, **opts)
        if it.kind == "torch" and np.dtype(dt).str != _natural_str(it):
            ds.attrs["dtype"] = str(it.dtype)
        checksums[it.index] = _digest(it.raw)
    if size:
        blob = np.zeros(size, dtype=np.uint8)
        for it in packed:
            at = packed_at[it.index]
            blob[at : at + it.nbytes] = it.raw
            checksums[it.index] = _digest(it.raw)
        f.create_dataset("aimass/packed", data=blob, **opts)
    f.create_dataset("aimass/checksums", data=checksums)


def _fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# ----------------------------------------------------------------------------------- reading


def _open_h5(path: Path, label: str) -> Any:
    """Open read-only without HDF5 file locking (the file is immutable; Lustre breaks locks)."""
    import h5py

    try:
        return h5py.File(path, "r", locking=False)
    except FileNotFoundError as exc:
        raise NotFoundError(f"{label}: file is missing: {path}") from exc
    except PermissionError as exc:
        raise InputError(f"{label}: permission denied reading {path}") from exc
    except OSError as exc:
        msg = str(exc)
        if "truncated" in msg:
            size = _size(path)
            raise IntegrityError(f"{label}: file is truncated ({size} bytes): {path}") from exc
        raise IntegrityError(f"{label}: corrupt or unreadable HDF5 file {path}: {msg}") from exc


def _size(path: Path) -> int | str:
    try:
        return path.stat().st_size
    except OSError:
        return "?"


def _read_json(f: Any, name: str, label: str, path: Path) -> Any:
    try:
        return json.loads(bytes(f[name][()]).decode("utf-8"))
    except KeyError as exc:
        raise IntegrityError(f"{label}: {path} is not an aimass checkpoint (no {name})") from exc
    except (OSError, ValueError) as exc:
        raise IntegrityError(f"{label}: cannot read {name} from {path}: {exc}") from exc


def read_metadata(path: Path, label: str = "checkpoint") -> dict[str, Any]:
    """Read only the metadata of a checkpoint file (no tensors)."""
    with _open_h5(path, label) as f:
        return _read_json(f, "aimass/metadata", label, path)


def _manifest_rows(cols: dict[str, list[Any]]) -> list[dict[str, Any]]:
    """The column-wise manifest as one dict per buffer; ``at`` becomes packed/dataset."""
    rows = []
    try:
        for i, (name, kind, dtype, shape, nbytes, at) in enumerate(
            zip(
                cols["name"],
                cols["kind"],
                cols["dtype"],
                cols["shape"],
                cols["nbytes"],
                cols["at"],
                strict=True,
            )
        ):
            e = {
                "index": i,
                "name": name,
                "kind": kind,
                "dtype": dtype,
                "shape": shape,
                "nbytes": nbytes,
            }
            e["packed" if isinstance(at, int) else "dataset"] = at
            rows.append(e)
    except (KeyError, TypeError, ValueError) as exc:
        raise IntegrityError(f"malformed tensor manifest: {exc}") from exc
    return rows


class CheckpointFile:
    """A committed checkpoint file opened for reading: manifest, trees, checksums, offsets.

    Opening reads only metadata. Tensors are mapped or read on :meth:`load`; :meth:`verify`
    hashes every buffer and names those that do not match.
    """

    def __init__(self, path: Path, label: str, expected_size: int | None = None) -> None:
        self.path = Path(path)
        self.label = label
        self.size = self.path.stat().st_size if self.path.exists() else 0
        if expected_size is not None and self.size < expected_size:
            raise IntegrityError(
                f"{label}: file is truncated ({self.size} of {expected_size} bytes): {path}"
            )
        if expected_size is not None and self.size > expected_size:
            raise IntegrityError(
                f"{label}: file was modified after the commit ({self.size} bytes, "
                f"{expected_size} expected): {path}"
            )
        self._h5 = None
        with _open_h5(self.path, label) as f:
            if "aimass_format" not in f.attrs:
                raise IntegrityError(f"{label}: {path} is not an aimass checkpoint file")
            self.metadata = _read_json(f, "aimass/metadata", label, path)
            self.manifest = _manifest_rows(_read_json(f, "aimass/manifest", label, path))
            self.trees: dict[str, Any] = _read_json(f, "aimass/trees", label, path)
            try:
                self.checksums = np.asarray(f["aimass/checksums"][()], dtype="<u8")
            except (KeyError, OSError) as exc:
                raise IntegrityError(f"{label}: cannot read checksums from {path}") from exc
            self._locate(f)

    def _locate(self, f: Any) -> None:
        """Absolute file offset of each buffer, or None where it must be read through HDF5."""
        self.chunked = False
        packed_off = None
        if "aimass/packed" in f:
            ds = f["aimass/packed"]
            packed_off = ds.id.get_offset() if ds.compression is None else None
        for e in self.manifest:
            if "packed" in e:
                e["offset"] = None if packed_off is None else packed_off + e["packed"]
            else:
                ds = f[e["dataset"]]
                e["offset"] = ds.id.get_offset() if ds.compression is None else None
            if e["nbytes"] and e["offset"] is None:
                self.chunked = True
            elif e["nbytes"] and e["offset"] + e["nbytes"] > self.size:
                raise IntegrityError(
                    f"{self.label}: file is truncated: tensor '{e['name']}' ends at byte "
                    f"{e['offset'] + e['nbytes']} but the file has {self.size} bytes: {self.path}"
                )

    def close(self) -> None:
        if self._h5 is not None:
            self._h5.close()
            self._h5 = None

    def _h5_file(self) -> Any:
        if self._h5 is None:
            self._h5 = _open_h5(self.path, self.label)
        return self._h5

    # -- verification -----------------------------------------------------------------------

    def check(self, e: dict[str, Any], raw: np.ndarray) -> str | None:
        """Return a failure message if ``raw`` does not match the stored checksum."""
        got = _digest(raw) if raw.nbytes else xxhash.xxh3_64_intdigest(b"")
        want = int(self.checksums[e["index"]])
        if got != want:
            return f"tensor '{e['name']}': checksum mismatch (stored {want:016x}, read {got:016x})"
        return None

    def verify(self) -> tuple[int, int, list[str]]:
        """Hash every buffer; returns ``(buffers, bytes, failures)``."""
        read = _BufferReader(self, mmap=True)
        failures: list[str] = []
        nbytes = 0
        try:
            for e in self.manifest:
                msg = self.check(e, read(e))
                nbytes += e["nbytes"]
                if msg:
                    failures.append(msg)
        finally:
            read.close()
        return len(self.manifest), nbytes, failures

    # -- loading ----------------------------------------------------------------------------

    def load(
        self, *, device: str = "cpu", mmap: bool = True, verify: bool = True
    ) -> tuple[Any, Any, Any]:
        """Return ``(state_dict, optimizer, extra)``; tensors are mapped where possible."""
        import torch

        from aimass_hpc.repo.codec import torch_dtype

        read = _BufferReader(self, mmap=mmap)
        entries = self.manifest
        cache: dict[tuple[int, bool], Any] = {}
        dtypes: dict[str, Any] = {}
        dev = torch.device(device)
        # Large mapped buffers are hashed in a thread, in file order, while this one builds
        # the tensors (xxhash releases the GIL); the load fails at the end on any mismatch.
        # Small packed ones are hashed inline: per-call GIL hand-offs would cost more.
        hashing = (
            _Verifier(self, read) if verify and read.mm is not None and not self.chunked else None
        )

        def raw(i: int) -> np.ndarray:
            e = entries[i]
            data = read(e)
            if verify and (hashing is None or "packed" in e):
                msg = self.check(e, data)
                if msg:
                    raise IntegrityError(f"{self.label}: {msg} in {self.path}")
            return data

        def tensor(i: int, to_device: bool) -> Any:
            key = (i, to_device)
            if key not in cache:
                e = entries[i]
                if e["kind"] != "torch":
                    cache[key] = array(i)
                    return cache[key]
                dt = dtypes.get(e["dtype"])
                if dt is None:
                    dt = dtypes[e["dtype"]] = torch_dtype(e["dtype"])
                data = raw(i)
                if not data.nbytes:
                    t = torch.empty(e["shape"], dtype=dt)
                else:
                    if (e["offset"] or 0) % dt.itemsize:
                        data = data.copy()  # misaligned (only in unaligned files): copy once
                    t = torch.from_numpy(data).view(dt).reshape(e["shape"])
                if to_device and dev.type != "cpu":
                    t = t.to(dev)
                cache[key] = t
            return cache[key]

        def array(i: int) -> np.ndarray:
            e = entries[i]
            dt = numpy_dtype(e["dtype"])
            data = np.asarray(raw(i))
            if (e["offset"] or 0) % max(dt.alignment, 1):
                data = data.copy()
            return data.view(dt).reshape(e["shape"])

        try:
            trees = self.trees
            state_dict = None
            if "model" in trees:
                # The model tree is always a plain name -> value object (never a marker).
                state_dict = OrderedDict()
                for key, ref in trees["model"].items():
                    i = ref.get("__tensor__") if type(ref) is dict and len(ref) == 1 else None
                    if type(i) is int:
                        state_dict[key] = tensor(i, True)
                    else:
                        state_dict[key] = decode(ref, lambda i: tensor(i, True), array)
                if "model_metadata" in trees:
                    state_dict._metadata = decode(  # type: ignore[attr-defined]
                        trees["model_metadata"], lambda i: tensor(i, False), array
                    )
            optimizer = None
            if "optimizer" in trees:
                optimizer = decode(trees["optimizer"], lambda i: tensor(i, False), array)
            extra = None
            if "extra" in trees:
                extra = decode(trees["extra"], lambda i: tensor(i, False), array)
        finally:
            failure = hashing.join() if hashing else None
            read.close()
        if failure:
            raise IntegrityError(f"{self.label}: {failure} in {self.path}")
        return state_dict, optimizer, extra


class _Verifier:
    """Checks every buffer of a mapped file in a background thread; ``join`` gives the
    first failure message, or None."""

    def __init__(self, cf: CheckpointFile, read: _BufferReader) -> None:
        self.failure: str | None = None
        large = (e for e in cf.manifest if e["nbytes"] and "packed" not in e)
        order = sorted(large, key=lambda e: e["offset"])

        def run() -> None:
            for e in order:
                msg = cf.check(e, read(e))
                if msg:
                    self.failure = msg
                    return

        self.thread = threading.Thread(target=run, name="aimass-verify", daemon=True)
        self.thread.start()

    def join(self) -> str | None:
        self.thread.join()
        return self.failure


class _BufferReader:
    """Returns each manifest entry's bytes as a 1-D uint8 array: mapped, read, or via HDF5."""

    def __init__(self, cf: CheckpointFile, mmap: bool) -> None:
        self.cf = cf
        self.mm = None
        self.fd: int | None = None
        self.packed: np.ndarray | None = None
        if mmap and cf.size:
            # Copy-on-write mapping: pages come straight from the page cache and tensors are
            # writable (torch wants that); any write stays private to this process.
            # A plain ndarray view: slicing it is cheaper than slicing the memmap subclass.
            self.mm = np.memmap(cf.path, dtype=np.uint8, mode="c").view(np.ndarray)
        elif not mmap:
            self.fd = os.open(cf.path, os.O_RDONLY)

    def __call__(self, e: dict[str, Any]) -> np.ndarray:
        n = e["nbytes"]
        if n == 0:
            return np.empty(0, dtype=np.uint8)
        if e["offset"] is None:
            return self._via_h5(e)
        if self.mm is not None:
            return self.mm[e["offset"] : e["offset"] + n]
        # Without a mapping the file is open: mmap=False, or an empty file, whose entries all
        # have nbytes == 0 (CheckpointFile rejects any reaching past the end).
        fd = self.fd
        assert fd is not None
        buf = np.empty(n, dtype=np.uint8)
        view = buf.data  # the array's memoryview (memoryview(buf) trips numpy's py3.11 stubs)
        got = 0
        while got < n:
            k = os.preadv(fd, [view[got:]], e["offset"] + got)
            if k == 0:
                raise IntegrityError(f"{self.cf.label}: file is truncated: {self.cf.path}")
            got += k
        return buf

    def _via_h5(self, e: dict[str, Any]) -> np.ndarray:
        h5 = self.cf._h5_file()
        if "packed" in e:
            if self.packed is None:
                self.packed = np.asarray(h5["aimass/packed"][()]).view(np.uint8)
            return self.packed[e["packed"] : e["packed"] + e["nbytes"]]
        return np.ascontiguousarray(h5[e["dataset"]][()]).reshape(-1).view(np.uint8)

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None
        self.cf.close()
