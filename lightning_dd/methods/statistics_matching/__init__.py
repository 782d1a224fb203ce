"""Statistics matching: SRe2L (arXiv 2306.13092), CDA (arXiv 2311.18838) and G-VBSM (arXiv 2311.17950).

One method class, :class:`StatisticsMatching` (``conf/method/sre2l.yaml``; ``cda.yaml`` and
``gvbsm.yaml`` are configs of it), in modules by stage: :mod:`.config` (the typed ``teacher`` and
``recover`` settings), :mod:`.crops` (the one jitter/crop/flip pipeline and CDA's curriculum),
:mod:`.statistics` (BN hooks, convolution statistics, backbones, BN-loss measurements),
:mod:`.squeeze`, :mod:`.recover`, :mod:`.method` (orchestration).

SRe2L ("Squeeze, Recover and Relabel") decouples distillation into three stages:

1. **Squeeze** (SRe2L Sec. 3.1): train a BatchNorm teacher on the real data (a LightningModule,
   :class:`~.squeeze.TeacherModule`), cached under ``paths.cache_dir/teachers/<key>`` keyed by the
   data's identity and every training setting; or load ``method.teacher.ckpt``.
2. **Recover** (SRe2L Sec. 3.2, Eq. 5-7): optimize synthetic images from noise with Adam and a
   cosine lr so that the teacher classifies them as their class (cross-entropy) while the batch
   statistics at every BatchNorm layer match the layer's running statistics:
   ``R_BN(x) = sum_l ||mu_l(x) - running_mean_l||_2 + ||sigma_l^2(x) - running_var_l||_2``,
   the first layer weighted ``first_bn_multiplier`` times (the reference code's 10), total loss
   ``CE + r_bn * R_BN``. Each step sees a random jitter (roll), flip and random-resized crop of the
   images (SRe2L's "multi-crop optimization", Sec. 3.2; :func:`~.crops.jitter_crop_flip`). Images
   are recovered in batches of ``recover.batch`` (each batch mixes all classes, so that its
   statistics resemble the real data's); every batch is its own LightningModule fit
   (:class:`~.recover.RecoverModule`), checkpointed every ``recover.ckpt_every`` steps and
   resumable with ``resume=true``. Finished batches (``recover/batch_XXX.pt``) and checkpoints
   record the settings that determine the batch (:func:`~.recover.recover_settings`) and its
   per-step history; a resume refuses those of other settings (:func:`~.recover.check_settings`)
   and writes the history of every batch to ``recover_history.json``.
   * **CDA** (Sec. 3): the random-resized crop's lower scale bound follows an easy-to-hard
     curriculum, from ``crop_scale[1]`` (whole images) down to ``crop_scale[0]`` (0.08), by a
     ``cosine`` | ``linear`` | ``step`` schedule reaching its end at ``milestone`` x iterations
     (:func:`~.crops.crop_scale_min`).
   * **G-VBSM** (Sec. 3): several backbones (``teacher.nets``); each step samples
     ``backbones_per_iter`` of them and takes the *mean* of their losses (every term: CE, BN, conv,
     logit; :meth:`~.recover.RecoverModule.losses`). G-VBSM sums them; with a fixed number of sampled
     backbones the mean is the sum times a constant ``1 / backbones_per_iter``, which Adam's
     update (gradient over its running RMS) does not see except through ``eps``, so the two
     recover the same images; the recorded numbers used the mean. Besides BN statistics it matches
     convolution statistics (per-channel mean/var of every conv output, precomputed once on the
     real data, :func:`~.statistics.conv_statistics`; weight ``r_conv``) and the real data's
     per-class mean logits (``r_logit``, MSE), a simplified form of its soft-label/logit matching.
     The BN/conv losses of the backbones enter that mean as they are (``backbone_norm=none``) or
     rescaled to the first backbone's scale on the initial batch (``start``,
     :func:`~.statistics.backbone_weights`); a net's own ``epochs`` key overrides
     ``teacher.epochs``. ``metrics.json`` gets every backbone's BN loss start -> end
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
device (``trainer.accelerator``, :func:`~.squeeze.run_device`); every Lightning fit (squeeze,
each recover batch) is built by the run's Trainer factory (``ctx.trainer("squeeze" | "recover",
...)``), so ``trainer.precision`` / ``devices`` / ``strategy`` reach it.

Deviations from the reference code (SRe2L's ``recover_cifar.py`` / ImageNet recovery, CDA's
``recover_cda_in1k.py``, G-VBSM's recovery), kept on purpose and documented here:

* **Jitter**: the roll offsets are drawn from ``U{-j, ..., j}`` per axis; the reference code draws
  ``random.randint(0, j)``, i.e. ``U{0, ..., j}`` (a circular roll, so the two differ only in the
  range of offsets: ``2j + 1`` instead of ``j + 1`` values). The roll is applied before the crop
  here; CDA's code crops first and rolls the crop.
* **Crops and flips per image**: every image of a batch gets its own random-resized crop and flip
  (:func:`~.crops.sample_crops`); the reference code applies torchvision's ``RandomResizedCrop``
  and ``RandomHorizontalFlip`` to the whole batch tensor, i.e. one crop box and one flip per step
  for all images.
* **First-layer multiplier on conv statistics**: ``first_bn_multiplier`` weights the first BN
  layer's term (as SRe2L) and, in G-VBSM's conv loss, also the first conv layer's term
  (:meth:`~.statistics.StatsHooks.loss`); SRe2L has no conv term, and G-VBSM's code applies its
  first-layer multiplier once, to the first layer of its combined list of BN and conv hooks.
* **Relabel on the fly, no FKD store** (see 3. above): the student sees the teacher's targets on
  its own augmented views instead of stored crops.

Images live in model space (the DataModule's normalization), clipped to the valid pixel range
after every step. The BN-statistics loss before and after recovery (``recover/loss_bn_start``,
``recover/loss_bn_end`` in ``metrics.json``) is measured on the same fixed augmented views
(:func:`~.statistics.bn_loss_views`), i.e. on the objective recovery minimizes; the loss of the
whole, un-augmented images is reported beside it (``recover/loss_bn_whole_images_*``).
"""
from lightning_dd.methods.statistics_matching.config import RecoverConfig, TeacherConfig
from lightning_dd.methods.statistics_matching.crops import (batch_crop_flip, crop_resize, crop_scale_min,
                                                            jitter_crop_flip, sample_crops)
