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
PASSAGES=${PASSAGES:-4}            # local blocks per sample, one holds the 6-digit code
TARGET_TOKENS=${TARGET_TOKENS:-288}  # byte tokens per sample (blocks + question)
TRAIN_ROWS=${TRAIN_ROWS:-4000}
EVAL_ROWS=${EVAL_ROWS:-100}
TRAIN_SEED=${TRAIN_SEED:-1}
EVAL_SEED=${EVAL_SEED:-2}
SEQ=${SEQ:-512}
MB=${MB:-8}
SEED=${SEED:-1}
# base: full-attention SFT from random init (the README says what it reached)
BASE_ITERS=${BASE_ITERS:-600}      # length of the LR schedule
BASE_STOP=${BASE_STOP:-400}        # stop (and save) here: --exit-interval
BASE_SAVE_EVERY=${BASE_SAVE_EVERY:-100}
BASE_LR=${BASE_LR:-2e-3}
BASE_MIN_LR=${BASE_MIN_LR:-2e-4}
BASE_WARMUP=${BASE_WARMUP:-40}
# fine-tunes from the base: identical data, steps and LR for every variant
FT_ITERS=${FT_ITERS:-30}
FT_LR=${FT_LR:-5e-4}
FT_MIN_LR=${FT_MIN_LR:-5e-5}
FT_WARMUP=${FT_WARMUP:-3}
SINKS=${SINKS:-2}
DROPOUT=${DROPOUT:-0.3}
TEMPERATURE=${TEMPERATURE:-2}
CE_WEIGHT=${CE_WEIGHT:-0.5}

mkdir -p "$OUT"
log() { echo "[$(date -u +%H:%M:%S)] $*" | tee -a "$OUT/steps.log"; }
done_ckpt() { [[ -f "$1/latest_checkpointed_iteration.txt" ]]; }
quiet() { grep --line-buffered -v -i warn || true; }  # Megatron's import warnings off the console

# the block students, in table order
ORDER=(block_sft block_distill distill_no_sinks distill_no_dropout distill_no_weighting)

if [[ ${TABLE_ONLY:-0} != 1 ]]; then
# ---- a. data --------------------------------------------------------------------------------------
if [[ ! -f "$OUT/rag_train.jsonl" ]]; then
    log "data: train rows"
    "$PY" -m megatron_focusft.cli data rag --output "$OUT/rag_train.jsonl" --num-samples "$TRAIN_ROWS" \
        --passages "$PASSAGES" --target-tokens "$TARGET_TOKENS" --no-header --seed "$TRAIN_SEED"
fi
if [[ ! -f "$OUT/rag_eval.jsonl" ]]; then
    log "data: eval rows"
    "$PY" -m megatron_focusft.cli data rag --output "$OUT/rag_eval.jsonl" --num-samples "$EVAL_ROWS" \
        --passages "$PASSAGES" --target-tokens "$TARGET_TOKENS" --no-header --seed "$EVAL_SEED"
fi

# The base also reads the same rows with a second kind of question, "Repeat the sentence about the
# <entity>." -> "The code of the <entity> is <code>.": an answer that copies the passage's words after
# the entity, so the copy mechanism can form (on the code-only answers alone the tiny model sat at
# the uniform-digit loss for 230 steps; see README). Fine-tuning and evaluation: code-only rows.
if [[ ! -f "$OUT/rag_train_facts.jsonl" ]]; then
    log "data: fact-sentence rows"
    "$PY" - "$OUT/rag_train.jsonl" "$OUT/rag_train_facts.jsonl" <<'PYEOF'
import json, re, sys
src, dst = sys.argv[1], sys.argv[2]
with open(src) as f, open(dst, "w") as g:
    for line in f:
        row = json.loads(line)
        entity = re.fullmatch(r"What is the code of the (.+)\?", row["messages"][0]["content"]).group(1)
        passage = row["blocks"][row["meta"]["answer_block"]]
        fact = re.search(rf"The code of the {re.escape(entity)} is \d{{6}}\.", passage).group(0)
        row["messages"] = [{"role": "user", "content": f"Repeat the sentence about the {entity}."},
                           {"role": "assistant", "content": fact}]
        g.write(json.dumps(row) + "\n")
PYEOF
fi

COMMON=(--seq-length "$SEQ" --micro-batch-size "$MB" --seed "$SEED" --log-interval 10)

# ---- b. base (teacher): full attention, causal SFT on the RAG rows --------------------------------
if ! done_ckpt "$OUT/base"; then
    log "train: base"
    "$PY" pretrain_focusft.py --model-preset tiny --training-mode sft --sft-mask causal "${COMMON[@]}" \
        --data-path "$OUT/rag_train.jsonl" "$OUT/rag_train_facts.jsonl" --train-iters "$BASE_ITERS" --exit-interval "$BASE_STOP" --lr "$BASE_LR" --min-lr "$BASE_MIN_LR" \
        --lr-warmup-iters "$BASE_WARMUP" --save "$OUT/base" --save-interval "$BASE_SAVE_EVERY" 2>&1 \
        | quiet | tee "$OUT/base.log"
fi

# ---- c. block students from the base ----------------------------------------------------------------
FT=(--pretrained-checkpoint "$OUT/base" --finetune "${COMMON[@]}" --data-path "$OUT/rag_train.jsonl" --train-iters "$FT_ITERS" --lr "$FT_LR"
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
        dir="$OUT/eval/$name-$attention"
        if [[ ! -f "$dir/results.json" ]]; then
            log "eval: $name ($attention)"
            "$PY" -m megatron_focusft.cli eval --load "$OUT/$name" --rag-file "$OUT/rag_eval.jsonl" \
                --attention "$attention" --micro-batch-size 16 --output-dir "$dir" --label "$name-$attention" \
                2>&1 | quiet | tail -n 3
        fi
    done
done

fi  # TABLE_ONLY

# ---- e. table ---------------------------------------------------------------------------------------
"$PY" - "$OUT" "${ORDER[@]}" <<'EOF' | tee "$OUT/table.md"
import json, sys
from pathlib import Path
out, names = Path(sys.argv[1]), ["base", *sys.argv[2:]]
labels = {"base": "base (teacher, full-attention SFT)", "block_sft": "block-sft",
          "block_distill": "block-distill (sinks + dropout + weighting)", "distill_no_sinks": "block-distill, no sinks",
          "distill_no_dropout": "block-distill, no block dropout", "distill_no_weighting": "block-distill, no token weighting"}
def cell(name, attention):
    path = out / "eval" / f"{name}-{attention}" / "results.json"
    if not path.is_file():
        return "not run", None
    (r,) = json.loads(path.read_text())["results"]["rag"].values()
    return f"{r['score']:.1f} [{r['ci95'][0]:.1f}, {r['ci95'][1]:.1f}]", r["samples"]
print("| model | full attention | block attention (KV reuse) |")
print("| --- | --- | --- |")
counts = set()
for name in names:
    (full, n_full), (block, n_block) = cell(name, "full"), cell(name, "block")
    counts |= {n for n in (n_full, n_block) if n}
    print(f"| {labels[name]} | {full} | {block} |")
print(f"\naccuracy in % (answer code in the reply), 95% bootstrap interval, {sorted(counts)} held-out samples")
EOF
log "done: $OUT/table.md"
