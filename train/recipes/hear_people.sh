#!/usr/bin/env bash
# Issue 30's data and run, from an empty machine: every step is skipped when its output is complete, and the
# training run resumes from its last checkpoint, so running this again after any interruption goes on.
#
#   bash train/recipes/hear_people.sh data         the dev set, the training people, synthetic voices, the mix
#   bash train/recipes/hear_people.sh natural      the held-out natural voices (piper, kokoro: slow on a CPU)
#   bash train/recipes/hear_people.sh train SEED   fill the encoder cache, then train (or resume) seed SEED
#   bash train/recipes/hear_people.sh baselines    Whisper tiny.en's and base's own decoders, today's default
#   bash train/recipes/hear_people.sh score SEED [latest|step-N]   a run's checkpoint on the same clips
#   bash train/recipes/hear_people.sh stash SEED   copy the run (its newest checkpoint) to ~/.cache/blsp_chat/runs,
#                                                   where `train SEED` on a fresh checkout resumes it from
#   bash train/recipes/hear_people.sh augment      two microphone-like copies of every training person (the aug mix)
#   MIX=aug bash train/recipes/hear_people.sh train|score|stash SEED ...   the same stages on the aug mix's run
#   bash train/recipes/hear_people.sh more         the rest of offline_v2's sentences (15,000) synthesized (the more mix)
#   MIX=more bash train/recipes/hear_people.sh train|score|stash SEED ...   the same stages on the more mix's run
#   bash train/recipes/hear_people.sh names        WordNet's named entities synthesized (after more: the names mix)
#   MIX=names bash train/recipes/hear_people.sh train|score|stash SEED ...   the same stages on the names mix's run
#   bash train/recipes/hear_people.sh names_half   the names mix with the people twice more (half its lines)
#   BRANCH=names:step-N MIX=names_half bash train/recipes/hear_people.sh train|score|stash SEED ...   a branch: the
#                                                   names run of the same seed goes on from its checkpoint step-N
#                                                   (weights, optimizer, schedule, data position) on this mix
#   MIX=aug UNITS=chars bash train/recipes/hear_people.sh train|score|stash SEED ...   CTC over characters instead
#                                                   of word pieces (adapter_base_context_aug_chars_ctc.json)
#   UNITS=symbols512 bash train/recipes/hear_people.sh symbols   learn 512 symbols (letters, the space, byte-pair
#                                                   merges) from the first mix and write their config
#                                                   (adapter_base_context_symbols512_ctc.json, committed)
#   UNITS=symbols512 bash train/recipes/hear_people.sh train|score|stash SEED ...   CTC over those symbols
#   ENCODER=tuned2 bash train/recipes/hear_people.sh train|score|stash SEED ...   the top two encoder layers train
#                                                   too (adapter_base_context_tuned2_ctc.json; its own cache)
#   FROM=step-N MIX=aug ENCODER=tuned2 bash train/recipes/hear_people.sh train|score|stash SEED ...   a warm start:
#                                                   the frozen-encoder run of the same mix and seed, from its checkpoint
#                                                   step-N, goes on with the top two layers tuned too
#                                                   (adapter_base_context_aug_tuned2_warm_ctc.json)
#   FROM=step-N MIX=aug LOSS=ce bash train/recipes/hear_people.sh train|score|stash SEED ...   a warm start that adds
#                                                   the frozen LLM's cross-entropy, reading speech through the CTC
#                                                   readout, to the CTC loss (adapter_base_context_aug_ce_warm_ctc.json)
# (from the repository root, after `make test` has set up .venv)
#
# Record: train/results/base_context_adapter.md. Needs the Debian packages below (about 600 MB).
set -euo pipefail
STAGE=${1:?usage: [MIX=aug|more|names|names_half] [UNITS=chars] [ENCODER=tuned2] [LOSS=ce] [FROM=step-N] [BRANCH=MIX:step-N] hear_people.sh data|natural|augment|more|names|names_half|symbols|train SEED|baselines|score SEED [latest|step-N]|stash SEED}
SEED=${2:-0}
PY=${PY:-$PWD/.venv/bin/python}
export PYTHONPATH=$PWD
MIX=${MIX:-}  # empty: the first mix (13,112 lines); aug: the same plus two augmented copies of every person;
              # more: the same plus the rest of offline_v2's sentences, synthesized;
              # names: the more mix plus WordNet's named entities, synthesized, and the people once more;
              # names_half: the names mix with the people twice more, so that they are half its lines
