"""Image dataset distillation and selection: trajectory matching (MTT, DATM), distribution matching
(DM, CLoM), statistics matching (SRe2L, CDA, G-VBSM), coresets and Dataset Quantization. Every
method here returns a :class:`lightning_dd.results.DistilledSet` judged by the image student
evaluator, and reads an :class:`lightning_dd.data.protocols.ImageData` DataModule."""
