"""Baseline embedding collections behind the same interface as ClusteredEmbeddingBagCollection
(KJT in, KeyedTensor out, `embedding_bytes()`): full table, hashing trick, quotient-remainder."""
from __future__ import annotations

import dataclasses
import math

import torch
from torch import nn
from torchrec.modules.embedding_configs import EmbeddingBagConfig
from torchrec.modules.embedding_modules import EmbeddingBagCollection
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor, KeyedTensor

# odd 63-bit multiplier (splitmix64's golden-ratio constant, truncated to int64 range)
_HASH_MULT = 0x1E3779B97F4A7C15


def _bytes_of(module: nn.Module) -> int:
    return int(sum(p.numel() * p.element_size() for p in module.parameters()))


class FullEmbeddingBagCollection(EmbeddingBagCollection):
    """One row per entity: the stock EmbeddingBagCollection plus `embedding_bytes()`."""

    def embedding_bytes(self) -> int:
        return _bytes_of(self)


def hash_ids(ids: torch.Tensor, buckets: int, salt: int = 0) -> torch.Tensor:
    """Multiplicative hash of int64 ids into `[0, buckets)` (vectorised, same on CPU and CUDA)."""
    mixed = (ids.long() + salt) * _HASH_MULT
    mixed = mixed ^ (mixed >> 29)
    return torch.remainder(mixed, buckets)


class _RemappedCollection(nn.Module):
    """Shared shape of the baselines: remap the KJT's values per feature, then a stock EBC."""

    def __init__(self):
        super().__init__()

    def _remap(self, features: KeyedJaggedTensor, fns: dict) -> KeyedJaggedTensor:
        values = features.values()
        offsets = features.offset_per_key()
        new_values = values.clone()
        for i, key in enumerate(features.keys()):
            fn = fns.get(key)
            if fn is not None:
                new_values[offsets[i]:offsets[i + 1]] = fn(values[offsets[i]:offsets[i + 1]])
        return KeyedJaggedTensor(keys=features.keys(), values=new_values, lengths=features.lengths(),
                                 offsets=features.offsets(), weights=features.weights_or_none(),
                                 stride=features.stride())


class HashedEmbeddingBagCollection(_RemappedCollection):
    """Hashing trick: table `t` with `buckets[t]` rows; entity ids hash into them (collisions
    shared blindly, unlike CEL's learned clusters)."""

    def __init__(self, tables: list[EmbeddingBagConfig], buckets: dict[str, int],
                 device: torch.device | None = None):
        super().__init__()
        self._buckets = dict(buckets)
        hashed = [dataclasses.replace(t, num_embeddings=buckets[t.name]) if t.name in buckets else t
                  for t in tables]
        self._fns = {f: (lambda ids, b=buckets[t.name], s=k: hash_ids(ids, b, s))
                     for k, t in enumerate(tables) if t.name in buckets for f in t.feature_names}
        self._embedding_bag_collection = EmbeddingBagCollection(tables=hashed, device=device)

    def forward(self, features: KeyedJaggedTensor) -> KeyedTensor:
        return self._embedding_bag_collection(self._remap(features, self._fns))

    def embedding_bytes(self) -> int:
        return _bytes_of(self)


class QREmbeddingBagCollection(nn.Module):
    """Quotient-remainder compositional embeddings (Shi et al. 2020): entity `i` of a table with
    `collisions[t] = m` looks up row `i // m` of a quotient table and row `i % m` of a remainder
    table; the two vectors are combined element-wise (`mult`, the paper's default, or `add`)."""

    def __init__(self, tables: list[EmbeddingBagConfig], collisions: dict[str, int],
                 combine: str = "mult", device: torch.device | None = None):
        super().__init__()
        if combine not in ("mult", "add"):
            raise ValueError("combine must be 'mult' or 'add'")
        self._combine = combine
        self._collisions = dict(collisions)
        self._qr_features: dict[str, int] = {}
        configs = []
        for t in tables:
            m = collisions.get(t.name)
            if m is None:
                configs.append(t)
                continue
            for f in t.feature_names:
                self._qr_features[f] = m
            configs.append(dataclasses.replace(
                t, name=f"{t.name}__q", num_embeddings=max(1, math.ceil(t.num_embeddings / m)),
                feature_names=[f"{f}__q" for f in t.feature_names]))
            configs.append(dataclasses.replace(
                t, name=f"{t.name}__r", num_embeddings=min(m, t.num_embeddings),
                feature_names=[f"{f}__r" for f in t.feature_names]))
        self._embedding_bag_collection = EmbeddingBagCollection(tables=configs, device=device)

    def forward(self, features: KeyedJaggedTensor) -> KeyedTensor:
        parts = features.to_dict()
        keys, values, lengths = [], [], []
        for key, jt in parts.items():
            m = self._qr_features.get(key)
            if m is None:
                keys.append(key), values.append(jt.values()), lengths.append(jt.lengths())
            else:
                ids = jt.values().long()
                keys += [f"{key}__q", f"{key}__r"]
                values += [ids // m, ids % m]
                lengths += [jt.lengths(), jt.lengths()]
        kjt = KeyedJaggedTensor(keys=keys, values=torch.cat(values), lengths=torch.cat(lengths),
                                stride=features.stride())
        looked_up = self._embedding_bag_collection(kjt).to_dict()
        out_keys, out_values = [], []
        for key in features.keys():
            if key in self._qr_features:
                q, r = looked_up[f"{key}__q"], looked_up[f"{key}__r"]
                out_values.append(q * r if self._combine == "mult" else q + r)
            else:
                out_values.append(looked_up[key])
            out_keys.append(key)
        return KeyedTensor(keys=out_keys, length_per_key=[v.shape[1] for v in out_values],
                           values=torch.cat(out_values, dim=1))

    def embedding_bytes(self) -> int:
        return _bytes_of(self)
