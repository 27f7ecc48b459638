"""Hugging Face `datasets` as training data (train/hf_datasets.py, train_adapter --dataset-dir/--dataset-name) on
tiny datasets the tests write with `datasets` itself: save_to_disk, and parquet files load_dataset reads."""
import io
import json

import datasets
import numpy as np
import pytest
import soundfile as sf
from test_train_adapter import SENTENCES, loaded_tiny, speak

from blsp_chat.audio import load_audio
from blsp_chat.constants import REPEAT_INSTRUCTION, SAMPLE_RATE
from train import train_adapter
from train.adapter_config import AdapterTrainConfig, DataSection, EvalSection, LossSection, ModelSection, load_config
from train.loop import LoopConfig
from train.train_adapter import data_manifests, run

TRANSLATIONS = ["hola", "el zorro", "cual es la capital", "paris es una ciudad", "el perro", "salta"]


def encoded_wav(path) -> bytes:
    buffer = io.BytesIO()
    samples, rate = sf.read(path)
    sf.write(buffer, samples, rate, format="WAV")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def clips(tmp_path_factory):
    root = tmp_path_factory.mktemp("clips")
    paths = []
    for i, text in enumerate(SENTENCES):
        speak(text, root / f"clip{i}.wav", i)
        paths.append(root / f"clip{i}.wav")
    return paths


@pytest.fixture(scope="module")
def saved_dataset(clips, tmp_path_factory):
    """A DatasetDict as a user's would be: an Audio column holding each clip's encoded bytes, a text column,
    a translation column; train and validation splits."""
    rows = [{"audio": {"bytes": encoded_wav(p), "path": p.name}, "sentence": text, "translation": spanish}
            for p, text, spanish in zip(clips, SENTENCES, TRANSLATIONS)]

    def split(part):
        table = datasets.Dataset.from_list(part)
        return table.cast_column("audio", datasets.Audio(sampling_rate=SAMPLE_RATE))

    root = tmp_path_factory.mktemp("hf") / "saved"
    datasets.DatasetDict({"train": split(rows[:4]), "validation": split(rows[4:])}).save_to_disk(str(root))
    return root


def data_section(**kwargs) -> DataSection:
    return DataSection(repetition_ratio=0, text_column="sentence", **kwargs)


def config_for(tmp_path, data: DataSection, **loop) -> AdapterTrainConfig:
    return AdapterTrainConfig(
        loop=LoopConfig(output_dir=str(tmp_path / "run"), learning_rate=1e-2, per_device_batch_size=2, max_steps=2,
                        log_every=1, seed=1, **loop),
        model=ModelSection(encoder_padding="none"), data=data, loss=LossSection(),
        eval=EvalSection(repeat_wer_examples=0))


def read_lines(path) -> list[dict]:
    return [json.loads(line) for line in open(path)]


def test_a_saved_dataset_becomes_manifest_lines_with_its_clips(saved_dataset, clips, tmp_path):
    config = config_for(tmp_path, data_section(dataset_dir=str(saved_dataset), dataset_eval_split="validation"))
    train_manifest, eval_manifest = data_manifests(config)
    lines = read_lines(train_manifest)
    assert [line["text"] for line in lines] == SENTENCES[:4]
    assert all(line["instruction"] == REPEAT_INSTRUCTION and line["response"] == line["text"] for line in lines)
    for line, clip in zip(lines, clips):
        written = load_audio(tmp_path / "run" / "dataset" / line["audio"], max_seconds=None)
        original = load_audio(clip, max_seconds=None)
        assert line["duration"] == pytest.approx(len(original) / SAMPLE_RATE, abs=1e-3)
        np.testing.assert_allclose(written, original, atol=2 / 32767)  # 16-bit wav of the same samples
    assert [line["text"] for line in read_lines(eval_manifest)] == SENTENCES[4:]
    again, _ = data_manifests(config)  # a resumed run writes the same lines and finds the same clips
    assert read_lines(again) == lines


def test_instruction_and_response_columns_make_task_lines(saved_dataset, tmp_path):
    config = config_for(tmp_path, data_section(dataset_dir=str(saved_dataset), response_column="translation"))
    lines = read_lines(data_manifests(config)[0])
    assert [line["response"] for line in lines] == TRANSLATIONS[:4]


