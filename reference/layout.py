"""The flash layout: where each neuron's FFN weights live on flash, and how a checkpoint is converted to it.

A flash directory holds
- `resident.safetensors`: everything but the FFN matrices (embeddings, attention, norms, head, FFN biases),
  under our parameter names;
- `ffn-NNN.bin`, one per layer: the FFN matrices, one *vector* per neuron and matrix (the up and gate
  projections' row i, the down projection's column i), in one of two layouts:
  - **bundled**: neuron i's vectors stored together as one record at `i * record_bytes`, so one read fetches the
    neuron's whole working set;
  - **unbundled**: each matrix's vectors in a region of their own, so one neuron costs one read per matrix;
- `layout.json`, written last: format version, architecture, dtypes, shapes, record geometry, alignment, a sha256
  per file, the source checkpoint's hash, and, where dead neurons were pruned, the neurons each layer keeps.
  A directory without it is not a flash directory.

Storage dtypes float32, float16, bfloat16 and int8. An int8 vector starts with its float32 scale (symmetric,
per neuron and matrix) followed by the int8 values; dequantized it is `scale * values`.
"""

from __future__ import annotations

import errno
import hashlib
import json
import math
import os
import shutil
import tempfile
import typing
from collections.abc import Callable
from dataclasses import MISSING, asdict, dataclass, fields, replace
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError, safe_open

from .checkpoint import all_finite, expected_shapes, hf_name, weight_files, write_safetensors_streaming
from .config import ARCHITECTURES, ModelConfig, read_json_object
from .errors import CheckpointError, LayoutError

FORMAT = "flashbench-flash-layout"
FORMAT_VERSION = 2  # 2: the checkpoint a layout came from is its "origin" (1 called it "source")
ALIGNMENT = 4096  # file sizes and regions are multiples of this; also the direct-I/O block size we assume
LAYOUTS = ("bundled", "unbundled")  # one record per neuron, or one region per matrix
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "int8": torch.int8}
ELEMENT_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2, "int8": 1}
SCALE_BYTES = 4  # the float32 scale in front of each int8 vector


MAX_DIMENSION = 1 << 31  # no real model has a dimension (or layer count) near this


def _checked(cls, table, where: str):
    """`cls` built from a JSON object, every field of its annotated type (dimensions positive and sane), or a
    LayoutError naming what is wrong: layout.json is untrusted input."""
    if not isinstance(table, dict):
        raise LayoutError(f"{where}: expected an object, got {type(table).__name__}")
    hints = typing.get_type_hints(cls)
    known = {f.name for f in fields(cls)}
    if set(table) - known:
        raise LayoutError(f"{where}: unknown keys {sorted(set(table) - known)}")
    values = {}
    for f in fields(cls):
        if f.name not in table:
            if f.default is MISSING:
                raise LayoutError(f"{where}: missing {f.name!r}")
            continue
        v, t = table[f.name], hints[f.name]
        if t is int:
            ok = type(v) is int and 0 < v <= MAX_DIMENSION
        elif t is float:
            ok = type(v) in (int, float) and math.isfinite(v)
        elif t == int | None:
            ok = v is None or (type(v) is int and v >= 0)
        elif t == tuple[str, ...]:
            ok, v = isinstance(v, list) and all(isinstance(x, str) for x in v), tuple(v) if isinstance(v, list) else v
        else:
            ok = isinstance(v, t)
        if not ok:
            raise LayoutError(f"{where}: {f.name!r} = {str(v)[:60]!r} is not a valid {t}")
        values[f.name] = v
    return cls(**values)


