#!/usr/bin/env bash
# Block attention evidence (issue 13): one full-attention base (the teacher), block fine-tuning,
# block distillation with sinks + block dropout + token weighting, and one ablation per part;
# every model evaluated on held-out RAG rows under full attention and under block attention with
# KV reuse. Offline, CPU, one process per step, fixed seeds. Run from the repository root:
#
#     OUT=/tmp/evidence/run bash examples/block_attention_evidence.sh
#
# A step whose output exists is skipped (a checkpoint's latest_checkpointed_iteration.txt, an
# eval's results.json), so an interrupted run continues where it stopped. The table is written to
# $OUT/table.md (a model not trained or evaluated yet: "not run"); TABLE_ONLY=1 writes only the table.
set -euo pipefail

# ---- parameters ---------------------------------------------------------------------------------
PY=${PY:-.venv/bin/python}
OUT=${OUT:-runs/block_evidence}
PASSAGES=${PASSAGES:-6}            # local blocks per sample, one holds the 6-digit code
TARGET_TOKENS=${TARGET_TOKENS:-160}  # word tokens per sample (blocks + question)
TRAIN_ROWS=${TRAIN_ROWS:-8000}
BASE_QUESTIONS=${BASE_QUESTIONS:-4}  # the base's rows ask about this many passages in turn
DISTINCT_WORDS=${DISTINCT_WORDS:-1}  # 1: a sample's entities share no word (an easier look-up)
ANSWER_FORM=${ANSWER_FORM:-label}  # label: "The <entity> <4 code words>."; code: six digits (data/rag_task.py)
EVAL_ROWS=${EVAL_ROWS:-200}
LONG_PASSAGES=${LONG_PASSAGES:-8}  # a second eval set of longer prompts than any training row's blocks
LONG_TOKENS=${LONG_TOKENS:-320}
BASE_SEED_DATA=${BASE_SEED_DATA:-1}
TRAIN_SEED=${TRAIN_SEED:-3}
EVAL_SEED=${EVAL_SEED:-2}
MODEL=(--model-preset tiny --hidden-size "${HIDDEN:-128}" --ffn-hidden-size "${FFN:-352}")
SEQ=${SEQ:-512}
MB=${MB:-8}
SEED=${SEED:-1}
# base, first stage: from random init, repeat random sequences of the task's words, of lengths
# that vary (learns to copy by content: the induction pattern the label answers need)
COPY_ITERS=${COPY_ITERS:-600}
COPY_ROWS=${COPY_ROWS:-40000}
COPY_FORM=${COPY_FORM:-repeat}     # repeat the words, or continue them after a key (data/copy_task.py)
COPY_WORDS=${COPY_WORDS:-60}       # the most words per row
COPY_MIN_WORDS=${COPY_MIN_WORDS:-10}  # the fewest (= COPY_WORDS: one length, which a fixed offset answers)
COPY_LR=${COPY_LR:-2e-3}
COPY_MIN_LR=${COPY_MIN_LR:-2e-4}
COPY_WARMUP=${COPY_WARMUP:-100}
# base, second stage: full-attention SFT on the questions and the copy rows (which keep the copy
# skill: without them it was lost), from the first stage's weights; COPY_SHARE of its rows are copy rows
BASE_ITERS=${BASE_ITERS:-1500}
COPY_SHARE=${COPY_SHARE:-0.25}
BASE_STOP=${BASE_STOP:-$BASE_ITERS}  # stop (and save) here: --exit-interval
BASE_SAVE_EVERY=${BASE_SAVE_EVERY:-200}
BASE_LR=${BASE_LR:-1e-3}
BASE_MIN_LR=${BASE_MIN_LR:-1e-4}
BASE_WARMUP=${BASE_WARMUP:-50}
# fine-tunes from the base: identical data, steps and LR for every variant
FT_ITERS=${FT_ITERS:-60}
FT_LR=${FT_LR:-5e-4}
FT_MIN_LR=${FT_MIN_LR:-5e-5}
FT_WARMUP=${FT_WARMUP:-5}
SINKS=${SINKS:-2}
DROPOUT=${DROPOUT:-0.3}
TEMPERATURE=${TEMPERATURE:-2}
CE_WEIGHT=${CE_WEIGHT:-0.5}
# segmenter comparison: eval passages joined one per line, split again by each method
SEG_FIXED=${SEG_FIXED:-16 32}      # token budgets of the fixed-length splitter
SEG_DOCUMENTS=${SEG_DOCUMENTS:-800}  # synthetic training texts of the learned segmenter
SEG_MODELS=${SEG_MODELS:-base block_sft block_distill}

