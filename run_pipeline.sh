#!/usr/bin/env bash
# Run every wsss stage end to end: prepare -> pretrain -> train-cls -> make-cam -> [train-aff] -> refine
# --crf -> train-seg -> predict -> eval -> report. With no arguments it generates the demo dataset under
# ./work/demo and uses CPU-sized settings. Run it again and it resumes: every stage skips finished work.
# The stage folders under <out>/run (pretrain, cls, cams, aff, pseudo, seg, seg_gt, pred) are the run
# layout that `wsss report` reads (wsss/artifacts.py, RUN_LAYOUT).
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
  --weights W           imagenet|none|PATH for both networks [WSSS_WEIGHTS; demo: the pretrain output, else imagenet]
  --pretrain M          self-supervised pretraining first: rotation|contrastive|none [WSSS_PRETRAIN;
                        demo rotation, else none]; its backbone.pth then initialises both networks
  --pretrained PATH     use this backbone file instead of pretraining (e.g. shared by several runs) [WSSS_PRETRAINED]
  --affinity            train an affinity network and refine with a random walk [WSSS_AFFINITY=1]
  --upper-bound         also train DeepLab on the ground truth with the same recipe; the report shows
                        weak/full [WSSS_UPPER_BOUND=1]
  --upper-bound-dir DIR  where that ground-truth run lives (default <out>/run/seg_gt; runs that share the seed,
                        backbone and weights can share one) [WSSS_UPPER_BOUND_DIR]
  --stop-after STAGE    stop after pretrain|train-cls|make-cam|refine|train-seg [WSSS_STOP_AFTER]
  --seg-init cls|weights  DeepLab's trunk starts from the CAM classifier's (cls, when both are the same ResNet)
                        or from --weights [WSSS_SEG_INIT, default cls]
  --cls-opts "..."      extra options for train-cls (e.g. "--er-weight 1") [WSSS_CLS_OPTS]
  --cam-opts "..."      extra options for make-cam (e.g. "--erase-steps 1") [WSSS_CAM_OPTS]
  --refine-opts "..."   extra options for refine [WSSS_REFINE_OPTS]
  --seg-opts "..."      extra options for train-seg [WSSS_SEG_OPTS]
  --raw                 weight DeepLab's cross-entropy with refine's reliability maps (RAW); off by default:
                        no gain on the demo, bench/ablation_earlier_step.md (--no-raw: plain cross-entropy) [WSSS_RAW=1]
  --no-pred-crf         predict without DeepLab-v2's dense-CRF post-processing (on by default: +9 val mIoU on
                        the demo, bench/ablation_stride16.md) [WSSS_PRED_CRF=0]
  --pred-opts "..."     extra options for predict (e.g. "--crf-scale 0.5") [WSSS_PRED_OPTS]
  --device D            auto|cpu|cuda [WSSS_DEVICE, default auto]
  --gpus N              GPUs per machine; N > 1 runs the training stages under torchrun [WSSS_GPUS, default 1]
  --out DIR             output folder [WSSS_OUT, default ./work/demo]
  --seed N              random seed of training [WSSS_SEED, default 0]
  demo size (only with --dataset demo; a smoke test uses tiny values):
  --num-train N --num-val M --size S   demo images and their long side [WSSS_NUM_TRAIN 120, WSSS_NUM_VAL 40, WSSS_SIZE 96]
  --data-seed N         seed of the demo images [WSSS_DATA_SEED, default 0]
  --pretrain-epochs N   [WSSS_PRETRAIN_EPOCHS, default 40]
  --epochs N            classifier epochs [WSSS_EPOCHS, default 12]
  --iterations N        DeepLab iterations [WSSS_ITERATIONS, default 1000]
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
PRETRAIN=${WSSS_PRETRAIN:-}
PRETRAINED=${WSSS_PRETRAINED:-}
AFFINITY=${WSSS_AFFINITY:-0}
UPPER_BOUND=${WSSS_UPPER_BOUND:-0}
RAW=${WSSS_RAW:-0}
UPPER_BOUND_DIR=${WSSS_UPPER_BOUND_DIR:-}
STOP_AFTER=${WSSS_STOP_AFTER:-}
SEG_INIT=${WSSS_SEG_INIT:-cls}
USER_CLS_OPTS=${WSSS_CLS_OPTS:-}
USER_CAM_OPTS=${WSSS_CAM_OPTS:-}
USER_REFINE_OPTS=${WSSS_REFINE_OPTS:-}
USER_SEG_OPTS=${WSSS_SEG_OPTS:-}
PRED_CRF=${WSSS_PRED_CRF:-1}
USER_PRED_OPTS=${WSSS_PRED_OPTS:-}
DEVICE=${WSSS_DEVICE:-auto}
GPUS=${WSSS_GPUS:-1}
OUT=${WSSS_OUT:-work/demo}
SEED=${WSSS_SEED:-0}
DATA_SEED=${WSSS_DATA_SEED:-0}
NUM_TRAIN=${WSSS_NUM_TRAIN:-120}
NUM_VAL=${WSSS_NUM_VAL:-40}
SIZE=${WSSS_SIZE:-96}
PRETRAIN_EPOCHS=${WSSS_PRETRAIN_EPOCHS:-40}
EPOCHS=${WSSS_EPOCHS:-12}
ITERATIONS=${WSSS_ITERATIONS:-1000}