from lightning_dd.methods.statistics_matching.method import StatisticsMatching, recover_metrics
from lightning_dd.methods.statistics_matching.recover import (RecoverModule, check_settings, pixel_bounds,
                                                              recover_batch, recover_batches, recover_settings)
from lightning_dd.methods.statistics_matching.squeeze import (TeacherModule, accuracy, load_teacher_file,
                                                              load_teachers, run_device, squeeze)
from lightning_dd.methods.statistics_matching.statistics import (Backbone, StatsHooks, backbone_weights, bn_loss_of,
                                                                 bn_loss_views, channel_stats, conv_input_stats,
                                                                 conv_statistics, eigenvalue_loss, patch_stats,
                                                                 real_statistics)

__all__ = ["Backbone", "RecoverConfig", "RecoverModule", "StatisticsMatching", "StatsHooks", "TeacherConfig",
           "TeacherModule", "accuracy", "backbone_weights", "batch_crop_flip", "bn_loss_of", "bn_loss_views",
           "channel_stats", "check_settings", "conv_input_stats", "conv_statistics", "eigenvalue_loss", "patch_stats", "crop_resize", "crop_scale_min", "jitter_crop_flip",
           "load_teacher_file", "load_teachers", "pixel_bounds", "real_statistics", "recover_batch",
           "recover_batches", "recover_metrics", "recover_settings", "run_device", "sample_crops", "squeeze"]
