"""QAT-ViT: variation-aware low-bit quantization-aware training of vision transformers
(Huang et al., "Quantization Variation: A New Perspective on Training Transformers with Low-Bit
Precision", arXiv 2307.00331, TMLR 2024).

* :mod:`.quantizer`: LSQ quantizers (learnable per-tensor step, STE, both step-gradient
  conventions), quantized Linear / Conv2d.
* :mod:`.model`: the quantized ViT (what is quantized, what stays 8 bit / FP), calibration,
  the integer export ``quantized.pt`` and its reload.
* :mod:`.regularizer`: the variation-aware bin regularizer (vectorized), its cosine ramp, the
  oscillation tracker.
* :mod:`.training`: FP training (the shared
  :class:`~lightning_dd.training.supervised.SupervisedModule`) and QAT with multi-crop KD from the FP teacher (Lightning).
* :mod:`.method`: :class:`QATViT`, the method (stages ``fp``, ``ptq``, ``qat``, ``all``).

Reference code: github.com/HuangOwen/Quantization-Variation (``train_VVTQ.py``,
``quantization/lsq_layer.py``, ``DeiT_quant.py``, ``Swin_quant.py``, ``util_loss.py``); the LSQ
quantizers, the bin regularizer, its weight schedule and the oscillation count equal it on fixed
inputs (``tests/parity/test_parity_qat_vit.py``), and the paper configs train as long
(``tests/test_qat_vit.py``). Behaviour as the reference (each was different here before):

* training length: a ``num_crops``-view pass counts as ``num_crops`` epochs, the last epochs train
  single-crop, LR per pass (timm cosine) (was ``epochs`` passes of ``num_crops`` views each: 4x);
* ImageNet views: one random-resized crop of the original image per view (was a crop of a crop);
* regularizer: weight units, unbiased per-bin variance, the step gets the term's gradient (was
  integer units, population variance, step detached);
* activation quantizers: step gradient ``1/(sqrt(numel) Qp)``, offset gradient unscaled, init
  ``2 mean|x| / sqrt(2^(b-1)-1)`` with offset 0, clamp before round; one input quantizer shared by
  q, k and v; Swin's patch-merging input in FP; weight steps by the single-start MSE fit;
  64 calibration images.

Deviations kept (reasons):

* KD teacher: the paper's is a stronger network whose soft labels FKD stores on disk (hence its
  4-bit results above FP); here the teacher is the FP model the quantized one starts from, and it
  labels each view on the fly.
* Calibration images: the reference calibrates the activation steps on the first 64 validation
  images; here on 64 training images (no test image is fitted).
* A weight's bin in the regularizer is its integer code (the reference compares ``w_q / s`` with
  each level in floating point, :mod:`.regularizer`).
"""
from lightning_dd.methods.quantization.qat_vit.method import QATViT  # noqa: F401
