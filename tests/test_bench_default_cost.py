"""bench/bench_default_cost.py's own logic on tiny in-memory models: ratio tables against the first model,
the children's figure reports, the per-search configs and the spoken turn it answers (no timing asserted)."""
import dataclasses

import pytest

from bench.bench_default_cost import (
    CHILD_MARK,
    FirstRunCost,
    MemoryCost,
    TurnCost,
    answer_spoken_turn,
    child_report,
    child_result,
    first_run_table,
    memory_table,
    peak_rss_mb,
    ratio,
    search_configs,
    status_mb,
    turn_table,
)
from blsp_chat.weights import LoadedBlsp, WeightsError
from tiny import lively_blsp, lively_lm_blsp, tiny_tokenizer, tone


def cells(line: str) -> list[str]:
    return line.replace("|", " ").split()


def test_turn_table_compares_each_model_with_its_own_whisper_and_the_baseline_at_the_same_clip_and_search():
    costs = [TurnCost("old", 3, "greedy", 9, 0.1, 0.1, 0.4), TurnCost("new", 3, "greedy", 8, 0.3, 0.1, 1.0),
             TurnCost("old", 3, "fused", 9, 1.0, 0.2, 0.4), TurnCost("new", 3, "fused", 8, 2.0, 0.4, 1.0)]
    header, *rows = turn_table(costs)
    assert "TTFT/whisper" in header and len(rows) == 4
    assert cells(rows[0])[-3:] == ["0.50x", "1.00x", "1.00x"]  # 0.2 s against 0.4 s; the baseline itself
    assert cells(rows[1])[-3:] == ["0.40x", "2.00x", "2.50x"]  # 0.4 / 1.0; 0.4 / 0.2 greedy; 1.0 / 0.4
    assert cells(rows[3])[-3:] == ["2.40x", "2.00x", "2.50x"]  # fused against fused, not greedy


def test_memory_and_first_run_tables_take_ratios_to_the_first_model():
    _, old, new = memory_table([MemoryCost("old", 1000, 1200), MemoryCost("new", 1500, 2400)])
    assert cells(old)[-2:] == ["1.00x", "1.00x"] and cells(new)[-2:] == ["1.50x", "2.00x"]
    runs = [FirstRunCost("old", "empty", 10, 10, 300, 0), FirstRunCost("old", "filled", 5, 5, 300, 150),
            FirstRunCost("new", "empty", 30, 10, 400, 0), FirstRunCost("new", "filled", 5, 10, 400, 220)]
    _, *rows = first_run_table(runs)
    assert [cells(r)[-1] for r in rows] == ["1.00x", "1.00x", "2.00x", "1.50x"]  # against the same pip cache
    assert ratio(1.0, 0.0) == "-"


def test_a_child_reports_its_figures_on_one_marked_line_among_other_output(capsys):
    print("loading...")
    child_report({"load_mb": 812.5, "turn_mb": 901.0})
    print("bye")
    assert child_result(capsys.readouterr().out) == {"load_mb": 812.5, "turn_mb": 901.0}
    assert child_result(f"{CHILD_MARK}{{\"a\": 1}}\n{CHILD_MARK}{{\"a\": 2}}\n") == {"a": 2}
    with pytest.raises(RuntimeError, match="no figures"):
        child_result("Traceback ...\n")


def test_search_configs_set_each_search_and_leave_the_model_config_alone():
    config = lively_lm_blsp().config
    configs = search_configs(config)
    assert configs["greedy"].ctc_lm_weight == 0.0 and configs["fused"].ctc_lm_weight == config.ctc_lm_weight == 1.0
    with pytest.raises(WeightsError, match="LM weight"):
        search_configs(dataclasses.replace(config, ctc_lm_weight=0.0))


def test_the_memory_child_answers_one_spoken_turn():
    loaded = LoadedBlsp(lively_blsp(), tiny_tokenizer(), "tiny", adapter_trained=True)
    positions, reply = answer_spoken_turn(loaded, tone(1.0), max_new_tokens=3)
    assert positions > 0 and isinstance(reply, str)
    assert peak_rss_mb() > 0


def test_peak_memory_is_read_from_the_status_file_in_mib():
    status = "Name:\tpython\nVmPeak:\t 4096000 kB\nVmHWM:\t  1048576 kB\nVmRSS:\t  524288 kB\n"
    assert status_mb(status, "VmHWM") == 1024.0 and status_mb(status, "VmRSS") == 512.0
    with pytest.raises(ValueError, match="no VmHWM"):
        status_mb("Name:\tpython\n", "VmHWM")
