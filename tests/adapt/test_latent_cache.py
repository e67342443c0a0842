"""The sharded, memory-mapped latent / text cache: indexing, resume, damaged files."""

import json

import pytest
import torch

from dcgen_quant.adapt import latent_cache as LC


def data(n=11):
    g = torch.Generator().manual_seed(0)
    return {"a": torch.randn(n, 3, 4, 4, generator=g), "b": torch.randn(n, 5, generator=g)}


def build(path, full, calls=None, fail_at=None, rows_per_shard=4):
    def produce(start, stop):
        if calls is not None:
            calls.append((start, stop))
        if fail_at is not None and start >= fail_at:
            raise KeyboardInterrupt("interrupted while encoding")
        return {k: v[start:stop] for k, v in full.items()}

    n = len(full["a"])
    return LC.build_cache(
        path, "k1", n, produce, extra={"n": n}, rows_per_shard=rows_per_shard, progress=False
    )


def test_rows_read_back_exactly_for_any_index(tmp_path):
    full = data()
    stores, extra = build(tmp_path / "c", full)
    assert extra == {"n": 11}
    assert sorted(p.name for p in (tmp_path / "c").iterdir()) == [
        "index.json",
        "shard-00000.safetensors",
        "shard-00001.safetensors",
        "shard-00002.safetensors",
    ]
    a = stores["a"]
    assert a.shape == full["a"].shape and len(a) == 11 and a.dtype == torch.float32
    assert torch.equal(a.materialize(), full["a"])
    for index in (
        torch.tensor([10, 0, 3, 4, 4, 7, 2]),  # across shards, repeated, unsorted
        torch.tensor([5]),
        torch.arange(11),
        torch.tensor([[1, 9], [8, 0]]),
    ):
        assert torch.equal(a[index], full["a"][index])
        assert torch.equal(stores["b"][index], full["b"][index])
    assert torch.equal(a[2:9], full["a"][2:9]) and torch.equal(a[-1], full["a"][-1])
    assert torch.equal(a[1:10:3], full["a"][1:10:3])
    with pytest.raises(IndexError):
        a[torch.tensor([11])]


def test_an_interrupted_build_resumes_and_reuses_whole_shards(tmp_path):
    full = data()
    calls = []
    with pytest.raises(KeyboardInterrupt):
        build(tmp_path / "c", full, calls, fail_at=8)
    assert not (tmp_path / "c" / "index.json").exists()  # unfinished: never opened as a cache
    calls.clear()
    stores, _ = build(tmp_path / "c", full, calls)
    # the first shard is rewritten (nothing to check it against yet), the second reused
    assert calls == [(0, 4), (8, 11)]
    assert torch.equal(stores["a"].materialize(), full["a"])
    calls.clear()
    build(tmp_path / "c", full, calls)
    assert calls == []  # a finished cache is opened, not rebuilt


def test_damaged_or_foreign_caches_are_one_line_errors(tmp_path):
    full = data()
    build(tmp_path / "c", full)
    shard = tmp_path / "c" / "shard-00001.safetensors"
    shard.write_bytes(shard.read_bytes()[:-10])
    with pytest.raises(ValueError, match="shard-00001.safetensors is missing, truncated"):
        LC.open_cache(tmp_path / "c")
    shard.unlink()
    with pytest.raises(ValueError, match="shard-00001.safetensors is missing"):
        LC.open_cache(tmp_path / "c")
    build(tmp_path / "d", full)
    with pytest.raises(ValueError, match="holds key k1; expected k2"):
        LC.build_cache(tmp_path / "d", "k2", 11, lambda a, b: {}, progress=False)
    (tmp_path / "d" / "index.json").write_text("{not json")
    with pytest.raises(ValueError, match="index.json is unreadable"):
        LC.open_cache(tmp_path / "d")
    index = {"format": 99, "key": "k1", "rows": 0, "tensors": {}, "shards": []}
    (tmp_path / "d" / "index.json").write_text(json.dumps(index))
    with pytest.raises(ValueError, match="has format 99"):
        LC.open_cache(tmp_path / "d")


def test_produce_must_keep_shapes(tmp_path):
    full = data()

    def produce(start, stop):
        return {"a": full["a"][start:stop, :, : 1 + start // 4]}

    with pytest.raises(ValueError, match="rows 4..8 have shapes"):
        LC.build_cache(tmp_path / "c", "k", 11, produce, rows_per_shard=4, progress=False)