while [ $# -gt 0 ]; do
    case "$1" in
        --dataset) DATASET=$2; shift 2 ;;
        --root) ROOT=$2; shift 2 ;;
        --train-split) TRAIN_SPLIT=$2; shift 2 ;;
        --val-split) VAL_SPLIT=$2; shift 2 ;;
        --backbone) BACKBONE=$2; shift 2 ;;
        --seg-model) SEG_MODEL=$2; shift 2 ;;
        --weights) WEIGHTS=$2; shift 2 ;;
        --pretrain) PRETRAIN=$2; shift 2 ;;
        --pretrained) PRETRAINED=$2; shift 2 ;;
        --affinity) AFFINITY=1; shift ;;
        --upper-bound) UPPER_BOUND=1; shift ;;
        --raw) RAW=1; shift ;;
        --no-raw) RAW=0; shift ;;
        --upper-bound-dir) UPPER_BOUND=1; UPPER_BOUND_DIR=$2; shift 2 ;;
        --stop-after) STOP_AFTER=$2; shift 2 ;;
        --seg-init) SEG_INIT=$2; shift 2 ;;
        --cls-opts) USER_CLS_OPTS=$2; shift 2 ;;
        --cam-opts) USER_CAM_OPTS=$2; shift 2 ;;
        --refine-opts) USER_REFINE_OPTS=$2; shift 2 ;;
        --seg-opts) USER_SEG_OPTS=$2; shift 2 ;;
        --no-pred-crf) PRED_CRF=0; shift ;;
        --pred-opts) USER_PRED_OPTS=$2; shift 2 ;;
        --device) DEVICE=$2; shift 2 ;;
        --gpus) GPUS=$2; shift 2 ;;
        --out) OUT=$2; shift 2 ;;
        --seed) SEED=$2; shift 2 ;;
        --data-seed) DATA_SEED=$2; shift 2 ;;
        --num-train) NUM_TRAIN=$2; shift 2 ;;
        --num-val) NUM_VAL=$2; shift 2 ;;
        --size) SIZE=$2; shift 2 ;;
        --pretrain-epochs) PRETRAIN_EPOCHS=$2; shift 2 ;;
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
        BACKBONE=${BACKBONE:-resnet18}; SEG_MODEL=${SEG_MODEL:-deeplabv3_resnet18}; PRETRAIN=${PRETRAIN:-rotation} ;;
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
case "${PRETRAIN:-none}" in
    rotation|contrastive|none) ;;
    *) echo "Error: --pretrain must be rotation, contrastive or none, got '$PRETRAIN'" >&2; exit 2 ;;
esac
if [ -n "$PRETRAINED" ] && [ ! -f "$PRETRAINED" ]; then
    echo "Error: --pretrained $PRETRAINED: file not found" >&2; exit 2
