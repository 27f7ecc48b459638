"""bench/bench_train.py's worker and memory comparisons on the tiny in-memory model: one warm-cache run per
distinct worker count or budget, read from the config's own filled cache, and a clear refusal when the config
has no cache."""
import json
import os
import shutil

import pytest
from test_train_adapter import corpus, loaded_tiny, train_config  # noqa: F401 (corpus is a fixture)

from bench.bench_train import memory_rates, worker_rates
from train.precompute_encoder import fill, missing_clips
from train.speech_data import EncoderCache, audio_duration


def spoil_keeping_cache_keys(path) -> None:
    """Zero a clip's bytes but keep its size and mtime (the cache key): only a cache hit can still train on it."""
    stat = os.stat(path)
    path.write_bytes(bytes(stat.st_size))
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))


def test_each_worker_count_runs_once_on_the_filled_cache(corpus, tmp_path):  # noqa: F811
    data = shutil.copytree(corpus.parent, tmp_path / "data")
    manifest = data / corpus.name  # durations written in, so nothing needs the clips' headers once spoiled
    lines = [json.loads(line) for line in manifest.read_text().splitlines()]
    manifest.write_text("".join(json.dumps(dict(line, duration=audio_duration(data / line["audio"]))) + "\n"
                                for line in lines))
    loaded = loaded_tiny()
    config = train_config(manifest, tmp_path / "unused", num_epochs=1)
    config.data.encoder_cache_dir = str(tmp_path / "cache")
    cache = EncoderCache.for_model(config.data.encoder_cache_dir, loaded.model)
    fill(loaded.model, cache, missing_clips([str(manifest)], cache), batch_size=4, max_seconds=None)
    for wav in data.glob("*.wav"):
        spoil_keeping_cache_keys(wav)

    rates = worker_rates(config, loaded, tmp_path / "runs", steps=2, workers="0,1,0")

    assert list(rates) == ["0 workers", "1 workers"] and all(rate > 0 for rate in rates.values())
    assert config.loop.num_workers == 1  # the last distinct count was the last run
    assert (tmp_path / "runs" / "v1" / "checkpoints").is_dir()

    held = memory_rates(config, loaded, tmp_path / "held", steps=2, budgets="0,0.5")
    assert list(held) == ["0 GB held", "0.5 GB held"] and config.data.encoder_cache_memory_gb == 0.5


def test_worker_comparison_needs_the_configs_cache(corpus, tmp_path):  # noqa: F811
    config = train_config(corpus, tmp_path / "unused")
    config.data.encoder_cache_dir = None
    with pytest.raises(SystemExit, match="encoder_cache_dir"):
        worker_rates(config, loaded_tiny(), tmp_path, steps=1, workers="0,1")
    with pytest.raises(SystemExit, match="--memory-gb reads"):
        memory_rates(config, loaded_tiny(), tmp_path, steps=1, budgets="0,1")
