"""train/recipes/hear_people.sh's shell functions, run alone: the synthetic training lines (the first mix's and the
more mix's synthetic parts, which must drop every sentence held out of the full plan), the acceptance sentences the
names mix holds out, and the names_half mix."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
RECIPE = REPO / "train" / "recipes" / "hear_people.sh"


def run_recipe_function(cwd: Path, name: str, *args: str, **variables: str) -> str:
    """The stdout of the recipe's shell function `name`, defined alone and called with `args` in `cwd`, with the
    recipe's global `variables` (D=..., say) set."""
    script = f'eval "$(sed -n \'/^{name}() {{/,/^}}/p\' {RECIPE})"\n{name} {" ".join(args)}'
    env = dict(os.environ, PY=sys.executable, PYTHONPATH=str(REPO), **variables)
    return subprocess.run(["bash", "-c", script], cwd=cwd, env=env, check=True, capture_output=True,
                          text=True).stdout


def test_held_out_sentences_are_dropped_and_audio_is_found_from_the_mix_folder(tmp_path):
    corpus = tmp_path / "data" / "offline_v2_rest"
    corpus.mkdir(parents=True)
    (tmp_path / "data" / "offline_v2").mkdir()
    (tmp_path / "data" / "offline_v2" / "not_train_of_21000.txt").write_text("Held out, this one.\n")
    rows = [{"id": "a-0", "audio": "wav/a/a-0.wav", "text": "kept sentence"},
            {"id": "b-0", "audio": "wav/b/b-0.wav", "text": "held out this one"}]
    (corpus / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "data" / "base_ctx").mkdir()
    out = "data/base_ctx/synth_rest_train.jsonl"
    printed = run_recipe_function(tmp_path, "synthetic_train_lines", "offline_v2_rest", out)
    written = [json.loads(line) for line in (tmp_path / out).read_text().splitlines()]
    assert [r["id"] for r in written] == ["a-0"]
    assert (tmp_path / "data" / "base_ctx" / written[0]["audio"]).resolve() == (corpus / "wav/a/a-0.wav").resolve()
    assert "offline_v2_rest: synthetic training lines 1 of 2" in printed


def test_the_names_mix_holds_out_every_acceptance_sentence():
    """The names corpus is built without any sentence about what the example clips say or a spoken question asks."""
    from train.spoken_questions import QUESTIONS, acceptance_sentences
    held = run_recipe_function(REPO, "acceptance_sentences").splitlines()
    assert held == acceptance_sentences()
    assert {question for question, _ in QUESTIONS} <= set(held)
    assert "The weather is lovely today, so let us walk to the park by the river." in held


def test_the_names_half_mix_makes_the_people_half_its_lines(tmp_path):
    synthetic = [{"id": f"synth-{i}", "source": "espeak-ng"} for i in range(4)]
    person = {"id": "queen-0", "source": "queen"}
    (tmp_path / "rep_base.jsonl").write_text(json.dumps(person) + "\n")
    (tmp_path / "train_mix_names.jsonl").write_text("".join(json.dumps(r) + "\n" for r in synthetic + [person] * 2))
    run_recipe_function(tmp_path, "names_half", D=".")
    lines = [json.loads(line) for line in (tmp_path / "train_mix_names_half.jsonl").read_text().splitlines()]
    assert lines[:6] == synthetic + [person] * 2  # the names mix whole, then the people twice more
    assert sum(line["source"] == "queen" for line in lines) == len(lines) / 2 == 4


def test_the_names_half_mix_needs_the_names_mix_first(tmp_path):
    with pytest.raises(subprocess.CalledProcessError) as failed:
        run_recipe_function(tmp_path, "names_half", D=".")
    assert "run the names stage first" in failed.value.stderr
    assert not (tmp_path / "train_mix_names_half.jsonl").exists()