def test_training_on_a_saved_dataset(saved_dataset, tmp_path):
    config = config_for(tmp_path, data_section(dataset_dir=str(saved_dataset), dataset_eval_split="validation"))
    result = run(config, loaded=loaded_tiny())
    assert result.state.step == 2 and all(np.isfinite(result.losses))
    summary = json.loads((tmp_path / "run" / "data_summary.json").read_text())
    assert summary["dataset"]["dataset_dir"] == str(saved_dataset) and summary["eval"]["examples"] == 2
    assert summary["train_manifest"].endswith("dataset/train.jsonl")


def test_a_dataset_by_name_is_read_by_load_dataset(saved_dataset, tmp_path, monkeypatch):
    """`--dataset-name` goes through datasets.load_dataset: here a local folder of parquet files (a hub id
    works the same where the hub is reachable)."""
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "cache")
    folder = tmp_path / "parquet"
    folder.mkdir()
    datasets.load_from_disk(str(saved_dataset))["train"].to_parquet(str(folder / "train.parquet"))
    config = config_for(tmp_path, data_section(dataset_name=str(folder), eval_fraction=0))
    assert [line["text"] for line in read_lines(data_manifests(config)[0])] == SENTENCES[:4]


def test_arrays_at_another_rate_are_resampled(tmp_path):
    tone = np.sin(np.arange(8000) / 8000 * 2 * np.pi * 300).astype(np.float32)
    datasets.Dataset.from_dict({"audio": [{"array": tone, "sampling_rate": 8000}], "text": ["a tone"]}) \
        .save_to_disk(str(tmp_path / "arrays"))
    config = config_for(tmp_path, DataSection(dataset_dir=str(tmp_path / "arrays"), repetition_ratio=0))
    (line,) = read_lines(data_manifests(config)[0])
    assert line["duration"] == pytest.approx(1.0) and line["text"] == "a tone"
    assert sf.info(str(tmp_path / "run" / "dataset" / line["audio"])).samplerate == SAMPLE_RATE


def test_bad_datasets_get_errors_that_say_what_to_set(saved_dataset, tmp_path):
    with pytest.raises(ValueError, match=r"no column \['text'\]; its columns are \['audio', 'sentence', 'transl"):
        data_manifests(config_for(tmp_path, DataSection(dataset_dir=str(saved_dataset))))
    with pytest.raises(ValueError, match=r"no split 'test'; it has \['train', 'validation'\]"):
        data_manifests(config_for(tmp_path, data_section(dataset_dir=str(saved_dataset), dataset_split="test")))
    with pytest.raises(FileNotFoundError, match="data.dataset_dir"):
        data_manifests(config_for(tmp_path, data_section(dataset_dir=str(tmp_path / "nowhere"))))
    with pytest.raises(ValueError, match="train_manifest and dataset_dir are both set"):
        DataSection(train_manifest="x.jsonl", dataset_dir="y")
    with pytest.raises(ValueError, match="dataset_eval_split and eval_manifest are both set"):
        DataSection(dataset_dir="y", eval_manifest="x.jsonl", dataset_eval_split="validation")


def test_the_command_line_dataset_replaces_the_configs_manifests():
    args = train_adapter.parse_args(["--config", "train/configs/adapter_tiny_offline.json", "--dataset-dir", "ds",
                                     "--dataset-eval-split", "validation", "data.text_column=sentence"])
    config = load_config(args.config, train_adapter.cli_overrides(args))
    data = config.data
    assert (data.dataset_dir, data.train_manifest, data.eval_manifest) == ("ds", "", None)
    assert (data.dataset_split, data.dataset_eval_split, data.text_column) == ("train", "validation", "sentence")
    args = train_adapter.parse_args(["--config", "train/configs/adapter_tiny_offline.json", "--dataset-name",
                                     "org/speech", "--dataset-config", "en", "--dataset-split", "train.clean"])
    data = load_config(args.config, train_adapter.cli_overrides(args)).data
    assert (data.dataset_name, data.dataset_config, data.dataset_split) == ("org/speech", "en", "train.clean")
    with pytest.raises(SystemExit):
        train_adapter.parse_args(["--config", "c.json", "--dataset-dir", "a", "--dataset-name", "b"])