@dataclass(frozen=True)
class FFNGeometry:
    """Byte geometry of one layer's FFN file (`d_ffn` is the neurons it stores: fewer where pruned)."""

    layout: str  # "bundled" or "unbundled"
    dtype: str
    d_model: int
    d_ffn: int
    vectors: tuple[str, ...]  # per neuron, in record order: ("up", "down") or ("gate", "up", "down")

    @property
    def element_bytes(self) -> int:
        return ELEMENT_BYTES[self.dtype]

    @property
    def vector_bytes(self) -> int:
        return self.d_model * self.element_bytes + (SCALE_BYTES if self.dtype == "int8" else 0)

    @property
    def record_bytes(self) -> int:
        """Bytes of one neuron's working set, and its size in the reader's output rows (either layout)."""
        return self.vector_bytes * len(self.vectors)

    @property
    def region_bytes(self) -> int:
        """Unbundled: bytes of one matrix's region, padded to the alignment."""
        return _round_up(self.d_ffn * self.vector_bytes, ALIGNMENT)

    @property
    def file_bytes(self) -> int:
        if self.layout == "bundled":
            return _round_up(self.d_ffn * self.record_bytes, ALIGNMENT)
        return self.region_bytes * len(self.vectors)

    @property
    def neuron_stride(self) -> int:
        """How much further in the file neuron i + 1's vectors lie than neuron i's."""
        return self.record_bytes if self.layout == "bundled" else self.vector_bytes

    def spans_from(self, first: int) -> list[tuple[int, int]]:
        """(start, end) file offsets of the records from `first` on (first 0: the whole file), the start aligned
        down: one span (the whole file, or bundled) or one in each matrix's region (unbundled)."""
        if self.layout == "bundled" or first == 0:
            return [(first * self.record_bytes // ALIGNMENT * ALIGNMENT, self.file_bytes)]
        start = first * self.vector_bytes // ALIGNMENT * ALIGNMENT
        return [(j * self.region_bytes + start, (j + 1) * self.region_bytes) for j in range(len(self.vectors))]

    def extents(self, neuron: int) -> list[tuple[int, int]]:
        """(file offset, length) of each vector of one neuron's record, in record order: one after the other
        (bundled), or one in each matrix's region (unbundled)."""
        if self.layout == "bundled":
            return [(neuron * self.record_bytes + j * self.vector_bytes, self.vector_bytes)
                    for j in range(len(self.vectors))]
        return [(j * self.region_bytes + neuron * self.vector_bytes, self.vector_bytes)
                for j in range(len(self.vectors))]


def _round_up(n: int, k: int) -> int:
    return -(-n // k) * k


# ---- vectors <-> bytes ------------------------------------------------------------------------------------------


def encode_vectors(matrix: torch.Tensor, dtype: str) -> np.ndarray:
    """[n, d] float weights -> [n, vector_bytes] uint8 in the storage dtype (int8: scale + values)."""
    if dtype != "int8":
        as_dtype = matrix.to(DTYPES[dtype]).contiguous()
        return as_dtype.view(torch.uint8).numpy().reshape(matrix.shape[0], -1)
    m = matrix.float()
    scale = m.abs().amax(dim=1) / 127.0
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    q = torch.clamp(torch.round(m / scale[:, None]), -127, 127).to(torch.int8)
    scale_bytes = scale.contiguous().view(torch.uint8).numpy().reshape(-1, SCALE_BYTES)
    return np.concatenate([scale_bytes, q.view(torch.uint8).numpy()], axis=1)


def decode_vectors(raw: np.ndarray, dtype: str, d_model: int, out: torch.dtype = torch.float32) -> torch.Tensor:
    """[n, vector_bytes] uint8 -> [n, d] in `out` (int8 dequantized); a view where `out` is the stored dtype."""
    raw = np.ascontiguousarray(raw)
    if raw.shape[0] == 0:
        return torch.empty(0, d_model, dtype=out)
    if dtype != "int8":
        return torch.from_numpy(raw).view(DTYPES[dtype]).reshape(raw.shape[0], d_model).to(out)
    scale = torch.from_numpy(np.ascontiguousarray(raw[:, :SCALE_BYTES])).view(torch.float32).reshape(-1, 1)
    values = torch.from_numpy(np.ascontiguousarray(raw[:, SCALE_BYTES:])).view(torch.int8).float()
    return (values * scale).to(out)


def decode_records(records: np.ndarray, geometry: FFNGeometry,
                   out: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """Reader output [vectors, n, vector_bytes] (reader.record_buffer's rows [:, :n]) -> {"up": [n, d], "down": [n, d],
    ("gate": [n, d])} in `out`: each vector's rows one contiguous matrix, views of `records` (no copy) where `out`
    is the stored dtype."""
    return {name: decode_vectors(records[j], geometry.dtype, geometry.d_model, out)
            for j, name in enumerate(geometry.vectors)}


def decode_layer_file(data: np.ndarray, geometry: FFNGeometry,
                      out: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """A whole FFN file's bytes (naive mode) -> every neuron's vectors, {"up": [d_ffn, d], ...} in `out`."""
    n, vb, k = geometry.d_ffn, geometry.vector_bytes, len(geometry.vectors)
    if geometry.layout == "bundled":  # each vector's rows strided by the record
        records = data[: n * geometry.record_bytes].reshape(n, k, vb)
        if geometry.dtype != "int8":  # one conversion for all vectors
            values = torch.from_numpy(records).view(DTYPES[geometry.dtype]).reshape(n, k, geometry.d_model).to(out)
            return {name: values[:, j] for j, name in enumerate(geometry.vectors)}
        return {name: decode_vectors(records[:, j], geometry.dtype, geometry.d_model, out)
                for j, name in enumerate(geometry.vectors)}
    return {
        name: decode_vectors(data[j * geometry.region_bytes : j * geometry.region_bytes + n * vb].reshape(n, vb),
                             geometry.dtype, geometry.d_model, out)
        for j, name in enumerate(geometry.vectors)
    }


# ---- the flash directory ------------------------------------------------------------------------------------------


def ffn_file(layer: int) -> str:
    return f"ffn-{layer:03d}.bin"


@dataclass(frozen=True)
class FlashLayout:
    """An opened, verified flash directory."""

    path: Path
    config: ModelConfig
    geometry: FFNGeometry  # of an unpruned layer (all d_ffn neurons)
    resident_dtype: str
    origin: dict  # where the weights came from: the checkpoint's path and sha256, or a synthetic model's seed
    files: dict
    kept: list[np.ndarray] | None = None  # pruned or placed: per layer, the model's neuron ids stored, in file order
    # A gated FFN's gate matrices in resident.safetensors (`layers.N.ffn.gate.weight`, every neuron), its records
    # only up and down: the gate decides a thresholded SiLU's set before anything is read (CATS).
    gate_resident: bool = False

    def ffn_path(self, layer: int) -> Path:
        return self.path / ffn_file(layer)

    def geometry_of(self, layer: int) -> FFNGeometry:
        return self.geometry if self.kept is None else replace(self.geometry, d_ffn=len(self.kept[layer]))

    def stored_ids(self, layer: int) -> np.ndarray:
        """The model's neuron id of each stored record of `layer`."""
        return np.arange(self.geometry.d_ffn) if self.kept is None else self.kept[layer]

    @classmethod
    def open(cls, path: str | Path, verify: bool = True) -> "FlashLayout":
        """Open a flash directory; refuse a wrong format version, missing or resized files, and (with
        `verify`) any file whose sha256 differs from layout.json's."""
        path = Path(path)
        meta_path = path / "layout.json"
        if not meta_path.is_file():
            raise LayoutError(f"{path}: not a flash directory (no layout.json; an interrupted conversion leaves none)")
        meta = read_json_object(meta_path, LayoutError)
        if meta.get("format") != FORMAT:
            raise LayoutError(f"{meta_path}: not a {FORMAT} file")
        if meta.get("format_version") != FORMAT_VERSION:
            raise LayoutError(
                f"{meta_path}: format version {meta.get('format_version')!r}, this flashbench reads {FORMAT_VERSION}; "
                "convert the checkpoint again"
            )
        config = _checked(ModelConfig, meta.get("config"), f"{meta_path}: config")
        geometry = _checked(FFNGeometry, meta.get("geometry"), f"{meta_path}: geometry")
        files, origin, resident_dtype = meta.get("files"), meta.get("origin"), meta.get("resident_dtype")
        if geometry.layout not in LAYOUTS or geometry.dtype not in DTYPES:
            raise LayoutError(f"{meta_path}: unknown layout {geometry.layout!r} or dtype {geometry.dtype!r}")
        gate_resident = meta.get("gate") == "resident"
        vectors = record_vectors(config, gate_resident)
        if (config.arch not in ARCHITECTURES or geometry.vectors != vectors or geometry.d_model != config.d_model
                or geometry.d_ffn > config.d_ffn or not isinstance(resident_dtype, str)
                or resident_dtype not in DTYPES):
            raise LayoutError(f"{meta_path}: geometry {geometry} does not fit config {config}, or resident dtype "
                              f"{resident_dtype!r} is not one of {', '.join(DTYPES)}")
        if not isinstance(origin, dict) or not isinstance(files, dict) or not all(
                isinstance(i, dict) and type(i.get("bytes")) is int and isinstance(i.get("sha256"), str)
                for i in files.values()):
            raise LayoutError(f"{meta_path}: malformed: 'origin' must be an object and 'files' map each file to its "
                              "bytes (integer) and sha256 (string)")
        kept = meta.get("kept")
        if kept is not None:
            if not isinstance(kept, list) or not all(
                    isinstance(k, list) and all(type(i) is int for i in k) for k in kept):
                raise LayoutError(f"{meta_path}: malformed: 'kept' must be lists of neuron ids")
            kept = [np.asarray(k, dtype=np.int64) for k in kept]
        expected = {"resident.safetensors"} | {ffn_file(i) for i in range(config.n_layers)}
        if set(files) != expected:
            raise LayoutError(f"{meta_path}: lists files {sorted(files)}, expected {sorted(expected)}")
        for name, info in files.items():
            f = path / name
            if not f.is_file():
                raise LayoutError(f"{f}: missing from the flash directory")
            if f.stat().st_size != info["bytes"]:
                raise LayoutError(f"{f}: {f.stat().st_size} bytes, layout.json says {info['bytes']} (truncated?)")
            if verify and sha256_file(f) != info["sha256"]:
                raise LayoutError(f"{f}: checksum mismatch (the file changed after conversion)")
        if kept is not None and (len(kept) != config.n_layers or any(
                len(k) and (k.min() < 0 or k.max() >= config.d_ffn or len(np.unique(k)) != len(k)) for k in kept)):
            raise LayoutError(f"{meta_path}: 'kept' must list, per layer, distinct neuron ids below {config.d_ffn}")
        return cls(path, config, geometry, resident_dtype, origin, files, kept, gate_resident)

    def resident_state(self, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
        """The resident tensors under our names, in the compute dtype `dtype`."""
        f = self.path / "resident.safetensors"
        with safe_open(str(f), framework="pt") as st:
            return {name: st.get_tensor(name).to(dtype) for name in st.keys()}


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def checkpoint_hash(checkpoint_dir: Path) -> str:
    """sha256 over config.json and the weight files, in name order."""
    h = hashlib.sha256()
    for f in [checkpoint_dir / "config.json", *weight_files(checkpoint_dir)]:
        h.update(f.name.encode())
        h.update(sha256_file(f).encode())
    return h.hexdigest()


# ---- conversion ------------------------------------------------------------------------------------------------


class TensorSource:
    """Tensors of a checkpoint read one at a time, by our name (streaming: nothing else held in memory)."""

    def __init__(self, checkpoint_dir: Path, config: ModelConfig):
        self.config = config
        self.where: dict[str, Path] = {}
        for f in weight_files(checkpoint_dir):
            try:
                with safe_open(str(f), framework="pt") as st:
                    for name in st.keys():
                        self.where[name] = f
            except (SafetensorError, OSError) as e:
                raise CheckpointError(f"{f}: cannot read safetensors header ({e})") from e
        self.shapes = expected_shapes(config)
        missing = [n for n in self.shapes if hf_name(n, config.arch) not in self.where]
        if missing:
            raise CheckpointError(f"{checkpoint_dir}: missing tensor {hf_name(missing[0], config.arch)!r}")

    def get(self, name: str) -> torch.Tensor:
        theirs = hf_name(name, self.config.arch)
        f = self.where[theirs]
        try:
            with safe_open(str(f), framework="pt") as st:
                t = st.get_tensor(theirs)
        except (SafetensorError, OSError, RuntimeError) as e:
            raise CheckpointError(f"{f}: cannot read tensor {theirs!r} ({e})") from e
        if tuple(t.shape) != self.shapes[name]:
            raise CheckpointError(f"{f}: tensor {theirs!r} has shape {tuple(t.shape)}, expected {self.shapes[name]}")
        if not all_finite(t):
            raise CheckpointError(f"{f}: tensor {theirs!r} holds NaN or Inf values")
        return t


def record_vectors(config: ModelConfig, gate_resident: bool = False) -> tuple[str, ...]:
    """The vectors of a neuron's record, in order."""
    if gate_resident and not config.gated:
        raise LayoutError("gate_resident needs a gated FFN (the Llama family)")
    return ("gate", "up", "down") if config.gated and not gate_resident else ("up", "down")


def convert(checkpoint_dir: str | Path, out_dir: str | Path, layout: str = "bundled", dtype: str = "float16",
            progress=None, keep: list[np.ndarray] | None = None, pruning: dict | None = None,
            placement: dict | None = None, gate_resident: bool = False, sha256: str | None = None) -> FlashLayout:
    """Convert an HF checkpoint to a flash directory, streaming one tensor at a time.

    `keep` (per layer, the neuron ids to store) prunes the others, e.g. neurons never active on training text;
    `pruning` describes how they were chosen, for layout.json. `keep` in another order than the ids' places the
    records in that order (hot neurons first, say); `placement` describes it. `gate_resident` puts a gated FFN's
    gate matrices among the resident tensors and only up and down in the records. `sha256`: the checkpoint's
    `checkpoint_hash` where the caller has it already (a run converts one checkpoint into several layouts, and each
    hash reads all of it: 2 s a layout at the OPT 1.3B shape).

    The directory appears under its name only when complete (built in a temp dir beside it, then renamed);
    on any error nothing is left behind. `progress(done, total)` is called after each layer.
    """
    checkpoint_dir, out_dir = Path(checkpoint_dir), Path(out_dir)
    if out_dir.exists():
        raise LayoutError(f"{out_dir}: already exists; remove it or choose another output directory")
    config = ModelConfig.load(checkpoint_dir)
    source = TensorSource(checkpoint_dir, config)
    origin = {"path": str(checkpoint_dir.resolve()), "sha256": sha256 or checkpoint_hash(checkpoint_dir)}
    return write_layout(config, source.get, origin, out_dir, layout, dtype, progress, keep, pruning, placement,
                        gate_resident)


def write_layout(config: ModelConfig, tensor: Callable[[str], torch.Tensor], origin: dict, out_dir: str | Path,
                 layout: str = "bundled", dtype: str = "float16", progress=None, keep: list[np.ndarray] | None = None,
                 pruning: dict | None = None, placement: dict | None = None,
                 gate_resident: bool = False) -> FlashLayout:
    """A flash directory from `tensor(name)` (our names, fetched one at a time: nothing else is held in memory);
    `origin` goes into layout.json as where the weights came from. Atomic, as `convert` says."""
    out_dir = Path(out_dir)
    if layout not in LAYOUTS:
        raise LayoutError(f"layout must be one of {', '.join(LAYOUTS)}, got {layout!r}")
    if dtype not in DTYPES:
        raise LayoutError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    if out_dir.exists():
        raise LayoutError(f"{out_dir}: already exists; remove it or choose another output directory")
    if keep is not None:
        keep = [np.asarray(k, dtype=np.int64) for k in keep]
        if any(len(np.unique(k)) != len(k) for k in keep):
            raise ValueError("keep must not list a neuron twice in a layer")
    shapes = expected_shapes(config)
    vectors = record_vectors(config, gate_resident)
    geometry = FFNGeometry(layout, dtype, config.d_model, config.d_ffn, vectors)
    if keep is not None and (len(keep) != config.n_layers or any(
            len(k) and (k.min() < 0 or k.max() >= config.d_ffn) for k in keep)):
        raise ValueError(f"keep must list, per layer of {config.n_layers}, neuron ids below {config.d_ffn}")
    resident_dtype = "float32" if dtype == "float32" else ("float16" if dtype == "int8" else dtype)

    try:
        out_dir.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.converting-", dir=out_dir.parent))
    except OSError as e:
        raise LayoutError(f"{out_dir}: cannot write the flash directory there ({e.strerror or e})") from e
    try:
        resident = [n for n in shapes if ".ffn." not in n or n.endswith(".bias")
                    or (gate_resident and n.endswith(".ffn.gate.weight"))]
        write_safetensors_streaming(tmp / "resident.safetensors", resident, shapes, DTYPES[resident_dtype], tensor)
        _fsync(tmp / "resident.safetensors")
        for layer in range(config.n_layers):
            weights = {v: tensor(f"layers.{layer}.ffn.{v}.weight") for v in vectors}
            if keep is not None:
                ids = torch.from_numpy(keep[layer])
                weights = {v: w[:, ids] if v == "down" else w[ids] for v, w in weights.items()}
            _write_ffn_file(tmp / ffn_file(layer), replace(geometry, d_ffn=weights["down"].shape[1]), weights)
            _fsync(tmp / ffn_file(layer))  # file by file: a checkpoint bigger than DRAM never fills it with dirty pages
            if progress:
                progress(layer + 1, config.n_layers)
        files = {f.name: {"bytes": f.stat().st_size, "sha256": sha256_file(f)} for f in sorted(tmp.iterdir())}
        meta = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "config": config.as_dict(),
            "geometry": asdict(geometry),
            "record_bytes": geometry.record_bytes,  # derived; for readers of the JSON
            "vector_bytes": geometry.vector_bytes,
            "alignment": ALIGNMENT,
            "resident_dtype": resident_dtype,
            "files": files,
            "origin": origin,
            "kept": None if keep is None else [k.tolist() for k in keep],
            "pruning": pruning,
            "placement": placement,
            "gate": "resident" if gate_resident else "records",
        }
        (tmp / "layout.json").write_text(json.dumps(meta, indent=2) + "\n")
        _fsync(tmp / "layout.json")
        _fsync(tmp)
        os.replace(tmp, out_dir)
    except OSError as e:  # a full disk, say: the half-written directory goes, and the message says where
        shutil.rmtree(tmp, ignore_errors=True)
        raise LayoutError(f"{out_dir}: conversion failed ({e}); nothing was left behind") from e
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _fsync(out_dir.parent)  # the rename itself
    return FlashLayout.open(out_dir, verify=False)


def _fsync(path: Path) -> None:
    """`path` (a file, or a directory's entries) on the disk. A layout is renamed into place only once every byte of
    it is: a crash then never leaves a whole-looking layout with missing bytes, and the run measuring it next does not
    share the disk with its write-back (gigabytes at paper scale). A file system that cannot sync a directory (EINVAL)
    is left to its own ordering."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError as e:
        if e.errno != errno.EINVAL or not path.is_dir():
            raise
    finally:
        os.close(fd)


def _write_ffn_file(path: Path, geometry: FFNGeometry, weights: dict[str, torch.Tensor]) -> None:
    """One layer's FFN file: vectors are rows (up, gate: [f, d]) or columns (down: [d, f]) per neuron."""
    encoded = {
        name: encode_vectors(w.t() if name == "down" else w, geometry.dtype) for name, w in weights.items()
    }
    with open(path, "wb") as f:
        if geometry.layout == "bundled":
            f.write(np.concatenate([encoded[v] for v in geometry.vectors], axis=1))
        else:
            for v in geometry.vectors:
                f.write(encoded[v])
                f.write(bytes(geometry.region_bytes - encoded[v].nbytes))
        f.truncate(geometry.file_bytes)
