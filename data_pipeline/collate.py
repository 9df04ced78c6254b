"""numpy batch -> TorchRec input: the only module of the pipeline that imports torch/torchrec."""
from __future__ import annotations

from typing import Mapping

import numpy as np
import torch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from data_pipeline import schema


def sparse_keys(batch: Mapping[str, np.ndarray]) -> list[str]:
    """KJT keys: user_id, item_id, then the sparse_* columns in batch order."""
    return [schema.USER, schema.ITEM, *(k for k in batch if k.startswith(schema.SPARSE_PREFIX))]


def to_kjt(batch: Mapping[str, np.ndarray], device: torch.device | str | None = None
           ) -> tuple[KeyedJaggedTensor, torch.Tensor | None, torch.Tensor]:
    """(KJT with one id per sample per key, dense float32 [B, n_dense] or None, label float32 [B])."""
    keys = sparse_keys(batch)
    size = len(batch[schema.LABEL])
    values = torch.from_numpy(np.concatenate([np.asarray(batch[k], dtype=np.int64) for k in keys]))
    lengths = torch.ones(len(keys) * size, dtype=torch.int32)
    dense_names = [k for k in batch if k.startswith(schema.DENSE_PREFIX)]
    dense = (torch.from_numpy(np.stack([np.asarray(batch[k], dtype=np.float32) for k in dense_names],
                                       axis=1)) if dense_names else None)
    label = torch.from_numpy(np.array(batch[schema.LABEL], dtype=np.float32))   # a writable copy
    # the per-key layout is known here on the host: handed on, the KJT (and its copy on the
    # device) never reads its lengths back (a host sync per lookup on CUDA)
    kjt = KeyedJaggedTensor(keys=keys, values=values, lengths=lengths, stride=size,
                            length_per_key=[size] * len(keys),
                            offset_per_key=[size * i for i in range(len(keys) + 1)])
    if device is not None:
        kjt = kjt.to(device)
        dense = dense.to(device) if dense is not None else None
        label = label.to(device)
    return kjt, dense, label
