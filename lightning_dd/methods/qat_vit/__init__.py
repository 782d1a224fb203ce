"""QAT-ViT: variation-aware low-bit quantization-aware training of vision transformers
(Huang et al., "Quantization Variation: A New Perspective on Training Transformers with Low-Bit
Precision", arXiv 2307.00331, TMLR 2024).

* :mod:`.quantizer`: LSQ quantizers (learnable per-tensor step, STE, both step-gradient
  conventions), quantized Linear / Conv2d.
* :mod:`.model`: the quantized ViT (what is quantized, what stays 8 bit / FP), calibration,
  the integer export ``quantized.pt`` and its reload.
* :mod:`.regularizer`: the variation-aware bin regularizer (vectorized), its cosine ramp, the
  oscillation tracker.
* :mod:`.training`: FP training and QAT with multi-crop KD from the FP teacher (Lightning).
* :mod:`.method`: :class:`QATViT`, the method (stages ``fp``, ``ptq``, ``qat``, ``all``).

Deviations from the reference code are listed in each module's docstring. The paper's teacher for
KD is a stronger network (hence its 4-bit results above FP); here the teacher is the FP model the
quantized one starts from.
"""
from lightning_dd.methods.qat_vit.method import QATViT  # noqa: F401
