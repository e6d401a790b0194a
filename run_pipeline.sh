#!/usr/bin/env bash
# Run every wsss stage end to end: prepare -> train-cls -> make-cam -> refine --crf -> train-seg
# -> predict -> eval -> report. With no arguments it generates the demo dataset under ./work/demo
# and uses CPU-sized settings. Run it again and it resumes: every stage skips finished work.
set -euo pipefail

usage() {
    cat <<'USAGE'
Usage: ./run_pipeline.sh [options]

Options (each also settable through the environment variable in brackets):
  --dataset demo|voc|coco|folder   dataset kind [WSSS_DATASET, default demo]
  --root DIR            prepared dataset root (voc: VOCdevkit/VOC2012, coco: COCO, folder: its root);
                        for demo, where the demo data is generated [WSSS_ROOT, default <out>/data]
  --train-split NAME    split for the classifier, CAMs, pseudo-labels and DeepLab [WSSS_TRAIN_SPLIT;
                        default train (demo, voc, folder), train2014 (coco); use train_aug for VOC+SBD]
  --val-split NAME      split for validation and the final mIoU [WSSS_VAL_SPLIT; default val / val2014]
  --backbone NAME       classifier backbone resnet18|resnet50|resnet101 [WSSS_BACKBONE; demo resnet18, else resnet50]
  --seg-model NAME      deeplabv3_resnet18|deeplabv3_resnet50|deeplabv3_resnet101 [WSSS_SEG_MODEL]
  --weights W           imagenet|none|PATH for both networks [WSSS_WEIGHTS; demo none, else imagenet]
  --device D            auto|cpu|cuda [WSSS_DEVICE, default auto]
  --gpus N              GPUs per machine; N > 1 runs the training stages under torchrun [WSSS_GPUS, default 1]
  --out DIR             output folder [WSSS_OUT, default ./work/demo]
  --seed N              random seed [WSSS_SEED, default 0]
  demo size (only with --dataset demo; a smoke test uses tiny values):
  --num-train N --num-val M --size S   demo images and their long side [WSSS_NUM_TRAIN 120, WSSS_NUM_VAL 40, WSSS_SIZE 96]
  --epochs N            classifier epochs [WSSS_EPOCHS, default 12]
  --iterations N        DeepLab iterations [WSSS_ITERATIONS, default 500]
  -h, --help            this text
USAGE
}

DATASET=${WSSS_DATASET:-demo}
ROOT=${WSSS_ROOT:-}
TRAIN_SPLIT=${WSSS_TRAIN_SPLIT:-}
VAL_SPLIT=${WSSS_VAL_SPLIT:-}
BACKBONE=${WSSS_BACKBONE:-}
SEG_MODEL=${WSSS_SEG_MODEL:-}
WEIGHTS=${WSSS_WEIGHTS:-}
DEVICE=${WSSS_DEVICE:-auto}
GPUS=${WSSS_GPUS:-1}
OUT=${WSSS_OUT:-work/demo}
SEED=${WSSS_SEED:-0}
NUM_TRAIN=${WSSS_NUM_TRAIN:-120}
NUM_VAL=${WSSS_NUM_VAL:-40}
SIZE=${WSSS_SIZE:-96}
EPOCHS=${WSSS_EPOCHS:-12}
ITERATIONS=${WSSS_ITERATIONS:-500}

while [ $# -gt 0 ]; do
    case "$1" in
        --dataset) DATASET=$2; shift 2 ;;
        --root) ROOT=$2; shift 2 ;;
        --train-split) TRAIN_SPLIT=$2; shift 2 ;;
        --val-split) VAL_SPLIT=$2; shift 2 ;;
        --backbone) BACKBONE=$2; shift 2 ;;
        --seg-model) SEG_MODEL=$2; shift 2 ;;
        --weights) WEIGHTS=$2; shift 2 ;;
        --device) DEVICE=$2; shift 2 ;;
        --gpus) GPUS=$2; shift 2 ;;
        --out) OUT=$2; shift 2 ;;
        --seed) SEED=$2; shift 2 ;;
        --num-train) NUM_TRAIN=$2; shift 2 ;;
        --num-val) NUM_VAL=$2; shift 2 ;;
        --size) SIZE=$2; shift 2 ;;
        --epochs) EPOCHS=$2; shift 2 ;;
        --iterations) ITERATIONS=$2; shift 2 ;;
        -h|--help) usage; exit 0 ;;
        *) echo "Error: unknown option $1 (see --help)" >&2; exit 2 ;;
    esac
done

case "$DATASET" in
    demo)
        ROOT=${ROOT:-$OUT/data}/VOC2012; KIND=voc
        TRAIN_SPLIT=${TRAIN_SPLIT:-train}; VAL_SPLIT=${VAL_SPLIT:-val}
        BACKBONE=${BACKBONE:-resnet18}; SEG_MODEL=${SEG_MODEL:-deeplabv3_resnet18}; WEIGHTS=${WEIGHTS:-none} ;;
    voc|folder)
        KIND=$DATASET; TRAIN_SPLIT=${TRAIN_SPLIT:-train}; VAL_SPLIT=${VAL_SPLIT:-val} ;;
    coco)
        KIND=coco; TRAIN_SPLIT=${TRAIN_SPLIT:-train2014}; VAL_SPLIT=${VAL_SPLIT:-val2014} ;;
    *) echo "Error: --dataset must be demo, voc, coco or folder, got '$DATASET'" >&2; exit 2 ;;
