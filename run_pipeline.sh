#!/usr/bin/env bash
# Run every wsss stage end to end: `wsss pipeline` with a recipe (default: the built-in demo, which
# generates its data under ./work/demo). Run it again and it resumes: every stage skips finished work.
#
#   ./run_pipeline.sh                                   # the demo recipe
#   WSSS_RECIPE=voc ./run_pipeline.sh --root VOCdevkit/VOC2012
#   ./run_pipeline.sh --set train-cls.epochs=3 --stop-after refine
#
# Every option is `wsss pipeline`'s (see `wsss pipeline --help`; recipes: `wsss pipeline --list`).
set -euo pipefail
exec wsss pipeline "${WSSS_RECIPE:-demo}" "$@"
