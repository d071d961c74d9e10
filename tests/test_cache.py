import json

import pytest
import torch

from forgetlab.cache import ArtifactCache, CacheCorruptError, CacheHealedWarning, cache_key


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
    assert list((tmp_path / "models").iterdir()) == [] and list((tmp_path / ".tmp" / "models").iterdir()) == []


# ---------------------------------------------------------------- get_or_build and self-healing

class Builder:
    """A build function that counts its calls and returns a fixed entry."""

    def __init__(self, value: float = 3.0):
        self.calls, self.value = 0, value

    def __call__(self):
        self.calls += 1
        return {"note": "built"}, {"w": torch.full((8,), self.value)}, {"extra.txt": "hello"}


def test_get_or_build_builds_once_then_loads(tmp_path):
    cache, build = ArtifactCache(tmp_path), Builder()
    first = cache.get_or_build("models", "g1", build)
    second = cache.get_or_build("models", "g1", build)
    assert build.calls == 1
    for meta, tensors, files in (first, second):
        assert meta["note"] == "built" and meta["key"] == "g1" and files == {"extra.txt": "hello"}
        assert torch.equal(tensors["w"], torch.full((8,), 3.0))


def test_get_or_build_without_tensors_or_files(tmp_path):
    meta, tensors, files = ArtifactCache(tmp_path).get_or_build("tables", "t", lambda: ({"rows": 0}, None, None))
    assert meta["rows"] == 0 and tensors is None and files == {}


def test_a_failing_build_saves_nothing_and_releases_the_lock(tmp_path):
    cache = ArtifactCache(tmp_path)

    def boom():
        raise RuntimeError("build failed")

    with pytest.raises(RuntimeError, match="build failed"):
        cache.get_or_build("models", "f", boom)
    assert not cache.has("models", "f")
    assert cache.get_or_build("models", "f", Builder())[0]["note"] == "built"


def test_a_build_that_reads_its_own_entry_is_refused_not_deadlocked(tmp_path):
    cache = ArtifactCache(tmp_path)
    with pytest.raises(RuntimeError, match="already locked by this thread"):
        cache.get_or_build("models", "self", lambda: (cache.load("models", "self"), None, None))


def _truncate(folder):
    blob = (folder / "weights.safetensors").read_bytes()
    (folder / "weights.safetensors").write_bytes(blob[: len(blob) // 2])


def _flip_byte(folder):
    blob = bytearray((folder / "weights.safetensors").read_bytes())
    blob[-3] ^= 0x01
    (folder / "weights.safetensors").write_bytes(bytes(blob))


def _foreign_meta(folder):
    meta = json.loads((folder / "meta.json").read_text())
    (folder / "meta.json").write_text(json.dumps(dict(meta, key="another-key")))


CORRUPTIONS = {
    "truncated weights": (_truncate, "does not match its checksum"),
    "flipped byte": (_flip_byte, "does not match its checksum"),
    "garbage meta.json": (lambda f: (f / "meta.json").write_text("{not json"), "unreadable meta.json"),
    "empty meta.json": (lambda f: (f / "meta.json").write_text(""), "unreadable meta.json"),
    "meta.json not a mapping": (lambda f: (f / "meta.json").write_text("[1, 2]"), "unreadable meta.json"),
    "weights removed": (lambda f: (f / "weights.safetensors").unlink(), "missing weights.safetensors"),
    "text file removed": (lambda f: (f / "extra.txt").unlink(), "missing extra.txt"),
    "meta.json removed": (lambda f: (f / "meta.json").unlink(), "missing meta.json"),
    "other entry's metadata": (_foreign_meta, "another entry's metadata"),
}


@pytest.mark.parametrize("name", list(CORRUPTIONS))
def test_each_corruption_is_healed_with_a_warning(tmp_path, name):
    damage, problem = CORRUPTIONS[name]
    cache = ArtifactCache(tmp_path, heal=True)
    folder = cache.save("models", "h", {"note": "old"}, tensors={"w": torch.ones(8)}, files={"extra.txt": "old"})
    damage(folder)
    damaged = {p.name: p.read_bytes() for p in folder.iterdir()}
    build = Builder(7.0)
    with pytest.warns(CacheHealedWarning, match=problem) as record:
        meta, tensors, files = cache.get_or_build("models", "h", build)
    assert build.calls == 1 and meta["note"] == "built" and torch.equal(tensors["w"], torch.full((8,), 7.0))
    moved = list((tmp_path / ".corrupt" / "models").iterdir())
    assert len(moved) == 1 and moved[0].name.startswith("h-") and moved[0].name.endswith("Z")
    message = str(record[0].message)
    assert str(folder) in message and str(moved[0]) in message            # names both folders
    assert {p.name: p.read_bytes() for p in moved[0].iterdir()} == damaged      # kept exactly as found
    assert cache.load("models", "h")[0]["note"] == "built"                # the rebuilt entry is valid


@pytest.mark.parametrize("name", ["truncated weights", "empty meta.json", "other entry's metadata"])
def test_healing_off_raises_and_keeps_the_entry(tmp_path, monkeypatch, name):
    damage, problem = CORRUPTIONS[name]
    for cache in (ArtifactCache(tmp_path / "a", heal=False), None):
        if cache is None:
            monkeypatch.setenv("FORGETLAB_CACHE_HEAL", "0")
            cache = ArtifactCache(tmp_path / "b")
            assert cache.heal is False
        folder = cache.save("models", "h", {}, tensors={"w": torch.ones(8)}, files={"extra.txt": "x"})
        damage(folder)
        build = Builder()
        with pytest.raises(CacheCorruptError, match=problem):
            cache.get_or_build("models", "h", build)
        assert build.calls == 0 and folder.is_dir() and not (cache.root / ".corrupt").exists()


def test_heal_setting_from_the_environment(monkeypatch):
    monkeypatch.delenv("FORGETLAB_CACHE_HEAL", raising=False)
    assert ArtifactCache("x").heal is True
    monkeypatch.setenv("FORGETLAB_CACHE_HEAL", "off")
    assert ArtifactCache("x").heal is False and ArtifactCache("x", heal=True).heal is True
    monkeypatch.setenv("FORGETLAB_CACHE_HEAL", "maybe")
    with pytest.raises(ValueError, match="set it to 1"):
        ArtifactCache("x")


def test_replacing_an_entry_leaves_no_temp_or_trash(tmp_path):
    cache = ArtifactCache(tmp_path)
    for i in range(3):
        cache.save("models", "r", {"i": i}, tensors={"w": torch.full((4,), float(i))})
    assert [p.name for p in (tmp_path / "models").iterdir()] == ["r"]
    assert list((tmp_path / ".tmp" / "models").iterdir()) == []                # no temp or trash left
    meta, tensors, _ = cache.load("models", "r")
    assert meta["i"] == 2 and torch.equal(tensors["w"], torch.full((4,), 2.0))
    assert (tmp_path / ".locks" / "models" / "r.lock").exists()
