"""The bottom layer every other package may import: typed-config helpers (:mod:`.config`) and the
Trainer factory (:mod:`.trainer`). It imports nothing else of lightning_dd."""