fi
BACKBONE=${BACKBONE:-resnet50}; SEG_MODEL=${SEG_MODEL:-deeplabv3_resnet50}; PRETRAIN=${PRETRAIN:-none}
case "$SEG_INIT" in
    cls|weights) ;;
    *) echo "Error: --seg-init must be cls or weights, got '$SEG_INIT'" >&2; exit 2 ;;
esac
case "$PRED_CRF" in
    0|1) ;;
    *) echo "Error: WSSS_PRED_CRF must be 0 or 1, got '$PRED_CRF'" >&2; exit 2 ;;
esac
case "$STOP_AFTER" in
    ""|pretrain|train-cls|make-cam|refine|train-seg) ;;
    *) echo "Error: --stop-after must be pretrain, train-cls, make-cam, refine or train-seg, got '$STOP_AFTER'" >&2
       exit 2 ;;
esac

RUN=$OUT/run
# The stage folders under $RUN (cls, cams, pseudo, seg, pred, pred_<split>) are the run layout that
# wsss/artifacts.py defines once (RUN_LAYOUT) and `wsss report` reads; keep the names below in step with it.
DATA=(--dataset "$KIND" --root "$ROOT")
if [ "$GPUS" -gt 1 ]; then
    TRAIN=(torchrun --standalone --nproc_per_node "$GPUS" -m wsss.stages.cli)
else
    TRAIN=(wsss)
fi
# split "--a 1 --b 2" into words (the options carry no spaces of their own)
read -r -a CLS_EXTRA <<< "$USER_CLS_OPTS"
read -r -a CAM_EXTRA <<< "$USER_CAM_OPTS"
read -r -a REFINE_EXTRA <<< "$USER_REFINE_OPTS"
read -r -a SEG_EXTRA <<< "$USER_SEG_OPTS"
read -r -a PRED_EXTRA <<< "$USER_PRED_OPTS"
if [ "$PRED_CRF" = 1 ]; then PRED_EXTRA=(--crf ${PRED_EXTRA[@]+"${PRED_EXTRA[@]}"}); fi

step() { printf '\n== %s\n' "$*"; }
done_with() { if [ "$STOP_AFTER" = "$1" ]; then printf '\n== stopped after %s (--stop-after)\n' "$1"; exit 0; fi; }

if [ "$DATASET" = demo ]; then
    # CPU-sized settings for the synthetic data; real datasets use each command's defaults, the
    # literature's settings (see README). Measured choices (rotation pretraining, plain classifier,
    # DeepLab from the classifier's trunk): bench/README.md.
    # One intra-op thread: the demo's tiny tensors gain little from more, and on a busy 2-core
    # machine PyTorch's spinning worker threads made training up to 10x slower (export it to override).
    export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
    step "demo data -> $ROOT"
    if [ ! -f "$ROOT/ImageSets/Segmentation/val.txt" ]; then
        wsss demo-data "$(dirname "$ROOT")" --num-train "$NUM_TRAIN" --num-val "$NUM_VAL" --size "$SIZE" \
            --seed "$DATA_SEED"
    fi
    wsss prepare voc --root "$ROOT"
    PRE_OPTS=(--method "$PRETRAIN" --crop-size 64 --batch-size 60 --epochs "$PRETRAIN_EPOCHS" --warmup-epochs 2
              --workers 1)
    if [ "$PRETRAIN" = rotation ]; then PRE_OPTS+=(--lr 0.03); else PRE_OPTS+=(--lr 0.05 --temperature 0.2); fi
    # output stride 8: 12 x 12 CAM cells on the demo's 96 px images (6 x 6 at 16), so the equivariance views
    # (0.5-0.75 of the image, with --cls-opts "--er-weight 0.3") keep 6-9 cells a side
    # lr 0.1 with the CAM head at the trunk's rate and no colour jitter: the bottle, which differs from the
    # background's blobs mainly by its saturation, is learned only so (bench/ablation_step.md)
    # the plain CAM network, without equivariance or make-cam's erasing: at this step they raise the CAMs
    # (+8.9 from scratch, +5.4 pretrained) but not the pseudo-labels (-2.5, -1.7) or DeepLab (-3.1 ± 10.5,
    # -3.5 ± 7.7), 3 seeds each (bench/ablation.md); train-cls's and make-cam's own defaults are off too
    CLS_OPTS=(--crop-size 80 --scale-range 0.7,1.3 --batch-size 8 --epochs "$EPOCHS" --lr 0.1 --head-lr-mult 1
              --no-jitter --val-cam-images 40 --workers 0 --output-stride 8 --er-weight 0 --er-scale-range 0.5,0.75)
    CAM_OPTS=(--sweep 0.05:0.95:0.01 --workers 1 --erase-steps 0)
    AFF_OPTS=(--crop-size 80 --batch-size 8 --epochs 6 --embed-dim 64 --workers 1)
    # the demo's 96 px images give 12 x 12-cell graphs: AffinityNet's 256 steps (for 56 x 56 cells) would
    # mix every cell with every other; fewer, sharper steps (chosen on the demo's train split)
    WALK_OPTS=(--rw-steps 16 --rw-beta 32)
    # output stride 8: 10 x 10 logits on an 80 px crop (5 x 5 at 16); +14 val mIoU on seed 0, 2.4x the time.
    # 1000 iterations: at 500 DeepLab had not yet learned its pseudo-labels (seed 0: val 51.4 -> 56.5 with CRF)
    SEG_OPTS=(--crop-size 80 --batch-size 8 --iterations "$ITERATIONS" --lr 0.05 --head-lr-mult 1 --eval-every 250
              --workers 0 --output-stride 8)
    PRED_OPTS=(--scales 0.75,1.0,1.25 --workers 0)
