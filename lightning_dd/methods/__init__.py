"""Methods, one module (or small package) per paper, grouped by family. Each is a class built from
its config node's ``_target_`` (:mod:`lightning_dd.methods.base` is the contract); nothing here
lists them."""
