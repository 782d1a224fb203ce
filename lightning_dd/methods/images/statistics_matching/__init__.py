"""Statistics matching: SRe2L (arXiv 2306.13092), CDA (arXiv 2311.18838) and G-VBSM (arXiv 2311.17950).

One method class, :class:`StatisticsMatching` (``conf/method/sre2l.yaml``; ``cda.yaml`` and
``gvbsm.yaml`` are configs of it), in modules by stage: :mod:`.config` (the typed ``teacher`` and
``recover`` settings), :mod:`.crops` (the one jitter/crop/flip pipeline and CDA's curriculum),
:mod:`.statistics` (BN hooks, convolution statistics, backbones, BN-loss measurements),
:mod:`.squeeze`, :mod:`.recover`, :mod:`.method` (orchestration).

SRe2L ("Squeeze, Recover and Relabel") decouples distillation into three stages:

1. **Squeeze** (SRe2L Sec. 3.1): train a BatchNorm teacher on the real data (a LightningModule,
   :func:`~.squeeze.teacher_module`, the shared
   :class:`~lightning_dd.training.supervised.SupervisedModule`), cached under ``paths.cache_dir/teachers/<key>`` keyed by the
   data's identity and every training setting; or load ``method.teacher.ckpt``.
2. **Recover** (SRe2L Sec. 3.2, Eq. 5-7): optimize synthetic images from noise with Adam (betas
   0.5, 0.9) and a cosine lr (SRe2L's ``lr_cosine_policy``) so that the teacher classifies them as
   their class (cross-entropy) while the batch statistics at every BatchNorm layer match the
   layer's running statistics:
   ``R_BN(x) = sum_l ||mu_l(x) - running_mean_l||_2 + ||sigma_l^2(x) - running_var_l||_2``,
   the first layer weighted ``first_bn_multiplier`` times (the reference code's 10), total loss
   ``CE + r_bn * R_BN``. Each step sees an augmented view, in the reference code's order: one
   random-resized crop and one flip for the whole batch (torchvision's transforms on the batch
   tensor, :func:`~.crops.batch_crop_flip`), then a circular roll by ``U{0, ..., jitter}`` pixels
   per axis (SRe2L's "multi-crop optimization", Sec. 3.2; :func:`~.crops.jitter_crop_flip`).
   SRe2L's CIFAR recovery (``recover_cifar.py``) rolls only (``crop_scale [1, 1]``, no flip).
   Images are recovered in batches of ``recover.batch`` (each batch mixes all classes, so that
   its statistics resemble the real data's); every batch is its own LightningModule fit
   (:class:`~.recover.RecoverModule`), checkpointed every ``recover.ckpt_every`` steps and
   resumable with ``resume=true``. Finished batches (``recover/batch_XXX.pt``) and checkpoints
   record the settings that determine the batch (:func:`~.recover.recover_settings`) and its
   per-step history; a resume refuses those of other settings (:func:`~.recover.check_settings`)
   and writes the history of every batch to ``recover_history.json``.
   * **CDA** (Sec. 3): the random-resized crop's lower scale bound follows an easy-to-hard
     curriculum, from ``crop_scale[1]`` (whole images) down to ``crop_scale[0]`` (0.08), by a
     ``cosine`` | ``linear`` | ``step`` schedule reaching its end at ``milestone`` x iterations
     (:func:`~.crops.crop_scale_min`, CDA's ``recover_cda_in1k.py``).
   * **G-VBSM** (Sec. 3; its CIFAR-10 recovery ``data_synthesis_with_svd_with_db_with_all_statistic.py``):
     several backbones (``teacher.nets``), ``backbones_per_iter`` of them per step, in turn
     (``backbone_sampling=cycle``, G-VBSM's ``counter % n``) or at random; every term (CE, BN,
     conv, logit) is the *mean* over the step's backbones (G-VBSM uses one per step, so the mean
     is its value; with more, the mean is the sum times ``1 / backbones_per_iter``, a constant
     Adam's update does not see except through ``eps``). Besides BN statistics it matches
     convolution statistics: per conv layer the *input*'s channel mean/variance and its 4x4-patch
     mean/variance (:func:`~.statistics.conv_input_stats`), against their averages over batches
     of 64 real images (:func:`~.statistics.conv_statistics`), weight ``r_conv`` (G-VBSM's
     ``--r-loss`` weighs BN and conv alike), the first-layer multiplier once, on the first hooked
     layer (:meth:`~.statistics.Backbone.stat_losses`); the matched statistics are moving averages
     (``stat_momentum``, its ``--training-momentum`` 0.8, starting at 0) with the gradient of the
     current ones; each conv layer's term is dropped with probability ``conv_drop`` (its
     ``--drop-rate`` 0.4) per step; and its eigenvalue term ``r_nuc`` (``--nuc-norm``,
     :func:`~.statistics.eigenvalue_loss`). The augmentation is a pad-4 random crop + flip per
     batch (``crop_pad``) and the roll. ``r_logit`` (the real data's per-class mean logits, MSE)
     is an addition of ours, off by default. The BN/conv losses of the backbones enter that mean
     as they are (``backbone_norm=none``) or rescaled to the first backbone's scale on the initial
     batch (``start``, :func:`~.statistics.backbone_weights`); a net's own ``epochs`` key
     overrides ``teacher.epochs``. ``metrics.json`` gets every backbone's BN loss start -> end
     (``recover/<i>_<name>/loss_bn_*``).
3. **Relabel** (SRe2L Sec. 3.3, FKD arXiv 2112.01528): done on the fly by the framework's student
   evaluator: the teacher's logits on each augmented training batch (``eval.label_mode=teacher``),
   with the teacher this method returns (``MethodOutput.extras["teacher_ckpt"]``). FKD's stored
   form (per epoch and image one crop + flip and the teacher's top-k probabilities, written once
   and replayed by the student) is not implemented: the evaluator
   (:mod:`lightning_dd.evaluate`) draws its own augmentations (DSA, crop/flip) per batch and has
   no hook to replay stored crops, so a store would be written and read by nothing (an earlier
   version wrote ``fkd_labels.pt`` that way). Relabelling on the fly gives the student the
   teacher's targets on exactly the views it trains on, at the cost of one teacher forward per
   student step; FKD stores them to save that cost at ImageNet scale, not for other targets.

The teachers, their statistics passes and test accuracy and the soft labels run on the run's
device (``trainer.accelerator``, :func:`~lightning_dd.training.devices.run_device`); every Lightning
fit (squeeze, each recover batch) is built by the run's Trainer factory (``ctx.make_trainer("squeeze" |
"recover", ...)``), so ``trainer.precision`` / ``devices`` / ``strategy`` reach it.

Deviations from the reference code (SRe2L's ``recover_cifar.py`` / ``recover/data_synthesis.py``,
CDA's ``recover_cda_in1k.py``, G-VBSM's CIFAR-10 recovery), checked against it by
``tests/parity/test_parity_statistics_matching.py``:

* **Options of ours, off by default**: ``crop_per_image`` (every image its own random-resized crop
  and flip, :func:`lightning_dd.augment.crops.sample_crops`; the reference: one box and one flip for the batch);
  ``r_logit``; ``backbone_norm=start``; ``backbones_per_iter > 1`` with ``backbone_sampling=random``
  (the G-VBSM CPU preset uses the last two, with the measurement in ``experiments/sre2l/README.md``).
  The CIFAR-10 CPU presets set ``crop_per_image=true``: at 32 px, 500 steps, one batch of 100,
  SRe2L gave 32.52 ± 0.86 % with a box per image vs 28.77 ± 0.27 % with one per batch (same
  teacher, ``experiments/sre2l/README.md``).
* **Backbone sampling counter**: ``cycle`` restarts at backbone 0 with every batch; G-VBSM's
  counter runs on across batches (the same when ``iterations`` is a multiple of the number of
  backbones, as its 4000 and 5 are).
* **G-VBSM's moving averages** start at 0 with every batch and advance only in recovery's loss;
  G-VBSM's hooks keep them across batches and also advance them on every other forward pass of
  the backbone (its real-data statistics pass when the statistics are not yet saved, and the
  verifier display, which is the last backbone). Under DDP a resumed round restores every rank's
  averages from rank 0's checkpoint (exact with one process).
* **G-VBSM's real-data statistics** are taken on the un-augmented training images; G-VBSM's loader
  applies its pad-4 crop and flip while it accumulates them.
* **Squeeze lr schedule**: cosine over the optimizer steps; SRe2L's ``squeeze_cifar.py`` steps its
  cosine per epoch, G-VBSM's ``squeeze/train.py`` keeps the lr constant (and trains an EMA copy
  it does not use). The references' ImageNet teachers are torchvision's pretrained ResNet-18
  (``method.teacher.ckpt``); MobileNetV2 / ShuffleNetV2 here are torchvision's, not G-VBSM's
  CIFAR variants.
* **Normalization**: the data's own mean/std (clip range and noise scale); G-VBSM's CIFAR-10 code
  clips with CIFAR-100's mean/std.
* **Conv-drop and roll randomness**: drawn from per-step ``torch.Generator`` streams (resumable)
  instead of Python's ``random``; the batch crop/flip from torchvision under a seed drawn from that
  stream (:func:`~.crops.batch_crop_flip`).
* **Relabel on the fly, no FKD store** (see 3. above): the student sees the teacher's targets on
  its own augmented views instead of stored crops; G-VBSM's relabel averages the logits of its
  backbones, here the first backbone is the teacher.

Images live in model space (the DataModule's normalization), clipped to the valid pixel range
after every step. The BN-statistics loss before and after recovery (``recover/loss_bn_start``,
``recover/loss_bn_end`` in ``metrics.json``) is measured on the same fixed augmented views
(:func:`~.statistics.bn_loss_views`), i.e. on the objective recovery minimizes; the loss of the
whole, un-augmented images is reported beside it (``recover/loss_bn_whole_images_*``).
"""
from lightning_dd.methods.images.statistics_matching.config import RecoverConfig, TeacherConfig
from lightning_dd.methods.images.statistics_matching.crops import batch_crop_flip, crop_scale_min, jitter_crop_flip
from lightning_dd.methods.images.statistics_matching.method import StatisticsMatching, recover_metrics
from lightning_dd.methods.images.statistics_matching.recover import (RecoverModule, check_settings, pixel_bounds,
                                                                     recover_batch, recover_batches, recover_settings)
from lightning_dd.methods.images.statistics_matching.squeeze import (load_teacher_file, load_teachers, squeeze,
                                                                     teacher_module)
from lightning_dd.methods.images.statistics_matching.statistics import (Backbone, StatsHooks, backbone_weights,
                                                                        bn_loss_of, bn_loss_views, channel_stats,
                                                                        conv_input_stats, conv_statistics,
                                                                        eigenvalue_loss, patch_stats, real_statistics)

__all__ = ["Backbone", "RecoverConfig", "RecoverModule", "StatisticsMatching", "StatsHooks", "TeacherConfig",
           "backbone_weights", "batch_crop_flip", "bn_loss_of", "bn_loss_views", "channel_stats", "check_settings",
           "conv_input_stats", "conv_statistics", "crop_scale_min", "eigenvalue_loss", "jitter_crop_flip",
           "load_teacher_file", "load_teachers", "patch_stats", "pixel_bounds", "real_statistics", "recover_batch",
           "recover_batches", "recover_metrics", "recover_settings", "squeeze", "teacher_module"]