esac
if [ -z "$ROOT" ]; then
    echo "Error: --root is required for --dataset $DATASET (prepare it first with 'wsss prepare $DATASET')" >&2
    exit 2
fi
BACKBONE=${BACKBONE:-resnet50}; SEG_MODEL=${SEG_MODEL:-deeplabv3_resnet50}; WEIGHTS=${WEIGHTS:-imagenet}

RUN=$OUT/run
# The stage folders under $RUN (cls, cams, pseudo, seg, pred, pred_<split>) are the run layout that
# wsss/artifacts.py defines once (RUN_LAYOUT) and `wsss report` reads; keep the names below in step with it.
DATA=(--dataset "$KIND" --root "$ROOT")
if [ "$GPUS" -gt 1 ]; then
    TRAIN=(torchrun --standalone --nproc_per_node "$GPUS" -m stages.cli)
else
    TRAIN=(wsss)
fi

step() { printf '\n== %s\n' "$*"; }

if [ "$DATASET" = demo ]; then
    # CPU-sized settings for the synthetic data (about 10 minutes on 2 cores); real datasets use
    # each command's defaults, the literature's settings (see README). The demo classifier is
    # trained plain: from scratch, equivariance and erasing lowered CAM mIoU (bench/README.md).
    # One intra-op thread: the demo's tiny tensors gain little from more, and on a busy 2-core
    # machine PyTorch's spinning worker threads made training up to 10x slower (export it to override).
    export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
    step "demo data -> $ROOT"
    if [ ! -f "$ROOT/ImageSets/Segmentation/val.txt" ]; then
        wsss demo-data "$(dirname "$ROOT")" --num-train "$NUM_TRAIN" --num-val "$NUM_VAL" --size "$SIZE" --seed "$SEED"
    fi
    wsss prepare voc --root "$ROOT"
    CLS_OPTS=(--crop-size 80 --scale-range 0.7,1.3 --batch-size 8 --epochs "$EPOCHS" --lr 0.05 --val-cam-images 40 --workers 0)
    CAM_OPTS=(--sweep 0.05:0.95:0.01 --workers 1)
    SEG_OPTS=(--crop-size 80 --batch-size 8 --iterations "$ITERATIONS" --lr 0.05 --head-lr-mult 1 --eval-every 250 --workers 0)
    PRED_OPTS=(--scales 0.75,1.0,1.25 --workers 0)
else
    CLS_OPTS=(); CAM_OPTS=(); SEG_OPTS=(); PRED_OPTS=()
fi

step "train-cls -> $RUN/cls"
"${TRAIN[@]}" train-cls "${DATA[@]}" --split "$TRAIN_SPLIT" --val-split "$VAL_SPLIT" --out "$RUN/cls" \
    --backbone "$BACKBONE" --weights "$WEIGHTS" --device "$DEVICE" --seed "$SEED" ${CLS_OPTS[@]+"${CLS_OPTS[@]}"}

step "make-cam -> $RUN/cams"
wsss make-cam "${DATA[@]}" --split "$TRAIN_SPLIT" --checkpoint "$RUN/cls/best.pth" --out "$RUN/cams" \
    --device "$DEVICE" --eval ${CAM_OPTS[@]+"${CAM_OPTS[@]}"}

step "refine --crf -> $RUN/pseudo"
wsss refine "${DATA[@]}" --split "$TRAIN_SPLIT" --cams "$RUN/cams" --out "$RUN/pseudo" --crf --seed "$SEED"
wsss eval "${DATA[@]}" --split "$TRAIN_SPLIT" --pred "$RUN/pseudo"

step "train-seg -> $RUN/seg"
"${TRAIN[@]}" train-seg "${DATA[@]}" --split "$TRAIN_SPLIT" --val-split "$VAL_SPLIT" --labels "$RUN/pseudo" --raw \
    --out "$RUN/seg" --model "$SEG_MODEL" --weights-backbone "$WEIGHTS" --device "$DEVICE" --seed "$SEED" \
    ${SEG_OPTS[@]+"${SEG_OPTS[@]}"}

# last.pth, not best.pth: best.pth was chosen on the validation split it would be scored on
step "predict -> $RUN/pred"
wsss predict "${DATA[@]}" --split "$VAL_SPLIT" --checkpoint "$RUN/seg/last.pth" --out "$RUN/pred" --device "$DEVICE" \
    ${PRED_OPTS[@]+"${PRED_OPTS[@]}"}
if [ "$DATASET" = demo ]; then
    # predictions on the CAM split too, for the report's gallery (image | CAM | pseudo | prediction | truth)
    wsss predict "${DATA[@]}" --split "$TRAIN_SPLIT" --checkpoint "$RUN/seg/last.pth" --out "$RUN/pred_$TRAIN_SPLIT" \
        --device "$DEVICE" ${PRED_OPTS[@]+"${PRED_OPTS[@]}"}
fi

step "eval -> $RUN/pred"
wsss eval "${DATA[@]}" --split "$VAL_SPLIT" --pred "$RUN/pred"

step "report -> $RUN/report.md"
wsss report "$RUN"
