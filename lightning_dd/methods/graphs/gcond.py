"""GCond: graph condensation by gradient matching (Jin et al., ICLR 2022, arXiv 2110.07580),
transductive setting, and the gradient-matching loop that SGDD (arXiv 2310.09192) reuses.

Learn ``N'`` synthetic nodes ``X'`` (initialized from random real training nodes of each class)
and a structure generator ``A' = g(X')`` (PGE, Sec. 3.3: an MLP on node pairs, symmetrized,
sigmoid, no self loops). Each epoch (Alg. 1):

1. re-initialize the condensation model ``theta``;
2. ``outer_loop`` times: for every class ``c``, match the gradient of the model's loss on the
   real training nodes of ``c`` (on the real graph) with the gradient on the synthetic nodes of
   ``c`` (on ``(X', A')``) -- Eq. 6, GCond's distance: one minus the cosine per output unit,
   summed, classes weighted by their synthetic size; the matching loss updates ``A'``'s generator
   during the first ``adj_epochs`` of every ``adj_epochs + feat_epochs`` epochs and ``X'``
   otherwise (alternating optimization, Sec. 3.4, 10 / 40 in the code); then ``theta`` takes
   ``inner_loop`` Adam steps on the synthetic graph.

The condensation model is the one GCond's code uses for Cora/CiteSeer (``--sgc=1``): a 2-step
SGC ``out = A_hat^2 X W + b`` (``A_hat = D^-1/2 (A + I) D^-1/2``). Evaluation trains ordinary
GNNs (GCN, ...) on the result (:mod:`lightning_dd.evaluate.graph`).

Speed (ours, exact, not in the paper): the model is linear in ``W``, so the per-class gradient
of the mean cross-entropy is closed-form, ``dL_c/dW = H_c^T (softmax(H_c W + b) - Y_c) / n_c``
with ``H = A_hat^2 X``. On the real graph ``H`` of the training nodes is computed once with two
sparse products (no neighbour sampling: exact, unlike GCond's sampler); all classes' gradients
are one matrix product. On the synthetic side the same formula is differentiated by autograd
through ``H' = A'_hat^2 X'`` -- no double backward. One Cora epoch (20 outer x 15 inner) takes
well under a second on 2 CPU cores (``benchmarks/graph_condensation_epoch.py``).

Reduction rate follows GCond: ``N' = rate x`` (number of labeled training nodes) in the
transductive setting (Cora, rate 0.5 -> 70 nodes = 2.6% of the 2,708 nodes).

Settings (``method.setting``, GCond Sec. 3): ``transductive`` -- the real-graph gradients see the
whole graph (all nodes' features and edges, labels of the training nodes); ``inductive`` (GCond's
Flickr/Reddit setting) -- condensation sees only the training subgraph (the training nodes and
the edges among them, :func:`training_view`); evaluation is the same in both: a GNN trained on the
condensed graph, tested on the test nodes of the full graph. ``N' = rate x`` training nodes in
both (GCond's code).

Checkpoints (Lightning's, :func:`lightning_dd.methods.graphs.graph_run.fit_condenser`): one Lightning
epoch is one condensation epoch; ``ModelCheckpoint(dirpath=<run>/checkpoints, save_last=True,
every_n_epochs=ckpt_every)`` writes the module (synthetic features, structure generator, SGDD's
transport plan), both optimizers' states and the loop's epoch counter; :meth:`on_save_checkpoint`
adds the torch RNG state after the last epoch, the loss history and the skipped-update count; a
run resumed with ``trainer.fit(..., ckpt_path=...)`` continues at the stored epoch with the same
RNG stream, so (one torch thread) it ends with the same condensed graph as an uninterrupted run.

Several processes (``trainer.devices=2 trainer.strategy=ddp``; gloo on CPU, NCCL on GPUs): the
matching loss is a sum over classes, so rank ``r`` of ``W`` takes classes ``r, r + W, ...``
(:meth:`GradientMatchingCondenser.class_shard`): their real-side gradients (only their training
nodes' rows of ``H``: the part that grows with the real graph is split) and their synthetic-side
terms. Everything else is the same on every rank, from the same RNG stream (the module restores the
state it was built with when the fit starts, since DDP re-seeds): ``A' = g(X')`` and ``A'_hat^2 X'``,
the model re-initialization, the inner loop on the synthetic graph, SGDD's structure warm-up. The
structure terms (smoothness, SGDD's OT) enter rank 0's loss only. Each rank backpropagates its part
with DDP's reducer blocked, one ``all_reduce`` (sum) gives every rank the one-process gradient of
``X'`` or of the generator (and SGDD's plan), and every rank takes the same Adam step
(:meth:`GradientMatchingCondenser.all_reduce_step`): 2 processes end with the one-process condensed
graph up to summation order (tested: 1e-15 in float64). One process runs the unsplit code, number for
number as before. The split saves the real-side cost (large graphs); the synthetic side (generator,
propagation, backward through them) is computed by every rank.

Parity with the reference code (GCond's ``gcond_agent_transduct.py``, ``utils.match_loss``,
``models/parametrized_adj.py``, ``models/sgc.py``): ``tests/parity/test_parity_gcond.py`` feeds the
same graph, synthetic features and weights to both -- the distance, PGE's adjacency, the SGC's
initialization, one outer step's loss and gradients, and 11 epochs of the loop agree to float32
precision.

Deviations from the reference code, and what was fixed:

* kept -- the real side is exact: ``A_hat^2 X`` of the training nodes on the whole graph. GCond's
  code samples ``[10, 5]`` neighbours per hop (``retrieve_class_sampler`` with
  ``NeighborSampler``, values of the full normalized adjacency, not renormalized) -- an unbiased
  but noisy estimate of the same gradient; with fan-outs above the largest degree the two are
  equal (that is how the parity fixture runs the reference). Cora's mean degree is 3.9, so
  the first hop (fan-out 10) is mostly complete there; the second (fan-out 5) is sampled more often.
* kept, no change in numbers -- closed-form per-class gradients; the generator's first layer split
  as ``W_i x_i + W_j x_j``; only the side being updated gets gradients (the reference
  backpropagates into both and steps one).
* fixed (2026-12-07) -- the SGC's initialization: uniform in ``+-1/sqrt(K)`` (the output width) ->
  ``+-1/sqrt(F)``, the fan-in, as GCond's ``GraphConvolution`` (``1 / sqrt(weight.T.size(1))``);
  on Cora (F = 1433, K = 7) the old bound was 14x too wide.
* fixed (2026-12-07) -- ``A'`` for the inner loop and for the condensed graph: the generator in
  eval mode (running batch-norm statistics) -> train mode, batch statistics
  (``method.inference_bn: batch``), as GCond's ``PGE.inference`` (whose ``self.eval()`` is
  commented out). SGDD's ``GraphonLearner.inference`` does switch to eval mode, so SGDD keeps
  ``running``.
* epochs: the reference loops ``range(args.epochs + 1)``; ``method.epochs`` counts the epochs run,
  so the authors' ``--epoch=600`` is ``method.epochs: 601`` (its last epoch, 600, updates the
  structure).
"""
from __future__ import annotations

