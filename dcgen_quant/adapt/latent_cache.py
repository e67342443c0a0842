"""On-disk, sharded, memory-mapped caches of latents and text embeddings.

The autoencoders and text encoders run once, before any training, and their outputs go to disk;
training then reads only the rows of each batch through memory maps, so neither the encoders
nor the whole dataset are in memory while the transformer trains (FLUX's T5-XXL alone is 9.5 GB
in bf16, and at 4K one image's FLUX-VAE latent is 16 MB).

Layout of one cache (``OUT/cache/<kind>-<key>/``)::

    index.json                 format, key, rows, tensors {name: shape, dtype}, shards
                               [{file, start, stop, bytes}], extra (e.g. image names)
    shard-00000.safetensors    rows [start, stop) of every tensor

``key`` is a hash of everything the contents depend on (image bytes, resolution, autoencoder
directories; text encoder and captions), so a stale cache is never read. Shards are written one
at a time, atomically, and ``index.json`` last: an interrupted build resumes at the first missing
shard and reuses the finished ones. Reading checks the index against the files (names, sizes,
shapes, dtypes) and fails with a one-line error naming the bad file.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import torch

from ..atomic import atomic_path, atomic_write_text

FORMAT = 1
INDEX = "index.json"
ROWS_PER_SHARD = 64


def _shard_name(i: int) -> str:
    return f"shard-{i:05d}.safetensors"


class RowStore:
    """The rows of one cached tensor across shards, read through memory maps.

    Behaves like a read-only tensor for what the stages do with a dataset: ``shape``, ``dtype``,
    ``len()`` and indexing rows with an int, a slice or an int64 tensor (which returns a plain
    tensor holding just those rows, read from the files).
    """

    def __init__(self, name: str, shape: tuple[int, ...], dtype: torch.dtype, shards: list):
        """``shards``: [(safe_open handle, start, stop)] covering rows 0 .. shape[0]."""
        self.name, self.shape, self.dtype = name, torch.Size(shape), dtype
        self._shards = shards
        self._starts = [s for _, s, _ in shards]

    def __len__(self) -> int:
        return self.shape[0]

    def dim(self) -> int:
        return len(self.shape)

    def _rows(self, start: int, stop: int) -> torch.Tensor:
        """Rows [start, stop) as one tensor (they may span shards)."""
        parts = []
        for handle, s, e in self._shards:
            a, b = max(start, s), min(stop, e)
            if a < b:
                parts.append(handle.get_slice(self.name)[a - s : b - s])
        if not parts:
            return torch.empty((0, *self.shape[1:]), dtype=self.dtype)
        return parts[0] if len(parts) == 1 else torch.cat(parts)

    def __getitem__(self, index) -> torch.Tensor:
        n = self.shape[0]
        if isinstance(index, int):
            if not -n <= index < n:
                raise IndexError(f"{self.name}: row {index} of {n}")
            index %= n
            return self._rows(index, index + 1)[0]
        if isinstance(index, slice):
            start, stop, step = index.indices(n)
            if step != 1:
                return self[torch.arange(start, stop, step)]
            return self._rows(start, max(start, stop))
        idx = torch.as_tensor(index, dtype=torch.int64).reshape(-1)
        if idx.numel() and (int(idx.min()) < -n or int(idx.max()) >= n):
            raise IndexError(f"{self.name}: rows {idx.tolist()} out of {n}")
        idx = idx % max(n, 1)
        out = torch.empty((idx.numel(), *self.shape[1:]), dtype=self.dtype)
        order = torch.argsort(idx)
        wanted = idx[order].tolist()
        i = 0
        while i < len(wanted):  # read each run of consecutive rows with one slice
            j = i
            while j + 1 < len(wanted) and wanted[j + 1] - wanted[j] in (0, 1):
                j += 1
            block = self._rows(wanted[i], wanted[j] + 1)
            out[order[i : j + 1]] = block[torch.tensor(wanted[i : j + 1]) - wanted[i]]
            i = j + 1
        return out.reshape(*torch.as_tensor(index).shape, *self.shape[1:])

    def materialize(self) -> torch.Tensor:
        """All rows as one in-memory tensor."""
        return self._rows(0, self.shape[0])


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _check_shard(path: Path, tensors: dict, rows: int) -> None:
    """Raise ValueError unless ``path`` holds ``tensors`` (name -> (shape[1:], dtype)) x rows."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            for name, (shape, dtype) in tensors.items():
                sl = f.get_slice(name)
                if tuple(sl.get_shape()) != (rows, *shape):
                    want = [rows, *shape]
                    raise ValueError(f"{name} has shape {sl.get_shape()}; expected {want}")
                if rows and sl[0:1].dtype != dtype:
                    raise ValueError(f"{name} has dtype {sl[0:1].dtype}; expected {dtype}")
    except ValueError:
        raise
    except Exception as exc:  # safetensors raises SafetensorError for a damaged header
        raise ValueError(f"{type(exc).__name__}: {str(exc).strip()[:120]}") from exc


