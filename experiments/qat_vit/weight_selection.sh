#!/usr/bin/env bash
# Weight selection (arXiv 2311.18823) on CIFAR-10, 2 CPU cores (run from the repo root), recorded in
# experiments/qat_vit/README.md: the teacher is the experiment's FP ViT (192 wide, 6 blocks; trained
# on the first 300 images per class, cached); 96-wide students with the same 6 blocks train on the
# *next* 300 images per class (data.train_offset_per_class=300: no image of the teacher's) with the
# same step budget (30 epochs), initialized by weight selection from the teacher or at random, seeds 0 1 2.
set -euo pipefail
export LDD_DATA_DIR=${LDD_DATA_DIR:-../shared/data} OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
out=${OUT:-outputs/qat_vit}
common="experiment=qat_vit_cifar10 scale=cpu stage=fp logger.wandb.enabled=false trainer.enable_progress_bar=false"
python train.py $common hydra.run.dir=$out/ws_teacher           # the cached FP ViT (trained once)
teacher=$(grep -o "[^ ]*/qat_vit_fp/[0-9a-f]*/fp.pt" $out/ws_teacher/train.log | tail -1)
echo "teacher: $teacher"
for seed in ${SEEDS:-0 1 2}; do
  student="$common net.embed_dim=96 data.train_offset_per_class=300 seed=$seed method.fp_seed=$seed"
  python train.py $student method.fp_init_from=$teacher hydra.run.dir=$out/ws_selected_s$seed
  python train.py $student hydra.run.dir=$out/ws_random_s$seed
done
