"""Point-cloud video methods (issue 15) on the P4Transformer backbone: MaST-Pre pretraining
(:mod:`.mast_pre`), fine-tuning / linear probing (:mod:`.finetune`) and the 20-joint skeleton
reference classifier (:mod:`.skeleton`). Data: :mod:`lightning_dd.data.point_video`."""