def open_cache(path: str | Path) -> tuple[dict[str, RowStore], dict]:
    """The tensors (name -> :class:`RowStore`) and the ``extra`` dict of a finished cache."""
    from safetensors import safe_open

    path = Path(path)
    index_file = path / INDEX
    try:
        index = json.loads(index_file.read_text())
        shards = index["shards"]
        spec = {
            k: (tuple(v["shape"]), getattr(torch, v["dtype"])) for k, v in index["tensors"].items()
        }
        rows = int(index["rows"])
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise ValueError(f"cache: {index_file} is unreadable ({exc}); delete {path}") from exc
    if index.get("format") != FORMAT:
        raise ValueError(f"cache: {index_file} has format {index.get('format')}; delete {path}")
    handles = []
    expect = 0
    for shard in shards:
        f = path / shard["file"]
        if not f.is_file() or f.stat().st_size != shard["bytes"] or shard["start"] != expect:
            raise ValueError(f"cache: {f} is missing, truncated or out of order; delete {path}")
        handles.append((safe_open(str(f), framework="pt"), shard["start"], shard["stop"]))
        expect = shard["stop"]
    if expect != rows:
        raise ValueError(f"cache: {index_file} covers {expect} of {rows} rows; delete {path}")
    stores = {name: RowStore(name, (rows, *s), dt, handles) for name, (s, dt) in spec.items()}
    return stores, index.get("extra", {})


def build_cache(
    path: str | Path,
    key: str,
    rows: int,
    produce: Callable[[int, int], dict[str, torch.Tensor]],
    *,
    extra: dict | None = None,
    rows_per_shard: int = ROWS_PER_SHARD,
    progress: bool = True,
    desc: str = "cache",
) -> tuple[dict[str, RowStore], dict]:
    """Open the cache at ``path``, first writing whatever of it is missing.

    Parameters
    ----------
    key : identifies the contents (stored in the index; a different key is an error)
    rows : number of rows
    produce : ``produce(start, stop) -> {name: tensor [stop - start, ...]}``; called only for
        missing shards (it may load encoders on first use)
    extra : JSON-able facts stored with the index (e.g. the image names)
    rows_per_shard : rows per shard file

    Returns
    -------
    (name -> :class:`RowStore`, extra)
    """
    from safetensors.torch import save_file
    from tqdm.auto import tqdm

    path = Path(path)
    if (path / INDEX).is_file():
        stored = json.loads((path / INDEX).read_text()).get("key")
        if stored != key:
            raise ValueError(f"cache: {path} holds key {stored}; expected {key}; delete it")
        return open_cache(path)
    path.mkdir(parents=True, exist_ok=True)
    bounds = [(s, min(rows, s + rows_per_shard)) for s in range(0, rows, rows_per_shard)]
    spec: dict | None = None
    shards = []
    for i, (start, stop) in enumerate(tqdm(bounds, desc=desc, disable=not progress, leave=False)):
        f = path / _shard_name(i)
        if f.is_file() and spec is not None:
            try:  # a shard of an interrupted build: reuse it when it is whole
                _check_shard(f, spec, stop - start)
            except ValueError:
                f.unlink()
        if not (f.is_file() and spec is not None):
            out = {k: v.contiguous() for k, v in produce(start, stop).items()}
            for name, t in out.items():
                if t.shape[0] != stop - start:
                    want = stop - start
                    raise ValueError(f"{desc}: {name} has {t.shape[0]} rows; expected {want}")
            got = {k: (tuple(v.shape[1:]), v.dtype) for k, v in out.items()}
            if spec is not None and got != spec:
                raise ValueError(f"{desc}: rows {start}..{stop} have shapes {got}; earlier {spec}")
            spec = got
            with atomic_path(f) as tmp:
                save_file(out, str(tmp))
        shards.append({"file": f.name, "start": start, "stop": stop, "bytes": f.stat().st_size})
    spec = spec or {}
    index = {
        "format": FORMAT,
        "key": key,
        "rows": rows,
        "tensors": {k: {"shape": list(s), "dtype": _dtype_name(d)} for k, (s, d) in spec.items()},
        "shards": shards,
        "extra": extra or {},
    }
    atomic_write_text(path / INDEX, json.dumps(index, indent=1) + "\n")
    return open_cache(path)
