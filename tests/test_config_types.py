"""Typed training configs (train/config_types.py): a value of the wrong type, on the command line or in the file,
is refused when the config is read, naming the key and the type it wants."""
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import pytest

from train import train_adapter
from train.adapter_config import load_config
from train.config_types import ConfigTypeError, check_field_types
from train.loop import LoopConfig

CONFIGS = Path(__file__).resolve().parent.parent / "train" / "configs"
SHIPPED = CONFIGS / "adapter_tiny_offline.json"


@pytest.mark.parametrize("override, message", [
    ("loop.learning_rate=fast", "loop.learning_rate must be a number, got 'fast' (a string)"),
    ("data.max_seconds=abc", "data.max_seconds must be a number or null, got 'abc' (a string)"),
    ("loop.max_steps=2.5", "loop.max_steps must be an integer or null, got 2.5"),
    ("loop.plot=1", "loop.plot must be true or false, got 1"),
    ("loop.lr_schedule=exp", 'loop.lr_schedule must be one of "linear", "cosine", "constant", got \'exp\''),
    ("loop.adam_betas=[0.9]", "loop.adam_betas must be a list of 2 values (a number, a number)"),
    ("loop.report_to=tensorboard", "loop.report_to must be a list of strings, got 'tensorboard'"),
    ("model.adapter_inner_dim=wide", "model.adapter_inner_dim must be an integer"),
    ("loss.kd_weight=true", "loss.kd_weight must be a number, got True (a boolean)"),
    ("eval.max_new_tokens=null", "eval.max_new_tokens must be an integer, got None (null)"),
    ("data.mask_time_span=[10]", "data.mask_time_span must be an integer, got [10] (a list)"),
])
def test_a_value_of_the_wrong_type_on_the_command_line_is_refused_naming_the_key(override, message):
    with pytest.raises(ConfigTypeError) as caught:
        load_config(SHIPPED, [override])
    assert message in str(caught.value)


def test_a_bad_value_in_the_file_is_refused_the_same_way(tmp_path):
    data = json.loads(SHIPPED.read_text())
    data["loop"]["learning_rate"] = "fast"
    (tmp_path / "bad.json").write_text(json.dumps(data))
    with pytest.raises(ConfigTypeError, match=r"loop\.learning_rate must be a number, got 'fast'"):
        load_config(tmp_path / "bad.json")
    data = json.loads(SHIPPED.read_text())
    data["data"] = ["not", "an", "object"]
    (tmp_path / "bad.json").write_text(json.dumps(data))
    with pytest.raises(ConfigTypeError, match="config section 'data' must be an object"):
        load_config(tmp_path / "bad.json")


def test_the_command_says_what_is_wrong_and_exits_2(capsys):
    assert train_adapter.main(["--config", str(SHIPPED), "data.max_seconds=abc"]) == 2
    assert "data.max_seconds must be a number or null, got 'abc'" in capsys.readouterr().err


def test_values_that_fit_their_type_are_taken_and_normalised():
    config = load_config(SHIPPED, ["loop.learning_rate=1", "loop.max_steps=1e3", "loop.adam_betas=[0.8, 1]",
                                   "model.conv_kernel_sizes=5", "data.max_seconds=null", "loop.report_to=[]"])
    assert config.loop.learning_rate == 1.0 and isinstance(config.loop.learning_rate, float)
    assert config.loop.max_steps == 1000 and isinstance(config.loop.max_steps, int)
    assert config.loop.adam_betas == (0.8, 1.0)
    assert config.model.conv_kernel_sizes == "5"  # a string field keeps the text JSON would read as a number
    assert config.data.max_seconds is None and config.loop.report_to == ()


def test_every_shipped_training_config_passes_the_type_checks():
    for path in sorted(CONFIGS.glob("adapter_*.json")):
        load_config(path)


def test_a_loop_config_built_in_python_is_checked_too():
    with pytest.raises(ConfigTypeError, match="loop.per_device_batch_size must be an integer, got '8'"):
        LoopConfig(output_dir="x", per_device_batch_size="8")


@dataclass
class Section:
    names: tuple[str, ...] = ()
    pair: tuple[int, float] = (1, 2.0)
    choice: Literal["a", "b"] = "a"
    maybe: list[int] | None = None


@pytest.mark.parametrize("field, value, accepted", [
    ("names", ["x", "y"], ("x", "y")), ("names", ["x", 1], None),
    ("pair", [3, 4], (3, 4.0)), ("pair", [3], None), ("pair", [3.5, 4], None),
    ("choice", "b", "b"), ("choice", "c", None),
    ("maybe", [1, 2], [1, 2]), ("maybe", None, None), ("maybe", [True], None),
])
def test_containers_literals_and_optionals(field, value, accepted):
    section = Section(**{field: value})
    if accepted is None and not (field == "maybe" and value is None):
        with pytest.raises(ConfigTypeError, match=f"section.{field} must be"):
            check_field_types(section, "section")
    else:
        check_field_types(section, "section")
        assert getattr(section, field) == accepted and type(getattr(section, field)) is type(accepted)
