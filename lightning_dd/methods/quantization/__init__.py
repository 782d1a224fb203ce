"""Low-bit quantization of vision transformers (variation-aware QAT, arXiv 2307.00331) and weight
selection as a student initialization (arXiv 2311.18823)."""
