"""FBGEMM's fused optimizers, named as torch names them: which fused kind stands for a torch
optimizer, on which devices FBGEMM has it, and the sharder's `fused_params` that make the fused
update equal torch's (same defaults). The one place that maps torch optimizers to FBGEMM."""
from __future__ import annotations

from typing import Any

# torch optimizer name -> (FBGEMM EmbOptimType name, devices it runs on)
FUSED_KINDS = {"adagrad": ("EXACT_ADAGRAD", ("cpu", "cuda")),
               "sgd": ("EXACT_SGD", ("cpu", "cuda")),
               "adam": ("ADAM", ("cuda",))}
TORCH_NAMES = {"adagrad": "Adagrad", "sgd": "SGD", "adam": "Adam"}
# torch's defaults, passed to FBGEMM so both paths compute the same update (FBGEMM's own eps
# default is 1e-8; torch.optim.Adagrad's is 1e-10; both start the accumulator at 0)
TORCH_DEFAULTS = {"adagrad": {"eps": 1e-10},
                  "sgd": {},
                  "adam": {"eps": 1e-8, "beta1": 0.9, "beta2": 0.999}}


def fused_params(optimizer: str, lr: float) -> dict[str, Any]:
    """The CEL / EBC sharders' `fused_params` for torch optimizer `optimizer` (adagrad | sgd |
    adam) at learning rate `lr`: FBGEMM's fused kind of the same update, torch's defaults."""
    from fbgemm_gpu.split_embedding_configs import EmbOptimType
    if optimizer not in FUSED_KINDS:
        raise ValueError(f"no fused FBGEMM optimizer for {optimizer!r}; have {sorted(FUSED_KINDS)}")
    return {"optimizer": getattr(EmbOptimType, FUSED_KINDS[optimizer][0]),
            "learning_rate": lr, **TORCH_DEFAULTS[optimizer]}