mkdir -p "$OUT"
log() { echo "[$(date -u +%H:%M:%S)] $*" | tee -a "$OUT/steps.log"; }
done_ckpt() { [[ -f "$1/latest_checkpointed_iteration.txt" ]]; }
quiet() { grep --line-buffered -v -i warn || true; }  # Megatron's import warnings off the console
cli() { "$PY" -m megatron_focusft.cli "$@" 2>&1 | quiet; }

# the block students, in table order
ORDER=(block_sft block_distill distill_no_sinks distill_no_dropout distill_no_weighting)
SEGMENTERS=()
for n in $SEG_FIXED; do SEGMENTERS+=("fixed$n"); done
SEGMENTERS+=(delimiter learned)

if [[ ${TABLE_ONLY:-0} != 1 ]]; then
# ---- a. data: a word-level tokenizer of the task, rows sized in its tokens --------------------------
# Byte tokens put a fact's words many positions apart; on words a tiny model learns the look-up in
# CPU time (README, Evidence).
TOK="$OUT/tokenizer"
[[ -f "$TOK/tokenizer.json" ]] || { log "data: tokenizer"; cli data tokenizer --rag-vocabulary --output "$TOK"; }
rag_rows() {  # OUT_FILE ROWS SEED QUESTIONS ANSWER_FORM [PASSAGES TARGET_TOKENS]
    [[ -f "$1" ]] && return 0
    log "data: $(basename "$1")"
    cli data rag --output "$1" --num-samples "$2" --passages "${6:-$PASSAGES}" --target-tokens "${7:-$TARGET_TOKENS}" \
        --no-header --seed "$3" --questions "$4" --answer-form "$5" --tokenizer-model "$TOK" \
        ${DISTINCT_FLAG[@]+"${DISTINCT_FLAG[@]}"}
}
DISTINCT_FLAG=()
[[ $DISTINCT_WORDS == 1 ]] && DISTINCT_FLAG=(--distinct-words)
# The base learns in two stages (README, Evidence: from random init on the questions alone it sat
# at the no-copy loss for 500-700 steps): repeating random word sequences of varying length (every
# reply token a copy by content from the context), then those rows and questions about several
# passages in turn, each answered (the code form adds fact-sentence rows). Fine-tuning and
# evaluation: one question per sample, the layout block attention is for.
[[ -f "$OUT/copy.jsonl" ]] || { log "data: copy.jsonl"; cli data copy --output "$OUT/copy.jsonl" \
    --num-samples "$COPY_ROWS" --form "$COPY_FORM" --words "$COPY_WORDS" --min-words "$COPY_MIN_WORDS" --seed 0; }
rag_rows "$OUT/rag_base.jsonl" "$TRAIN_ROWS" "$BASE_SEED_DATA" "$BASE_QUESTIONS" "$ANSWER_FORM"
# the code form's base also reads the fact-sentence rows (a copy of the passage's words)
QUESTION_SHARE=$(awk "BEGIN {print 1 - $COPY_SHARE}")
BASE_DATA=("$COPY_SHARE" "$OUT/copy.jsonl" "$QUESTION_SHARE" "$OUT/rag_base.jsonl")
if [[ $ANSWER_FORM == code ]]; then
    rag_rows "$OUT/rag_base_sentences.jsonl" "$TRAIN_ROWS" 5 "$BASE_QUESTIONS" sentence
    BASE_DATA+=("$QUESTION_SHARE" "$OUT/rag_base_sentences.jsonl")
fi
rag_rows "$OUT/rag_train.jsonl" "$TRAIN_ROWS" "$TRAIN_SEED" 1 "$ANSWER_FORM"
rag_rows "$OUT/rag_eval.jsonl" "$EVAL_ROWS" "$EVAL_SEED" 1 "$ANSWER_FORM"
rag_rows "$OUT/rag_eval_long.jsonl" "$EVAL_ROWS" "$EVAL_SEED" 1 "$ANSWER_FORM" "$LONG_PASSAGES" "$LONG_TOKENS"

COMMON=(--seq-length "$SEQ" --micro-batch-size "$MB" --seed "$SEED" --log-interval 10)

