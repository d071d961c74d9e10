import json

import pytest
import torch

from forgetlab.cache import ArtifactCache, CacheCorruptError, cache_key


def test_key_is_stable_and_order_free():
    assert cache_key({"a": 1, "b": [1, 2]}) == cache_key({"b": [1, 2], "a": 1})
    assert cache_key({"a": 1}) != cache_key({"a": 2})


def test_miss_then_hit(tmp_path):
    cache = ArtifactCache(tmp_path)
    assert not cache.has("models", "k1")
    with pytest.raises(KeyError):
        cache.load("models", "k1")
    w = {"w": torch.arange(6.0).reshape(2, 3)}
    cache.save("models", "k1", {"note": "hello"}, tensors=w, files={"extra.json": "{}"})
    assert cache.has("models", "k1")
    meta, tensors, files = cache.load("models", "k1")
    assert meta["note"] == "hello" and files == {"extra.json": "{}"}
    assert torch.equal(tensors["w"], w["w"])


def test_tied_tensors_are_stored_once_and_restored(tmp_path):
    shared = torch.randn(4, 3)
    cache = ArtifactCache(tmp_path)
    cache.save("models", "tied", {}, tensors={"emb": shared, "head": shared, "other": torch.ones(2)})
    meta, tensors, _ = cache.load("models", "tied")
    assert meta["aliases"] == {"head": "emb"}
    assert torch.equal(tensors["head"], shared) and torch.equal(tensors["emb"], shared)


def test_corrupt_weights_are_detected_with_the_fix(tmp_path):
    cache = ArtifactCache(tmp_path)
    folder = cache.save("models", "k2", {}, tensors={"w": torch.ones(10)})
    blob = (folder / "weights.safetensors").read_bytes()
    (folder / "weights.safetensors").write_bytes(blob[:-4] + b"\x00\x00\x80\x7f")
    with pytest.raises(CacheCorruptError, match="delete the folder"):
        cache.load("models", "k2")


def test_corrupt_or_foreign_metadata_is_detected(tmp_path):
    cache = ArtifactCache(tmp_path)
    folder = cache.save("models", "k3", {}, tensors={"w": torch.ones(2)})
    (folder / "meta.json").write_text("{not json")
    with pytest.raises(CacheCorruptError, match="meta.json"):
        cache.load("models", "k3")
    other = cache.save("models", "k4", {}, tensors={"w": torch.ones(2)})
    meta = json.loads((other / "meta.json").read_text())
    meta["key"] = "k5"
    (other / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(CacheCorruptError, match="another entry"):
        cache.load("models", "k4")
    (other / "weights.safetensors").unlink()


def test_missing_file_is_detected(tmp_path):
    cache = ArtifactCache(tmp_path)
    folder = cache.save("models", "k6", {}, tensors={"w": torch.ones(2)})
    (folder / "weights.safetensors").unlink()
    with pytest.raises(CacheCorruptError, match="missing weights.safetensors"):
        cache.load("models", "k6")


def test_failed_write_leaves_nothing_behind(tmp_path):
    cache = ArtifactCache(tmp_path)

    class Boom:
        def untyped_storage(self):
            raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        cache.save("models", "k7", {}, tensors={"w": Boom()})
    assert not cache.has("models", "k7")
    assert list((tmp_path / "models").iterdir()) == []