import math
from types import SimpleNamespace
from typing import ClassVar

import lightning as L
import torch
import torch.nn as nn
import torch.nn.functional as F
from pydantic import Field

from lightning_dd.core.config import ConfigError, NonNegFloat, PositiveInt
from lightning_dd.data.graph_ops import (gcn_norm_dense, label_smoothness, propagate_sparse, synthetic_labels,
                                            training_view)
from lightning_dd.methods.graphs.graph_run import CondensationMethod
from lightning_dd.results import CondensedGraph


def class_gradients(h: torch.Tensor, w: torch.Tensor, b: torch.Tensor, onehot: torch.Tensor,
                    class_w: torch.Tensor) -> torch.Tensor:
    """Per-class gradients of the SGC loss w.r.t. ``W``, closed form.

    Args:
        h: ``(n, F)`` propagated features ``A_hat^K X``; w: ``(F, K)``; b: ``(K,)``;
        onehot: ``(n, K)`` labels; class_w: ``(n, C)``, ``[y_i = c] / n_c`` (mean over class ``c``).

    Returns:
        ``(C, F, K)``: ``dL_c/dW = h^T diag(class_w[:, c]) (softmax(h W + b) - onehot)``.
    """
    r = torch.softmax(h @ w + b, 1) - onehot                   # (n, K)
    per = (class_w[:, :, None] * r[:, None, :]).flatten(1)     # (n, C*K)
    g = h.T @ per                                              # (F, C*K)
    return g.view(h.shape[1], class_w.shape[1], -1).permute(1, 0, 2)