# ---- b. base (teacher): full attention, causal SFT in two stages ----------------------------------
if ! done_ckpt "$OUT/base_copy"; then
    log "train: base, stage 1 (copy)"
    "$PY" pretrain_focusft.py "${MODEL[@]}" --training-mode sft --sft-mask causal "${COMMON[@]}" \
        --tokenizer-model "$TOK" --data-path "$OUT/copy.jsonl" --train-iters "$COPY_ITERS" --lr "$COPY_LR" \
        --min-lr "$COPY_MIN_LR" --lr-warmup-iters "$COPY_WARMUP" --save "$OUT/base_copy" --save-interval "$COPY_ITERS" \
        2>&1 | quiet | tee "$OUT/base_copy.log"
fi
if ! done_ckpt "$OUT/base"; then
    log "train: base, stage 2 (questions)"
    "$PY" pretrain_focusft.py --pretrained-checkpoint "$OUT/base_copy" --finetune --training-mode sft \
        --sft-mask causal "${COMMON[@]}" --tokenizer-model "$TOK" \
        --data-path "${BASE_DATA[@]}" --train-iters "$BASE_ITERS" \
        --exit-interval "$BASE_STOP" --lr "$BASE_LR" --min-lr "$BASE_MIN_LR" --lr-warmup-iters "$BASE_WARMUP" \
        --save "$OUT/base" --save-interval "$BASE_SAVE_EVERY" 2>&1 | quiet | tee "$OUT/base.log"
fi

# ---- c. block students from the base ----------------------------------------------------------------
# Only a base that looks the answer up makes the comparison mean anything: evaluate it first and
# stop below MIN_BASE_SCORE (% of eval codes right under full attention; 0 disables the check).
eval_run() {  # NAME ATTENTION ROWS LABEL
    local dir="$OUT/eval/$4"
    [[ -f "$dir/results.json" ]] && return 0
    log "eval: $4"
    cli eval --load "$OUT/$1" --rag-file "$3" --attention "$2" --micro-batch-size 16 --output-dir "$dir" \
        --label "$4" | tail -n 3
}
eval_run base full "$OUT/rag_eval.jsonl" base-full
base_score=$("$PY" -c 'import json, sys; (r,) = json.load(open(sys.argv[1]))["results"]["rag"].values(); print(r["score"])' \
    "$OUT/eval/base-full/results.json")
below() { "$PY" -c 'import sys; sys.exit(0 if float(sys.argv[1]) < float(sys.argv[2]) else 1)' "$@"; }
if below "$base_score" "${MIN_BASE_SCORE:-20}"; then
    log "stop: the base answers $base_score% of the eval codes under full attention (MIN_BASE_SCORE=${MIN_BASE_SCORE:-20});" \
        "train it longer (BASE_ITERS, then delete $OUT/base) before the block students"
    exit 3
fi
FT=(--pretrained-checkpoint "$OUT/base" --finetune "${COMMON[@]}" --tokenizer-model "$TOK" --data-path "$OUT/rag_train.jsonl" --train-iters "$FT_ITERS" --lr "$FT_LR"
    --min-lr "$FT_MIN_LR" --lr-warmup-iters "$FT_WARMUP")
DISTILL=(--training-mode block-distill --distill-temperature "$TEMPERATURE" --distill-ce-weight "$CE_WEIGHT")
declare -A VARIANT=(
    [block_sft]="--training-mode block-sft --block-ratio 1.0"
    [block_distill]="${DISTILL[*]} --block-sink-tokens $SINKS --block-dropout $DROPOUT --distill-token-weighting"
    [distill_no_sinks]="${DISTILL[*]} --block-sink-tokens 0 --block-dropout $DROPOUT --distill-token-weighting"
    [distill_no_dropout]="${DISTILL[*]} --block-sink-tokens $SINKS --block-dropout 0 --distill-token-weighting"
    [distill_no_weighting]="${DISTILL[*]} --block-sink-tokens $SINKS --block-dropout $DROPOUT"
)
for name in "${ORDER[@]}"; do
    if ! done_ckpt "$OUT/$name"; then
        log "train: $name"
        # shellcheck disable=SC2086
        "$PY" pretrain_focusft.py ${VARIANT[$name]} "${FT[@]}" --save "$OUT/$name" --save-interval "$FT_ITERS" \
            2>&1 | quiet | tee "$OUT/$name.log"
    fi
done

