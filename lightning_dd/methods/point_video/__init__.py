"""Point-cloud video methods on the P4Transformer backbone (Fan et al., CVPR 2021): self-supervised
pretraining (:mod:`.pretraining`: MaST-Pre, :mod:`.mast_pre`, ICCV 2023, arXiv 2308.09245; the
PointCPSC-style contrast, :mod:`.point_contrast`, ICCV 2023, arXiv 2308.09247), fine-tuning /
linear probing (:mod:`.finetune`) and the 20-joint skeleton reference classifier (:mod:`.skeleton`).
Shared parts: :mod:`.common`. Data: :class:`lightning_dd.data.protocols.PointVideoData`
(:mod:`lightning_dd.data.point_video`)."""