UNITS=${UNITS:-}  # empty: CTC over the LLM's word pieces; chars: over characters; symbolsN: N learnt symbols
ENCODER=${ENCODER:-}  # empty: Whisper base frozen; tuned2: its top two layers train with the adapter
LOSS=${LOSS:-}  # empty: CTC alone; ce: the LLM's cross-entropy through the CTC readout joins it (with FROM)
FROM=${FROM:-}  # empty: train from scratch; step-N: start from the frozen-encoder run's checkpoint step-N
BRANCH=${BRANCH:-}  # empty: none; MIX:step-N: go on from that mix's run (same seed) at its checkpoint step-N
SOURCE_NAME=base_ctx${MIX:+_$MIX}${UNITS:+_$UNITS}  # the run a warm start starts from
NAME=$SOURCE_NAME${ENCODER:+_$ENCODER}${LOSS:+_$LOSS}${FROM:+_from${FROM#step-}}
[ -z "$BRANCH" ] || NAME=${NAME}_from_${BRANCH%%:*}${BRANCH##*:step-}
CONFIG=train/configs/adapter_base_context${MIX:+_$MIX}${UNITS:+_$UNITS}${ENCODER:+_$ENCODER}${LOSS:+_$LOSS}${FROM:+_warm}_ctc.json
D=data/base_ctx
RUN=runs/${NAME}_s$SEED
STASH=$HOME/.cache/blsp_chat/runs/${NAME}_s$SEED  # outlives the checkout, not a new machine

# synthetic_train_lines CORPUS OUT: a synthesized corpus's training lines (data/CORPUS/train.jsonl) less every
# sentence held out of the full 21,000-sentence plan, its audio paths relative to $D.
synthetic_train_lines() {
$PY - "$1" "$2" <<'PY'
import json
import sys
from pathlib import Path
from train.prepare_data import english_normalizer
corpus, out_path = sys.argv[1:]
normalize, _ = english_normalizer()
held = {normalize(s) for s in Path("data/offline_v2/not_train_of_21000.txt").read_text().splitlines()}
rows = [json.loads(line) for line in open(f"data/{corpus}/train.jsonl")]
kept = [r for r in rows if r["text"] not in held]  # a sentence held out of the full plan stays held out
with open(out_path, "w") as out:
    for r in kept:
        r["audio"] = str(Path("..") / corpus / r["audio"])
        out.write(json.dumps(r) + "\n")
print(f"{corpus}: synthetic training lines {len(kept)} of {len(rows)}")
PY
}

data() {
need_packages="pocketsphinx-testdata ktuberling-data tuxpaint-stamps-default drascula beneath-a-steel-sky
  flight-of-the-amazon-queen warzone2100-data hedgewars-data wordnet-base fortunes-min espeak-ng flite festival
  festvox-kallpc16k festvox-kdlpc16k festvox-us-slt-hts sox"
missing=$(for p in $need_packages; do dpkg -s "$p" >/dev/null 2>&1 || echo "$p"; done)
if [ -n "$missing" ]; then apt-get install -y -qq $missing; fi

# 1. The real-speech dev set (never trained on): 895 clips of people.
[ -s data/real_dev/manifest.jsonl ] || $PY -m train.real_speech --out-dir data/real_dev

# 2. People for training: the game casts not in the dev set, labelled by their subtitles where the game has them
#    (Drascula's hero, Amazon Queen's training actors) and by Whisper base's decoder elsewhere (Steel Sky, ...).
#    Amazon Queen is one of pseudo_label's sources: it is in pseudo_base, once.
#    Whisper's labels are kept in train/labels/whisper-base.jsonl (committed): a new machine decodes only new audio.
[ -s data/pseudo_base/manifest.jsonl ] || $PY -m train.pseudo_label --out-dir data/pseudo_base \
    --whisper offline:whisper-base --exclude-manifest data/real_dev/manifest.jsonl \
    --label-cache train/labels/whisper-base.jsonl

# 3. Synthetic voices for vocabulary: the first 6,000 sentences of offline_v2 (espeak-ng, flite, festival).
[ -s data/offline_v2/sentences.txt ] || $PY -m train.text_sources --out data/offline_v2/sentences.txt --max 21000 --seed 0
[ -s data/offline_v2/train.jsonl ] || $PY -m train.synthesize --text-file data/offline_v2/sentences.txt \
    --out-dir data/offline_v2 --num 6000 --jobs 2 --seed 0 --dev-frac 0.05 --test-frac 0.05

# 4. Held-out natural voices: 40 sentences of the full offline_v2 plan's test split (none is trained on).
$PY - <<'PY'
from pathlib import Path
from train.synthesize import assign_sentence_splits, read_sentences, text_id_of
sentences = read_sentences(Path("data/offline_v2/sentences.txt"))
split = assign_sentence_splits([text_id_of(s) for s in sentences], 0.05, 0.05, 0)
test = [s for s in sentences if split[text_id_of(s)] == "test"]
held = [s for s in sentences if split[text_id_of(s)] != "train"]
Path("data/natural_test").mkdir(parents=True, exist_ok=True)
Path("data/natural_test/sentences.txt").write_text("\n".join([s for s in test if 5 <= len(s.split()) <= 20][::20][:40]) + "\n")
Path("data/offline_v2/not_train_of_21000.txt").write_text("\n".join(held) + "\n")
PY

# 5. The training mix (repetition lines) and the people-only eval set the run's curve is read on.
mkdir -p $D
synthetic_train_lines offline_v2 $D/synth_train.jsonl
$PY - <<'PY'
import json
from pathlib import Path
dev = [json.loads(line) for line in open("data/real_dev/manifest.jsonl")]
pick = ([r for r in dev if r["source"] in ("librivox", "cards", "jfk")]
        + [r for r in dev if r["source"] == "drascula"][::12][:25] + [r for r in dev if r["source"] == "queen"][::18][:25])
with open("data/base_ctx/dev_people.jsonl", "w") as out:
    for r in pick:
        out.write(json.dumps(dict(r, audio=str(Path("../real_dev") / r["audio"]))) + "\n")
# Clips to tune decoding settings on, never scored in the record: the same held-out casts' other lines.
tune = [r for r in dev if r["source"] == "drascula"][6::12][:25] + [r for r in dev if r["source"] == "queen"][9::18][:25]
assert not {r["id"] for r in tune} & {r["id"] for r in pick}
with open("data/base_ctx/tune_people.jsonl", "w") as out:
    for r in tune:
        out.write(json.dumps(dict(r, audio=str(Path("../real_dev") / r["audio"]))) + "\n")
print(f"dev people {len(pick)}; tuning clips {len(tune)}")
PY
for part in synth_train:../base_ctx/synth_train.jsonl base:../pseudo_base/manifest.jsonl; do
  name=${part%%:*}; src=${part#*:}
  [ -s $D/rep_$name.jsonl ] || (cd $D && $PY -m train.mix_data --asr $src --out rep_$name.jsonl --repetition-only)
done
for part in dev_people tune_people; do
  [ -s $D/${part}_rep.jsonl ] || (cd $D && $PY -m train.mix_data --asr $part.jsonl --out ${part}_rep.jsonl --repetition-only)
done
cat $D/rep_synth_train.jsonl $D/rep_base.jsonl > $D/train_mix.jsonl
}

natural() {
for engine in piper kokoro; do
  [ -s data/natural_test/$engine/manifest.jsonl ] || $PY -m train.synthesize --text-file data/natural_test/sentences.txt \
      --out-dir data/natural_test/$engine --engines $engine --jobs 2 --dev-frac 0 --test-frac 0 --holdout-voices "" --seed 1
done
}

# 5b. The aug mix: every training person twice more, each copy through a seeded chain of microphone-like effects
#     (speed, tempo, pitch, vocal-tract length, room, noise, gain, telephone band, codec: train/augment.py's
#     defaults), so the adapter hears more talkers and rooms than the games recorded. The dev set is not touched.
augment() {
[ -s $D/train_mix.jsonl ] || { echo "run the data stage first" >&2; exit 2; }
[ -f data/people_aug/done ] || { $PY -m train.augment --manifest data/pseudo_base/manifest.jsonl \
    --out-dir data/people_aug --copies 2 --seed 0 --jobs ${JOBS:-2} && touch data/people_aug/done; }
[ -s $D/rep_people_aug.jsonl ] || (cd $D && $PY -m train.mix_data --asr ../people_aug/manifest.jsonl \
    --out rep_people_aug.jsonl --repetition-only)
cat $D/train_mix.jsonl $D/rep_people_aug.jsonl > $D/train_mix_aug.jsonl
}

# 5c. More sentences for rare words (MIX=more): the rest of offline_v2's 21,000-sentence plan (its sentences
#     6,001-21,000), spoken by the same engines and voices with the same seed and splits, held-out sentences
#     dropped as in step 5, added to the first mix.
more() {
[ -s $D/train_mix.jsonl ] || { echo "run the data stage first" >&2; exit 2; }
mkdir -p data/offline_v2_rest
[ -s data/offline_v2_rest/sentences.txt ] || tail -n +6001 data/offline_v2/sentences.txt > data/offline_v2_rest/sentences.txt
[ -s data/offline_v2_rest/train.jsonl ] || $PY -m train.synthesize --text-file data/offline_v2_rest/sentences.txt \
    --out-dir data/offline_v2_rest --jobs ${JOBS:-2} --seed 0 --dev-frac 0.05 --test-frac 0.05
[ -s $D/synth_rest_train.jsonl ] || synthetic_train_lines offline_v2_rest $D/synth_rest_train.jsonl
[ -s $D/rep_synth_rest.jsonl ] || (cd $D && $PY -m train.mix_data --asr synth_rest_train.jsonl \
    --out rep_synth_rest.jsonl --repetition-only)
cat $D/train_mix.jsonl $D/rep_synth_rest.jsonl > $D/train_mix_more.jsonl
}

# 5e. Names (MIX=names): WordNet's named entities read as "<name> is <definition>." (offline_v3's text), for the
#     places, people and things a spoken question names, which offline_v2 almost never does. Synthesized by the same
#     engines with offline_v3's seed. Every sentence about an example clip or a spoken question is held out. Added to
#     the more mix with the people once more, so that they stay about a quarter of it.
names() {
[ -s $D/train_mix_more.jsonl ] || { echo "run the more stage first" >&2; exit 2; }
mkdir -p data/names
if [ ! -s data/names/sentences.txt ]; then
  held=()
  while IFS= read -r sentence; do held+=(--holdout-sentence "$sentence"); done < <(acceptance_sentences)
  $PY -m train.text_sources --sources entities --out data/names/sentences.txt \
      --exclude-file data/offline_v2/sentences.txt "${held[@]}"
fi
[ -s data/names/train.jsonl ] || $PY -m train.synthesize --text-file data/names/sentences.txt \
    --out-dir data/names --jobs ${JOBS:-2} --seed 1 --dev-frac 0.05 --test-frac 0.05
[ -s $D/synth_names_train.jsonl ] || synthetic_train_lines names $D/synth_names_train.jsonl
[ -s $D/rep_synth_names.jsonl ] || (cd $D && $PY -m train.mix_data --asr synth_names_train.jsonl \
    --out rep_synth_names.jsonl --repetition-only)
cat $D/train_mix_more.jsonl $D/rep_synth_names.jsonl $D/rep_base.jsonl > $D/train_mix_names.jsonl
}

# 5f. People at half (MIX=names_half): the names mix with the training people twice more (four times in all), so
#     that they are half its lines (44% of its hours) instead of 36% (28%), for the acted lines that fell as their
#     share fell. Nothing new is synthesized or labelled.
names_half() {
[ -s $D/train_mix_names.jsonl ] || { echo "run the names stage first" >&2; exit 2; }
cat $D/train_mix_names.jsonl $D/rep_base.jsonl $D/rep_base.jsonl > $D/train_mix_names_half.jsonl
}

# acceptance_sentences: what the example clips say and the spoken questions (train/spoken_questions.py), once each
acceptance_sentences() {
$PY -c "from train.spoken_questions import acceptance_sentences; print('\n'.join(acceptance_sentences()))"
}

# 5d. CTC symbols learnt from the mix's transcripts: the config of a UNITS=symbolsN run (the same mix gives the
#     same symbols; the committed config is what was trained). Its report says which output rate aligns the mix.
symbols() {
count=${UNITS#symbols}
[[ $UNITS == symbols* && $count =~ ^[0-9]+$ ]] || { echo "symbols needs UNITS=symbolsN, e.g. symbols512" >&2; exit 2; }
$PY -m train.ctc_symbols --manifest $D/train_mix${MIX:+_$MIX}.jsonl --count $count \
    --base-config train/configs/adapter_base_context${MIX:+_$MIX}_ctc.json --out $CONFIG --output-dir $RUN
}

# 6. Whisper base's frames for every clip, once (the encoder is frozen), then the run (it resumes by itself).
train() {
$PY -m train.precompute_encoder --config $CONFIG --manifest $D/train_mix${MIX:+_$MIX}.jsonl --manifest $D/dev_people_rep.jsonl
if [ ! -d $RUN ] && [ -d $STASH ]; then mkdir -p runs && cp -r $STASH $RUN && echo "resuming from the stash $STASH"; fi
if [ -n "$BRANCH" ] && ! compgen -G "$RUN/checkpoints/step-*/.complete" > /dev/null; then  # none complete, even
  # where a killed branch left a partial copy (branch_run copies to step-N.partial first)
  $PY -m train.branch_run runs/base_ctx_${BRANCH%%:*}_s$SEED ${BRANCH##*:} $RUN
fi
warm=()
if [ -n "$FROM" ]; then
  start=eval_models/${SOURCE_NAME}_s$SEED-$FROM  # the same export `score` makes of the source run
  [ -s $start/model.safetensors ] || $PY -m train.export_adapter runs/${SOURCE_NAME}_s$SEED $start --checkpoint $FROM
  warm=(model.init_adapter=$start)
fi
$PY -m train.train_adapter --resume --config $CONFIG model.seed=$SEED loop.seed=$SEED loop.output_dir=$RUN "${warm[@]}"
}

checkpoint_of() {  # checkpoint_of latest|step-N: the name of a complete checkpoint of the run
$PY -c "import sys; from pathlib import Path; from train.train_adapter import find_checkpoint
print(find_checkpoint(Path(sys.argv[1]), sys.argv[2]).name)" $RUN "$1"
}

# The run without its older checkpoints (about 200 MB), copied whole so the stash is never half-written.
stash() {
newest=$RUN/checkpoints/$(checkpoint_of latest)
rm -rf $STASH.new && mkdir -p $STASH.new/checkpoints
find $RUN -maxdepth 1 -type f -exec cp {} $STASH.new/ \;
cp -r $newest $STASH.new/checkpoints/
rm -rf $STASH && mv $STASH.new $STASH && echo "stashed $newest in $STASH"
}

# 7. The baselines on the same clips as the candidate: the 61 dev people (read sentences, acted lines) and the
#    held-out natural voices. Each Whisper's own decoder (base forced to English) and today's default adapter.
SETS="dev_people:$D/dev_people.jsonl piper:data/natural_test/piper/manifest.jsonl kokoro:data/natural_test/kokoro/manifest.jsonl"
evaluate_on_sets() {  # evaluate_on_sets OUT_DIR ARGS...: one system on every set, skipping sets already scored
out=$1; shift
for set in $SETS; do
  name=${set%%:*}; manifest=${set#*:}
  if [ ! -s $manifest ]; then echo "skipping $name: $manifest is not built (the natural stage builds it)" >&2; continue; fi
  [ -s $out/asr.$name.summary.json ] || $PY -m train.evaluate --task asr --manifest $manifest --dataset $name \
      --out $out "$@"
done
}
baselines() {
for whisper in whisper-tiny.en whisper-base; do
  evaluate_on_sets eval_hear/$whisper --system whisper --whisper offline:$whisper
done
evaluate_on_sets eval_hear/default_v5 --system blsp
}

# 8. A checkpoint of a run, finished or still going, on the same sets, then the table by group beside the
#    baselines: hear_people.sh score SEED [latest|step-N]
score() {
step=$(checkpoint_of "${3:-latest}")
model=eval_models/${NAME}_s$SEED-$step
[ -s $model/model.safetensors ] || $PY -m train.export_adapter $RUN $model --checkpoint $step
evaluate_on_sets eval_hear/${NAME}_s$SEED-$step --system blsp --model $model
$PY -m train.real_speech score $D/dev_people.jsonl eval_hear/whisper-tiny.en eval_hear/whisper-base \
    eval_hear/default_v5 eval_hear/${NAME}_s$SEED-$step
grep -H '"wer"' eval_hear/*/asr.piper.summary.json eval_hear/*/asr.kokoro.summary.json || true
}

case $STAGE in
  data) data ;;
  natural) natural ;;
  augment) augment ;;
  more) more ;;
  names) names ;;
  names_half) names_half ;;
  symbols) symbols ;;
  train) train ;;
  baselines) baselines ;;
  score) score "$@" ;;
  stash) stash ;;
  *) echo "unknown stage $STAGE: data, natural, augment, more, names, names_half, symbols, train, baselines, score or stash" >&2; exit 2 ;;
esac