else
    PRE_OPTS=(--method "$PRETRAIN"); CLS_OPTS=(); CAM_OPTS=(); AFF_OPTS=(); WALK_OPTS=(); SEG_OPTS=(); PRED_OPTS=()
fi

if [ -n "$PRETRAINED" ]; then
    WEIGHTS=${WEIGHTS:-$PRETRAINED}
elif [ "$PRETRAIN" != none ]; then
    step "pretrain ($PRETRAIN) -> $RUN/pretrain"
    "${TRAIN[@]}" pretrain "${DATA[@]}" --split "$TRAIN_SPLIT" --probe-split "$VAL_SPLIT" --out "$RUN/pretrain" \
        --backbone "$BACKBONE" --device "$DEVICE" --seed "$SEED" "${PRE_OPTS[@]}"
    WEIGHTS=${WEIGHTS:-$RUN/pretrain/backbone.pth}
fi
WEIGHTS=${WEIGHTS:-imagenet}
done_with pretrain

step "train-cls -> $RUN/cls"
"${TRAIN[@]}" train-cls "${DATA[@]}" --split "$TRAIN_SPLIT" --val-split "$VAL_SPLIT" --out "$RUN/cls" \
    --backbone "$BACKBONE" --weights "$WEIGHTS" --device "$DEVICE" --seed "$SEED" ${CLS_OPTS[@]+"${CLS_OPTS[@]}"} \
    ${CLS_EXTRA[@]+"${CLS_EXTRA[@]}"}
done_with train-cls

step "make-cam -> $RUN/cams"
wsss make-cam "${DATA[@]}" --split "$TRAIN_SPLIT" --checkpoint "$RUN/cls/last.pth" --out "$RUN/cams" \
    --device "$DEVICE" --eval ${CAM_OPTS[@]+"${CAM_OPTS[@]}"} ${CAM_EXTRA[@]+"${CAM_EXTRA[@]}"}
done_with make-cam

WALK=()
if [ "$AFFINITY" = 1 ]; then
    step "train-aff -> $RUN/aff"
    "${TRAIN[@]}" train-aff "${DATA[@]}" --split "$TRAIN_SPLIT" --cams "$RUN/cams" --out "$RUN/aff" \
        --backbone "$BACKBONE" --weights "$RUN/cls/last.pth" --device "$DEVICE" --seed "$SEED" \
        ${AFF_OPTS[@]+"${AFF_OPTS[@]}"}
    WALK=(--random-walk "$RUN/aff" --device "$DEVICE" ${WALK_OPTS[@]+"${WALK_OPTS[@]}"})
