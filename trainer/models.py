"""Interaction models: `model(embeddings, dense) -> Tensor[B]` on top of any embedding collection.

`embeddings` maps "user_id" and "item_id" to pooled embeddings `[B, D]` (one row per sample),
`dense` is `[B, num_dense]` or None; the output is a rating prediction or a click logit. Every
entity-dependent parameter lives in the embedding tables (MF's entity biases are their LAST
column), so CEL can cluster it. Models hold no assumption on B: CEL reassignment evaluates
`[B * K, D]` candidate batches built by `repeat_interleave`.

    MF         pred = <u[:d], i[:d]> + u[d] + i[d] + b          tables D = d + 1
    NeuMF      GMF(u_g * i_g) ++ MLP([u_m, i_m]) -> linear       tables D = d (halves)
    two-tower  <tower_u(u), tower_i(i)> + b                      tables D = d
    GMF        <u, i> + b   (the CCE paper's harness: a logit for BCE)  tables D = d

CTR models read every categorical feature of the dataset (user_id, item_id and each sparse_*
column, one table each) and its dense features:

    DLRM       TorchRec's DenseArch / InteractionArch / OverArch   tables D = d
    DeepFM     first order (column d of each row) + FM over the fields' [:d] + MLP   D = d + 1
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

USER, ITEM = "user_id", "item_id"
MODEL_NAMES = ("mf", "neumf", "two_tower", "dlrm", "deepfm", "gmf")
CTR_MODELS = ("dlrm", "deepfm")           # models over every categorical feature


def embedding_dim_for(model_cfg) -> int:
    """Width of the embedding tables the model reads: MF adds one bias column to d, rounded up
    to a multiple of 4 (FBGEMM's table kernels need it; padding columns start and stay zero)."""
    _check_name(model_cfg.name)
    d = int(model_cfg.embedding_dim)
    if model_cfg.name in ("mf", "deepfm"):
        return -(-(d + 1) // 4) * 4
    if model_cfg.name in ("dlrm", "gmf") and d % 4:
        raise ValueError(f"model.embedding_dim must be a multiple of 4 for {model_cfg.name} "
                         f"(FBGEMM's table kernels)")
    if model_cfg.name == "neumf" and d < 2:
        raise ValueError("model.embedding_dim must be >= 2 for neumf (GMF and MLP halves)")
    return d


def build_model(model_cfg, num_dense: int = 0, seed: int | None = None,
                features: list[str] | None = None) -> nn.Module:
    """The interaction model named by `model_cfg.name` (a `trainer.config.ModelConfig`).
    `num_dense` > 0 feeds dense features in (otherwise `dense` is ignored); `seed` makes the
    initialisation deterministic without touching the global RNG; `features`: the categorical
    features a CTR model reads (in this order)."""
    _check_name(model_cfg.name)
    d = int(model_cfg.embedding_dim)
    hidden = [int(h) for h in model_cfg.hidden]
    dropout = float(model_cfg.dropout)
    if model_cfg.name in CTR_MODELS and not features:
        raise ValueError(f"model.name={model_cfg.name} needs the list of categorical features")

    def make() -> nn.Module:
        if model_cfg.name == "dlrm":
            return DLRM(features, d, num_dense, [int(h) for h in model_cfg.dense_hidden], hidden)
        if model_cfg.name == "deepfm":
            return DeepFM(features, d, num_dense, hidden, dropout=dropout)
        if model_cfg.name == "mf":
            return MatrixFactorization(d, num_dense=num_dense)
        if model_cfg.name == "gmf":
            return GMF(d)
        if model_cfg.name == "neumf":
            return NeuMF(d, hidden, dropout=dropout, num_dense=num_dense)
        return TwoTower(d, hidden, dropout=dropout, num_dense=num_dense)

    if seed is None:
        return make()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return make()


def _check_name(name: str) -> None:
    if name not in MODEL_NAMES:
        raise ValueError(f"model.name must be one of {'|'.join(MODEL_NAMES)}, got {name!r}")


def mlp(sizes: list[int], dropout: float = 0.0, last_activation: bool = True) -> nn.Sequential:
    """Linear layers of widths `sizes[0] -> sizes[1] -> ...` with ReLU (and dropout) between."""
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers.append(nn.Linear(a, b))
        if last_activation or i < len(sizes) - 2:
            layers.append(nn.ReLU())
            if dropout > 0:
                layers.append(nn.Dropout(dropout))
    return nn.Sequential(*layers)


class MatrixFactorization(nn.Module):
    """Biased MF: `<u[:d], i[:d]> + u[d] + i[d] + global_bias` (+ a linear term on dense
    features when `num_dense` > 0). Linear in either side's embedding, which gives CEL an exact
    closed-form reassignment (`linear_form`)."""

    def __init__(self, embedding_dim: int, num_dense: int = 0):
        super().__init__()
        self.embedding_dim = embedding_dim
        self.global_bias = nn.Parameter(torch.zeros(()))
        self.dense = nn.Linear(num_dense, 1, bias=False) if num_dense > 0 else None

    @torch.no_grad()
    def set_global_bias(self, value: float) -> None:
        """Start predictions at the training label mean (ratings)."""
        self.global_bias.fill_(float(value))

    def _dense_term(self, dense: Tensor | None) -> Tensor | float:
        if self.dense is None or dense is None:
            return 0.0
        return self.dense(dense).squeeze(-1)

    def forward(self, embeddings: dict[str, Tensor], dense: Tensor | None = None,
                all_pairs: bool = False) -> Tensor:
        """Each row's score; `all_pairs`: every row's user against every row's item
        (`score_matrix`, the in-batch logits of sampled softmax)."""
        u, i = embeddings[USER], embeddings[ITEM]
        if all_pairs:
            return self.score_matrix(u, i)
        d = self.embedding_dim
        return ((u[:, :d] * i[:, :d]).sum(-1) + u[:, d] + i[:, d] + self.global_bias
                + self._dense_term(dense))

    def score_matrix(self, users: Tensor, items: Tensor) -> Tensor:
        """`[U, I]` scores of every user row against every item row (no dense features):
        equal to `forward` on each pair, one matrix product instead of U x I rows."""
        if self.dense is not None:
            raise ValueError("score_matrix: MF with dense features needs them per pair; score "
                             "pairs with forward()")
        d = self.embedding_dim
        return (users[:, :d] @ items[:, :d].T + users[:, d:d + 1] + items[:, d].unsqueeze(0)
                + self.global_bias)

    def linear_form(self, embeddings: dict[str, Tensor], dense: Tensor | None,
                    feature: str) -> tuple[Tensor, Tensor]:
        """`(x [B, D], const [B])` with `pred = x . e + const` for `e` = the full embedding row
        (bias column included) of `feature`, everything else fixed."""
        other = embeddings[ITEM if feature == USER else USER]
        d = self.embedding_dim
        x = torch.cat([other[:, :d], torch.ones_like(other[:, :1])], dim=1)
        const = other[:, d] + self.global_bias + self._dense_term(dense)
        return x, const


class GMF(nn.Module):
    """Generalised MF as the CCE paper's harness uses it (Tsang & Ahle, 2023): the dot product
    of the user and item rows plus a global bias, no per-entity biases; with `train.loss=bce`
    the output is a click logit. Linear in either row (`linear_form`: exact reassignment)."""

    def __init__(self, embedding_dim: int):
        super().__init__()
        self.embedding_dim = embedding_dim
        self.global_bias = nn.Parameter(torch.zeros(()))

    @torch.no_grad()
    def set_global_bias(self, value: float) -> None:
        self.global_bias.fill_(float(value))

    def forward(self, embeddings: dict[str, Tensor], dense: Tensor | None = None,
                all_pairs: bool = False) -> Tensor:
        if all_pairs:
            return self.score_matrix(embeddings[USER], embeddings[ITEM])
        return (embeddings[USER] * embeddings[ITEM]).sum(-1) + self.global_bias

    def linear_form(self, embeddings: dict[str, Tensor], dense: Tensor | None,
                    feature: str) -> tuple[Tensor, Tensor]:
        other = embeddings[ITEM if feature == USER else USER]
        return other, self.global_bias.expand(other.shape[0])

    def score_matrix(self, users: Tensor, items: Tensor) -> Tensor:
        return users @ items.T + self.global_bias


class NeuMF(nn.Module):
    """Neural matrix factorisation (He et al., 2017): a GMF branch on the first half of each
    embedding (`u_g * i_g`) and an MLP branch on the second half (`[u_m, i_m] -> hidden`),
    concatenated and projected to one output whose bias is the global bias."""

    def __init__(self, embedding_dim: int, hidden: list[int], dropout: float = 0.0,
                 num_dense: int = 0):
        super().__init__()
        self.gmf_dim = embedding_dim // 2
        self.mlp_dim = embedding_dim - self.gmf_dim
        self.num_dense = num_dense
        self.mlp = mlp([2 * self.mlp_dim + num_dense, *hidden], dropout)
        mlp_out = hidden[-1] if hidden else 2 * self.mlp_dim + num_dense
        self.output = nn.Linear(self.gmf_dim + mlp_out, 1)

    @torch.no_grad()
    def set_global_bias(self, value: float) -> None:
        self.output.bias.fill_(float(value))

    def forward(self, embeddings: dict[str, Tensor], dense: Tensor | None = None) -> Tensor:
        u, i = embeddings[USER], embeddings[ITEM]
        g = self.gmf_dim
        gmf = u[:, :g] * i[:, :g]
        parts = [u[:, g:], i[:, g:]]
        if self.num_dense and dense is not None:
            parts.append(dense)
        h = self.mlp(torch.cat(parts, dim=1))
        return self.output(torch.cat([gmf, h], dim=1)).squeeze(-1)


class TwoTower(nn.Module):
    """Two-tower MLP: each side's embedding through its own tower (ReLU between layers, linear
    last layer), then a dot product plus a global bias. Dense features, if any, join the user
    (query) tower."""

    def __init__(self, embedding_dim: int, hidden: list[int], dropout: float = 0.0,
                 num_dense: int = 0):
        super().__init__()
        self.num_dense = num_dense
        user_in = embedding_dim + num_dense
        if hidden:
            self.user_tower = mlp([user_in, *hidden], dropout, last_activation=False)
            self.item_tower = mlp([embedding_dim, *hidden], dropout, last_activation=False)
        else:
            if num_dense:
                raise ValueError("two_tower with dense features needs model.hidden")
            self.user_tower, self.item_tower = nn.Identity(), nn.Identity()
        self.global_bias = nn.Parameter(torch.zeros(()))

    @torch.no_grad()
    def set_global_bias(self, value: float) -> None:
        self.global_bias.fill_(float(value))

    def forward(self, embeddings: dict[str, Tensor], dense: Tensor | None = None,
                all_pairs: bool = False) -> Tensor:
        u, i = embeddings[USER], embeddings[ITEM]
        if all_pairs:
            return self.score_matrix(u, i)
        if self.num_dense and dense is not None:
            u = torch.cat([u, dense], dim=1)
        return (self.user_tower(u) * self.item_tower(i)).sum(-1) + self.global_bias

    def score_matrix(self, users: Tensor, items: Tensor) -> Tensor:
        """`[U, I]` scores of every user row against every item row (no dense features)."""
        if self.num_dense:
            raise ValueError("score_matrix: a two-tower model with dense features needs them "
                             "per user; score pairs with forward()")
        return self.user_tower(users) @ self.item_tower(items).T + self.global_bias


class DLRM(nn.Module):
    """DLRM (Naumov et al., 2019) above the embedding lookup, from TorchRec's own arches: the
    dense features through `DenseArch` (MLP to width d), pairwise dot products of the dense and
    every categorical embedding (`InteractionArch`), then `OverArch` (MLP to one logit). The
    lookup stays outside (the collection, sharded or not), as `torchrec.models.dlrm.DLRM` splits
    it into its `SparseArch`; without dense features a learned constant row stands in."""

    def __init__(self, features: list[str], embedding_dim: int, num_dense: int,
                 dense_hidden: list[int], over_hidden: list[int]):
        super().__init__()
        from torchrec.models.dlrm import DenseArch, InteractionArch, OverArch
        self.features = list(features)
        self.num_dense = num_dense
        if num_dense:
            self.dense_arch = DenseArch(num_dense, [*dense_hidden, embedding_dim])
        else:
            self.dense_row = nn.Parameter(torch.zeros(embedding_dim))
        f = len(self.features)
        self.interaction = InteractionArch(num_sparse_features=f)
        # (its last layer is a plain Linear: the output is a logit)
        self.over_arch = OverArch(embedding_dim + f * (f + 1) // 2, [*over_hidden, 1])

    @torch.no_grad()
    def set_global_bias(self, value: float) -> None:
        self.over_arch.model[-1].bias.fill_(float(value))

    def forward(self, embeddings: dict[str, Tensor], dense: Tensor | None = None) -> Tensor:
        sparse = torch.stack([embeddings[k] for k in self.features], dim=1)      # [B, F, D]
        if self.num_dense and dense is not None:
            d = self.dense_arch(dense)
        else:
            d = self.dense_row.expand(sparse.shape[0], -1)
        return self.over_arch(self.interaction(d, sparse)).squeeze(-1)


class DeepFM(nn.Module):
    """DeepFM (Guo et al., 2017): a first-order term (column d of each feature's row, so it is
    clustered with the row) plus a linear term on the dense features, the field-wise
    factorisation machine `0.5 * sum_k ((sum_f v_fk)^2 - sum_f v_fk^2)` over the rows' first d
    columns, and an MLP over the concatenated fields (and dense features). TorchRec's
    `FactorizationMachine` flattens fields and columns into one vector, which is not the paper's
    field-wise FM, hence these three lines."""

    def __init__(self, features: list[str], embedding_dim: int, num_dense: int,
                 hidden: list[int], dropout: float = 0.0):
        super().__init__()
        self.features = list(features)
        self.d = embedding_dim
        self.num_dense = num_dense
        width = len(self.features) * embedding_dim + num_dense
        self.deep = mlp([width, *hidden, 1], dropout, last_activation=False)
        self.dense_linear = nn.Linear(num_dense, 1, bias=False) if num_dense else None
        self.global_bias = nn.Parameter(torch.zeros(()))

    @torch.no_grad()
    def set_global_bias(self, value: float) -> None:
        self.global_bias.fill_(float(value))

    def forward(self, embeddings: dict[str, Tensor], dense: Tensor | None = None) -> Tensor:
        rows = torch.stack([embeddings[k] for k in self.features], dim=1)        # [B, F, D]
        v = rows[:, :, :self.d]
        first = rows[:, :, self.d].sum(1)
        fm = 0.5 * (v.sum(1).pow(2) - v.pow(2).sum(1)).sum(1)
        parts = [v.flatten(1)]
        if self.num_dense and dense is not None:
            parts.append(dense)
            first = first + self.dense_linear(dense).squeeze(-1)
        deep = self.deep(torch.cat(parts, dim=1)).squeeze(-1)
        return first + fm + deep + self.global_bias