def match_distance(gs: torch.Tensor, gr: torch.Tensor, coeff: torch.Tensor) -> torch.Tensor:
    """GCond's gradient distance (Eq. 6, ``dis_metric='ours'``): for each class ``c`` and output
    unit ``k``, ``1 - cos(gs[c, :, k], gr[c, :, k])``; summed over ``k``, weighted by ``coeff (C,)``.

    ``gs``, ``gr``: ``(C, F, K)``. Bias gradients are ignored, as in GCond (distance 0)."""
    cos = (gs * gr).sum(1) / (gs.norm(dim=1) * gr.norm(dim=1) + 1e-6)    # (C, K)
    return ((1 - cos).sum(1) * coeff).sum()


class PGE(nn.Module):
    """GCond's parametrized graph generator (Sec. 3.3): ``A'_ij = sigmoid((f([x_i; x_j]) +
    f([x_j; x_i])) / 2)``, zero diagonal; ``f``: ``nlayers`` linear layers ``hidden`` wide with
    batch norm + ReLU between them.

    The first layer on the concatenation is ``W_i x_i + W_j x_j`` for all pairs at once (no
    ``(N'^2, 2F)`` tensor). Shapes: ``x (N', F) -> (N', N')`` symmetric, in ``(0, 1)``, zero diagonal.
    """

    def __init__(self, in_dim: int, hidden: int = 128, nlayers: int = 3):
        super().__init__()
        if nlayers < 2:
            raise ValueError(f"PGE needs at least 2 layers, got {nlayers}")
        self.first_i = nn.Linear(in_dim, hidden)
        self.first_j = nn.Linear(in_dim, hidden, bias=False)
        self.bns = nn.ModuleList([nn.BatchNorm1d(hidden) for _ in range(nlayers - 1)])
        self.mids = nn.ModuleList([nn.Linear(hidden, hidden) for _ in range(nlayers - 2)])
        self.out = nn.Linear(hidden, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n = x.shape[0]
        h = (self.first_i(x)[:, None, :] + self.first_j(x)[None, :, :]).reshape(n * n, -1)
        h = F.relu(self.bns[0](h))
        for lin, bn in zip(self.mids, self.bns[1:]):
            h = F.relu(bn(lin(h)))
        logits = self.out(h).view(n, n)
        adj = torch.sigmoid((logits + logits.T) / 2)
        return adj * (1 - torch.eye(n, dtype=adj.dtype, device=adj.device))


class GradientMatchingCondenser(L.LightningModule):
    """The GCond loop (Alg. 1), manual optimization; one training step = one Lightning epoch = one
    condensation epoch. Subclasses set the structure generator (:meth:`build_generator`) and may
    add structure losses (:meth:`structure_loss`).

    Args:
        data: the real graph (``torch_geometric`` ``Data`` with ``x (N, F)``, ``y (N,)``,
            ``edge_index (2, E)``, ``train_mask (N,)``).
        hp: the typed method (:class:`lightning_dd.methods.graphs.graph_run.CondensationMethod`):
            reduction_rate, outer_loop, inner_loop, lr_feat, lr_adj, lr_model, adj_epochs,
            feat_epochs, nlayers, setting, + the generator's fields.
        seed: RNG seed of the initialization (synthetic features, generator).

    Raises:
        ValueError: a reduction rate that leaves no nodes.
    """

    method = "gradient_matching"

    def __init__(self, data, hp, seed: int = 0):
        super().__init__()
        self.automatic_optimization = False
        self.hp = hp
        g = torch.Generator().manual_seed(seed)
        self.setting = hp.setting
        x_real, ei_real, n_real, train = training_view(data, self.setting)
        y_train = data.y[data.train_mask.nonzero().squeeze(1)]
        k = int(data.y.max()) + 1
        self.num_classes = k
        y_syn = synthetic_labels(y_train, k, hp.reduction_rate)
        n_syn = torch.bincount(y_syn, minlength=k)
        init = []
        for c in range(k):  # random real training nodes of each class (GCond's get_sub_adj_feat)
            idx = train[y_train == c]
            init.append(idx[torch.randperm(len(idx), generator=g)[: int(n_syn[c])]])
        self.init_index = torch.cat(init)         # into x_real's rows
        torch.manual_seed(seed)
        self.feat = nn.Parameter(x_real[self.init_index].clone())
        self.register_buffer("y_syn", y_syn)
        # real side, once: H = A_hat^K X of the training nodes (exact receptive field) on the graph
        # condensation may see (the whole graph, or the training subgraph when inductive)
        h_real = propagate_sparse(ei_real, n_real, x_real, hp.nlayers)[train]
        self.register_buffer("h_real", h_real)
        self.register_buffer("onehot_real", F.one_hot(y_train, k).float())
        self.register_buffer("cw_real", F.one_hot(y_train, k).float() / torch.bincount(y_train, minlength=k).clamp(min=1))
        self.register_buffer("onehot_syn", F.one_hot(y_syn, k).float())
        self.register_buffer("cw_syn", F.one_hot(y_syn, k).float() / n_syn.clamp(min=1))
        self.register_buffer("coeff", n_syn.float() / n_syn.max())
        self.generator_net = self.build_generator(SimpleNamespace(x=x_real, edge_index=ei_real, num_nodes=n_real), g)
        self.epoch_losses: list[float] = []
        self.skipped_updates = 0
        self.start_epoch = 0          # epochs done when this fit started (> 0 after a resume)
        self.rng_after_step = None    # torch RNG state right after the last epoch (checkpointed)
        self.saved_epochs = -1        # epochs done at the last checkpoint written
        self.shard = None             # this rank's classes under DDP (:meth:`class_shard`)
        self.rng_at_init = torch.get_rng_state()  # the first epoch's stream (see setup)

    # --- what subclasses change -------------------------------------------------------------
    def build_generator(self, data, g: torch.Generator) -> nn.Module:
        raise NotImplementedError

    def adjacency(self, feat: torch.Tensor) -> torch.Tensor:
        """``A'`` ``(N', N')`` from the generator (its current train/eval mode)."""
        return self.generator_net(feat)

    @torch.no_grad()
    def infer_adjacency(self) -> torch.Tensor:
        """``A'`` ``(N', N')`` as the authors' ``inference`` gives it (the inner loop's graph and the
        condensed one), the generator's batch norm per ``hp.inference_bn``: ``batch`` -- train mode,
        batch statistics (GCond's ``PGE.inference``: its ``self.eval()`` is commented out), which
        also moves the running statistics, as there; ``running`` -- eval mode, running statistics
        (SGDD's ``GraphonLearner.inference``)."""
        self.generator_net.train(self.hp.inference_bn == "batch")
        return self.adjacency(self.feat.detach())

    def structure_loss(self, adj: torch.Tensor) -> torch.Tensor:
        """Extra loss on ``A'`` added while the structure is updated (GCond: none)."""
        return adj.new_zeros(())

    def smoothness_loss(self, adj: torch.Tensor) -> torch.Tensor:
        """The label-smoothness part of :meth:`structure_loss` (GCond ``alpha``, SGDD ``beta``);
        with ``method.reg_every_step`` it is also added on feature epochs, where its gradient
        reaches ``X'`` through the generator -- what both authors' codes do (they add the
        regularizer to every outer step's loss)."""
        return adj.new_zeros(())

    # --- Alg. 1 ----------------------------------------------------------------------------
    def configure_optimizers(self):
        return [torch.optim.Adam([self.feat], lr=self.hp.lr_feat),
                torch.optim.Adam(self.generator_net.parameters(), lr=self.hp.lr_adj)]

    def propagate(self, adj: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """``A'_hat^K X'`` ``(N', F)`` on the synthetic graph ``adj (N', N')``."""
        a = gcn_norm_dense(adj)
        for _ in range(self.hp.nlayers):
            x = a @ x
        return x

    def init_model(self) -> tuple[torch.Tensor, torch.Tensor]:
        """A fresh SGC: ``W (F, K)``, then ``b (K,)``, uniform in ``+-1/sqrt(F)`` -- GCond's
        ``GraphConvolution.reset_parameters`` (``models/sgc.py``: ``1 / sqrt(weight.T.size(1))``, the
        fan-in), drawn in its order from the global RNG."""
        f, k = self.feat.shape[1], self.num_classes
        s = 1 / math.sqrt(f)
        w = torch.empty(f, k, device=self.feat.device).uniform_(-s, s).requires_grad_()
        b = torch.empty(k, device=self.feat.device).uniform_(-s, s).requires_grad_()
        return w, b

    def setup(self, stage: str) -> None:
        if stage == "fit" and self.rng_after_step is None:
            # the first epoch's RNG stream continues from the module's construction: Lightning's DDP
            # strategy re-seeds every process when a fit starts (before this hook), a single device
            # does not (a no-op there); later epochs restore ``rng_after_step``
            torch.set_rng_state(self.rng_at_init)

    def on_train_start(self):
        self.start_epoch = len(self.epoch_losses)
        self.shard = self.class_shard()

    # --- several processes (DDP): the classes split over the ranks ---------------------------
    def class_shard(self) -> SimpleNamespace | None:
        """This rank's part of the matching loss under ``W > 1`` processes (``None`` on one):
        classes ``r, r + W, ...`` (``cls``), their real training nodes' rows (``h_real``,
        ``onehot_real``, ``cw_real`` restricted to ``cls``), their synthetic nodes (``syn``, an
        index into ``X'``, with ``onehot_syn``, ``cw_syn``) and weights ``coeff``.

        Raises:
            ConfigError: a multi-process strategy other than DDP (the backward runs under
                ``block_backward_sync``, the gradients are all-reduced by hand)."""
        from lightning.pytorch.strategies import DDPStrategy

        world = self.trainer.world_size
        if world == 1:
            return None
        if not isinstance(self.trainer.strategy, DDPStrategy):
            raise ConfigError(f"trainer.strategy: graph condensation ({self.method}) runs on one device or under DDP, "
                              f"not {type(self.trainer.strategy).__name__}")
        cls = torch.arange(self.global_rank, self.num_classes, world, device=self.device)
        real = (self.onehot_real[:, cls].sum(1) > 0).nonzero().squeeze(1)
        syn = (self.onehot_syn[:, cls].sum(1) > 0).nonzero().squeeze(1)
        return SimpleNamespace(cls=cls, h_real=self.h_real[real], onehot_real=self.onehot_real[real],
                               cw_real=self.cw_real[real][:, cls], syn=syn, onehot_syn=self.onehot_syn[syn],
                               cw_syn=self.cw_syn[syn][:, cls], coeff=self.coeff[cls])

    def match_loss(self, h_syn: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """GCond's matching loss (Eq. 6) at the model ``w (F, K)``, ``b (K,)`` (detached) for the
        synthetic propagated features ``h_syn (N', F)``: over every class on one process, over this
        rank's classes (:meth:`class_shard`) under DDP -- the ranks' losses sum to the one-process loss."""
        sh = self.shard
        if sh is None:
            with torch.no_grad():
                g_real = class_gradients(self.h_real, w, b, self.onehot_real, self.cw_real)
            return match_distance(class_gradients(h_syn, w, b, self.onehot_syn, self.cw_syn), g_real, self.coeff)
        with torch.no_grad():
            g_real = class_gradients(sh.h_real, w, b, sh.onehot_real, sh.cw_real)
        return match_distance(class_gradients(h_syn[sh.syn], w, b, sh.onehot_syn, sh.cw_syn), g_real, sh.coeff)

    def all_reduce_step(self, match: torch.Tensor, loss: torch.Tensor, opt) -> tuple[float, bool]:
        """Under DDP: backpropagate this rank's ``loss`` (DDP's reducer blocked), sum the ranks'
        matching losses, losses and gradients of ``opt``'s parameters in one ``all_reduce``, and
        step ``opt`` with the summed gradients when the summed loss is finite (a parameter no rank
        got a gradient for keeps none, as on one process). Returns ``(summed matching loss, stepped)``."""
        with self.trainer.strategy.block_backward_sync():
            self.manual_backward(loss)
        params = [p for g in getattr(opt, "optimizer", opt).param_groups for p in g["params"]]
        dtype = params[0].dtype
        heads = [match.detach().to(dtype), loss.detach().to(dtype),
                 *(torch.tensor(float(p.grad is not None), dtype=dtype, device=self.device) for p in params)]
        flat = torch.cat([torch.stack(heads),
                          *((p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1).to(dtype)
                            for p in params)])
        flat = self.trainer.strategy.reduce(flat, reduce_op="sum")
        heads, grads = flat[:2 + len(params)], flat[2 + len(params):].split([p.numel() for p in params])
        if not torch.isfinite(heads[1]):
            return float(heads[0]), False
        for p, got, g in zip(params, heads[2:], grads):
            p.grad = g.view_as(p).to(p.dtype) if got > 0 else None
        opt.step()
        return float(heads[0]), True

    def training_step(self, batch, batch_idx):
        hp = self.hp
        opt_feat, opt_adj = self.optimizers()
        if self.rng_after_step is not None:
            # the RNG stream continues from the last epoch (Lightning draws a DataLoader seed from
            # the global RNG at every epoch; after a resume: the checkpoint's state)
            torch.set_rng_state(self.rng_after_step)
        epoch = len(self.epoch_losses)
        period = hp.adj_epochs + hp.feat_epochs
        update_adj = epoch % period < hp.adj_epochs
        # only what this epoch updates needs gradients (the other side's backward is skipped)
        self.feat.requires_grad_(not update_adj)
        for group in opt_adj.optimizer.param_groups if hasattr(opt_adj, "optimizer") else opt_adj.param_groups:
            for p in group["params"]:
                p.requires_grad_(update_adj)
        w, b = self.init_model()
        opt_model = torch.optim.Adam([w, b], lr=hp.lr_model)
        total = 0.0
        for ol in range(hp.outer_loop):
            self.generator_net.train()
            adj = self.adjacency(self.feat)
            h_syn = self.propagate(adj, self.feat)
            match = self.match_loss(h_syn, w.detach(), b.detach())
            loss = match
            whole = self.shard is None or self.global_rank == 0  # the structure terms: once, on rank 0
            if update_adj and whole:
                loss = loss + self.structure_loss(adj)
            elif hp.reg_every_step and whole:
                loss = loss + self.smoothness_loss(adj)
            opt_feat.zero_grad()
            opt_adj.zero_grad()
            if self.shard is not None:  # DDP: the classes' parts summed over the ranks
                matched, stepped = self.all_reduce_step(match, loss, opt_adj if update_adj else opt_feat)
                total += matched
                self.skipped_updates += int(not stepped)
            elif torch.isfinite(loss):  # a non-finite loss (numerical failure) skips the update, never poisons X'
                total += float(match.detach())
                self.manual_backward(loss)
                (opt_adj if update_adj else opt_feat).step()
            else:
                total += float(match.detach())
                self.skipped_updates += 1
            if ol == hp.outer_loop - 1:
                break
            h_in = self.propagate(self.infer_adjacency(), self.feat.detach())  # inner loop: theta on the synthetic graph
            for _ in range(hp.inner_loop):
                opt_model.zero_grad()
                F.cross_entropy(h_in @ w + b, self.y_syn).backward()
                opt_model.step()
        mean = total / hp.outer_loop
        self.epoch_losses.append(mean)
        self.rng_after_step = torch.get_rng_state()
        self.log_dict({"condense/match_loss": mean, "condense/update_adj": float(update_adj),
                       "condense/epoch": float(epoch + 1)})

    # --- checkpoints (Lightning's; what the module adds to them) ----------------------------
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        """Adds ``checkpoint["condensation"]``: method, setting, initial nodes, epochs done, RNG
        state after the last epoch, loss history, skipped updates (and SGDD's warm-up losses)."""
        self.saved_epochs = len(self.epoch_losses)
        checkpoint["condensation"] = {
            "method": self.method, "setting": self.setting, "init_index": self.init_index.clone(),
            "epochs_done": len(self.epoch_losses), "epoch_losses": list(self.epoch_losses),
            "rng": self.rng_after_step if self.rng_after_step is not None else torch.get_rng_state(),
            "skipped_updates": int(self.skipped_updates), "warmup_losses": list(getattr(self, "warmup_losses", []))}

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        """Restores what :meth:`on_save_checkpoint` added (Lightning restores the weights, the
        optimizers and the epoch counter).

        Raises:
            ValueError: a checkpoint of another method / setting or of another synthetic graph."""
        st = checkpoint.get("condensation")
        if st is None or st.get("method") != self.method:
            raise ValueError(f"checkpoint is not a {self.method} condensation "
                             f"(method {None if st is None else st.get('method')!r})")
        if st["setting"] != self.setting:
            raise ValueError(f"checkpoint setting {st['setting']!r} != method.setting {self.setting!r}")
        if not torch.equal(st["init_index"], self.init_index):
            raise ValueError("checkpoint was made with another seed / reduction rate (different initial nodes)")
        self.epoch_losses = list(st["epoch_losses"])
        self.skipped_updates = int(st["skipped_updates"])
        self.start_epoch = self.saved_epochs = int(st["epochs_done"])
        self.rng_after_step = st["rng"]
        if st.get("warmup_losses"):
            self.warmup_losses = list(st["warmup_losses"])

    @torch.no_grad()
    def condensed(self) -> CondensedGraph:
        """The current ``(X' (N', F), A' (N', N'), y' (N',))``, ``A'`` from :meth:`infer_adjacency`
        (the authors' ``inference``), made exactly symmetric with a zero diagonal."""
        adj = self.infer_adjacency().float()
        adj = ((adj + adj.T) / 2).clamp(min=0)
        adj.fill_diagonal_(0)
        return CondensedGraph(self.feat.detach().cpu().clone(), adj.cpu(), self.y_syn.cpu().clone(),
                              method=self.method, reduction_rate=self.hp.reduction_rate)


class GCond(GradientMatchingCondenser):
    """GCond's condensation module (arXiv 2110.07580): ``A' = PGE(X')`` (Sec. 3.3), optional
    label-smoothness regularizer ``alpha tr(Y'^T L' Y')`` (GCond's ``--alpha``, 0 by default)."""

    method = "gcond"

    def build_generator(self, data, g):
        return PGE(data.x.shape[1], self.hp.pge_hidden, self.hp.pge_layers)

    def structure_loss(self, adj):
        return self.smoothness_loss(adj)

    def smoothness_loss(self, adj):
        alpha = self.hp.alpha
        return alpha * label_smoothness(adj, self.onehot_syn) if alpha else adj.new_zeros(())


class GCondMethod(CondensationMethod):
    """GCond (Jin et al., ICLR 2022, arXiv 2110.07580): gradient matching with a PGE structure
    generator; ``conf/method/gcond.yaml`` (the authors' Cora command). Fields beyond
    :class:`CondensationMethod`'s: ``pge_hidden``, ``pge_layers`` (PGE width / depth, >= 2),
    ``alpha`` (label-smoothness weight)."""

    module_class: ClassVar[type] = GCond
    pge_hidden: PositiveInt
    pge_layers: int = Field(ge=2)
    alpha: NonNegFloat


__all__ = ["PGE", "GCond", "GCondMethod", "GradientMatchingCondenser", "class_gradients", "match_distance"]