fi

step "refine --crf -> $RUN/pseudo"
wsss refine "${DATA[@]}" --split "$TRAIN_SPLIT" --cams "$RUN/cams" --out "$RUN/pseudo" --crf --seed "$SEED" \
    ${WALK[@]+"${WALK[@]}"} ${REFINE_EXTRA[@]+"${REFINE_EXTRA[@]}"}
wsss eval "${DATA[@]}" --split "$TRAIN_SPLIT" --pred "$RUN/pseudo"
done_with refine

# DeepLab's trunk: the classifier's (trained on these images' labels: measured +6 val mIoU on the demo
# over the pretrained trunk, bench/README.md) when it is the same ResNet, else --weights
SEG_WEIGHTS=$WEIGHTS
if [ "$SEG_INIT" = cls ] && [ "${SEG_MODEL#deeplabv3_}" = "$BACKBONE" ]; then
    SEG_WEIGHTS=$RUN/cls/last.pth
fi

UPPER=()
if [ "$UPPER_BOUND" = 1 ]; then
    GT_RUN=${UPPER_BOUND_DIR:-$RUN/seg_gt}
    step "train-seg on the ground truth (upper bound) -> $GT_RUN"
    "${TRAIN[@]}" train-seg "${DATA[@]}" --split "$TRAIN_SPLIT" --val-split "$VAL_SPLIT" --labels gt \
        --out "$GT_RUN" --model "$SEG_MODEL" --weights-backbone "$SEG_WEIGHTS" --device "$DEVICE" --seed "$SEED" \
        ${SEG_OPTS[@]+"${SEG_OPTS[@]}"} ${SEG_EXTRA[@]+"${SEG_EXTRA[@]}"}
    UPPER=(--upper-bound "$GT_RUN")
fi

step "train-seg -> $RUN/seg"
RAW_OPTS=()
if [ "$RAW" = 1 ]; then
    RAW_OPTS=(--raw)
fi
"${TRAIN[@]}" train-seg "${DATA[@]}" --split "$TRAIN_SPLIT" --val-split "$VAL_SPLIT" --labels "$RUN/pseudo" \
    ${RAW_OPTS[@]+"${RAW_OPTS[@]}"} --out "$RUN/seg" --model "$SEG_MODEL" --weights-backbone "$SEG_WEIGHTS" --device "$DEVICE" --seed "$SEED" \
    ${SEG_OPTS[@]+"${SEG_OPTS[@]}"} ${SEG_EXTRA[@]+"${SEG_EXTRA[@]}"} ${UPPER[@]+"${UPPER[@]}"}
done_with train-seg

# last.pth: train-seg's best.pth is the last checkpoint unless --select val-miou asked the val masks
step "predict -> $RUN/pred"
wsss predict "${DATA[@]}" --split "$VAL_SPLIT" --checkpoint "$RUN/seg/last.pth" --out "$RUN/pred" --device "$DEVICE" \
    ${PRED_OPTS[@]+"${PRED_OPTS[@]}"} ${PRED_EXTRA[@]+"${PRED_EXTRA[@]}"}
if [ "$DATASET" = demo ]; then
    # predictions on the CAM split too, for the report's gallery (image | CAM | pseudo | prediction | truth)
    wsss predict "${DATA[@]}" --split "$TRAIN_SPLIT" --checkpoint "$RUN/seg/last.pth" --out "$RUN/pred_$TRAIN_SPLIT" \
        --device "$DEVICE" ${PRED_OPTS[@]+"${PRED_OPTS[@]}"} ${PRED_EXTRA[@]+"${PRED_EXTRA[@]}"}
fi

step "eval -> $RUN/pred"
wsss eval "${DATA[@]}" --split "$VAL_SPLIT" --pred "$RUN/pred"

step "report -> $RUN/report.md"
wsss report "$RUN"