# ---- d. evaluation: full attention and block attention with KV reuse ------------------------------
for name in base "${ORDER[@]}"; do
    for attention in full block; do
        eval_run "$name" "$attention" "$OUT/rag_eval.jsonl" "$name-$attention"
        eval_run "$name" "$attention" "$OUT/rag_eval_long.jsonl" "$name-$attention-long"
    done
done

# ---- e. segmenters: the eval passages joined one per line, split again by each method -------------
if [[ ! -f "$OUT/segmenter/model.pt" ]]; then
    log "segmenter: train the learned one on synthetic texts"
    cli segment synthetic --output "$OUT/segmenter_train.jsonl" --documents "$SEG_DOCUMENTS" --seed 0
    cli segment train --train "$OUT/segmenter_train.jsonl" --output "$OUT/segmenter" --no-progress
fi
for method in "${SEGMENTERS[@]}"; do
    rows="$OUT/segmented/$method.jsonl"
    if [[ ! -f "$rows" ]]; then
        mkdir -p "$OUT/segmented"
        case $method in
            fixed*) flags=(--method fixed --max-block-tokens "${method#fixed}") ;;
            learned) flags=(--method learned --model "$OUT/segmenter") ;;
            *) flags=(--method "$method") ;;
        esac
        cli segment apply "${flags[@]}" --tokenizer "$TOK" --join-blocks $'\n' --no-progress \
            --input "$OUT/rag_eval.jsonl" --output "$rows"
    fi
    for name in $SEG_MODELS; do
        eval_run "$name" block "$rows" "$name-seg-$method"
    done
done

fi  # TABLE_ONLY

# ---- f. tables -------------------------------------------------------------------------------------
LONG="$LONG_PASSAGES passages, $LONG_TOKENS tokens" "$PY" - "$OUT" "$SEG_MODELS" "${SEGMENTERS[*]}" "${ORDER[@]}" <<'EOF' | tee "$OUT/table.md"
import json, os, re, sys
from pathlib import Path
out, seg_models, segmenters, names = Path(sys.argv[1]), sys.argv[2].split(), sys.argv[3].split(), ["base", *sys.argv[4:]]
labels = {"base": "base (teacher, full-attention SFT)", "block_sft": "block-sft",
          "block_distill": "block-distill (sinks + dropout + weighting)", "distill_no_sinks": "block-distill, no sinks",
          "distill_no_dropout": "block-distill, no block dropout", "distill_no_weighting": "block-distill, no token weighting"}
counts = set()
def cell(run):
    path = out / "eval" / run / "results.json"
    if not path.is_file():
        return "not run"
    (r,) = json.loads(path.read_text())["results"]["rag"].values()
    counts.add(r["samples"])
    return f"{r['score']:.1f} [{r['ci95'][0]:.1f}, {r['ci95'][1]:.1f}]"
long = os.environ["LONG"]
print(f"| model | full attention | block attention (KV reuse) | full, longer prompts ({long}) | block, longer prompts |")
print("| --- | --- | --- | --- | --- |")
for name in names:
    runs = [cell(f"{name}-{attention}{suffix}") for suffix in ("", "-long") for attention in ("full", "block")]
    print(f"| {labels[name]} | " + " | ".join(runs) + " |")
print()
print("| blocks from | blocks per sample | answer's fact in one block | " + " | ".join(labels[m] for m in seg_models) + " |")
print("| --- | --- | --- | " + " | ".join("---" for _ in seg_models) + " |")
for method in ["passages", *segmenters]:
    path = out / ("rag_eval.jsonl" if method == "passages" else f"segmented/{method}.jsonl")
    rows = [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []
    intact = []
    for row in rows:
        entity = re.fullmatch(r"What is the code of the (.+)\?", row["messages"][0]["content"]).group(1)
        answer = row["messages"][1]["content"]  # the label form's answer is the fact itself
        fact = answer if answer.startswith("The ") else f"The code of the {entity} is {answer}."
        intact.append(any(fact in block for block in row["blocks"]))
    shape = (f"{sum(len(r['blocks']) for r in rows) / len(rows):.1f} | {100 * sum(intact) / len(rows):.0f}%"
             if rows else "not run | not run")
    runs = [cell(f"{m}-block") if method == "passages" else cell(f"{m}-seg-{method}") for m in seg_models]
    print(f"| {method} | {shape} | " + " | ".join(runs) + " |")
print(f"\naccuracy in % (the whole answer in the reply), block attention with KV reuse in the second table, 95% "
      f"bootstrap interval, {sorted(counts)} held-out samples")
EOF
log "done: $OUT/table.md"
