#!/usr/bin/env bash
# The CPU runs recorded in experiments/point_video/README.md (2 shared cores; run from the repo root):
# MaST-Pre and point-level contrastive pretraining (+ linear probes pretrained vs random), then
# fine-tuning with 20% of the training labels from each pretrained encoder and from scratch, seeds 0 1 2.
set -euo pipefail
export LDD_DATA_DIR=${LDD_DATA_DIR:-../shared/data} OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
out=${OUT:-outputs/point_video}
common="logger.wandb.enabled=false trainer.enable_progress_bar=false"
if [ -z "${SKIP_PRETRAIN:-}" ]; then   # SKIP_PRETRAIN=1: reuse $out/{mast_pre,point_contrast}_cpu/encoder.pt
  python train.py experiment=skeleton_msr scale=cpu $common hydra.run.dir=$out/skeleton_msr_s0
  python train.py experiment=mast_pre_msr scale=cpu $common hydra.run.dir=$out/mast_pre_cpu
  python train.py experiment=point_contrast_msr scale=cpu $common hydra.run.dir=$out/point_contrast_cpu
fi
for seed in ${SEEDS:-0 1 2}; do
  python train.py experiment=msr_finetune scale=cpu seed=$seed method.label_fraction=0.2 \
    method.pretrained=$out/mast_pre_cpu/encoder.pt $common hydra.run.dir=$out/ft20_pretrained_s$seed
  python train.py experiment=msr_finetune scale=cpu seed=$seed method.label_fraction=0.2 \
    method.pretrained=$out/point_contrast_cpu/encoder.pt $common hydra.run.dir=$out/ft20_contrast_s$seed
  python train.py experiment=msr_finetune scale=cpu seed=$seed method.label_fraction=0.2 \
    $common hydra.run.dir=$out/ft20_scratch_s$seed
done
