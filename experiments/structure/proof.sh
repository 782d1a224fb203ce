#!/usr/bin/env bash
# Issue 27's no-result-change proof: the seven runs, at reduced size, one torch thread, fresh caches.
# Usage: experiments/structure/proof.sh OUT_DIR   (run from a checkout's root; LDD_DATA_DIR must point
# at the shared data). Each run's metrics.json lands in OUT_DIR/<name>/; compare two OUT_DIRs with
# experiments/structure/compare_proof.py.
set -u
out=$(realpath -m "$1"); mkdir -p "$out"
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 WANDB_MODE=offline
small_img="data.train_per_class=100 eval.epochs=40 eval.num_eval=2 trainer.compile=false trainer.enable_progress_bar=false"
run() {  # name, overrides...
  local name=$1; shift
  export LDD_CACHE_DIR="$out/$name/cache"
  local t0=$(date +%s)
  python train.py "$@" hydra.run.dir="$out/$name" > "$out/$name.log" 2>&1
  echo "$name rc=$? $(( $(date +%s) - t0 )) s" | tee -a "$out/summary.txt"
}
run default trainer.enable_progress_bar=false
run datm_cifar10 experiment=datm_cifar10 scale=cpu $small_img method.iterations=20 method.num_experts=1 \
    logger.eval_every=10 logger.eval_epochs=20 logger.image_every=10
run dm_cifar10 experiment=dm_cifar10 scale=cpu $small_img method.iterations=20 method.ckpt_every=10
run cda_cifar10 experiment=cda_cifar10 scale=cpu $small_img method.teacher.epochs=2 method.recover.iterations=20 \
    method.recover.ckpt_every=10
run gcond_cora experiment=gcond_cora scale=cpu method.epochs=20 eval.epochs=60 eval.num_eval=2
run sgdd_cora experiment=sgdd_cora scale=cpu method.epochs=20 method.warmup_epochs=40 eval.epochs=60 eval.num_eval=2
run qat_vit_cifar10 experiment=qat_vit_cifar10 scale=cpu data.train_per_class=20 method.fp_epochs=2 \
    method.fp_warmup_epochs=1 method.epochs=2 method.calib_images=32 method.eval_per_class=20 \
    trainer.enable_progress_bar=false
