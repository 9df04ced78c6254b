"""Every string option of the CEL library, defined once, as a `Literal` type: the library's and
the trainer's config fields are annotated with these types (the trainer's loader checks values
against them), and the library validates its arguments against the tuple of each type's values
(`GRAD_AVERAGES` = the values of `GradAverage`, ...). Pure Python (no torch import), so a config
can be checked without loading the stack."""
from typing import Literal, get_args

GradAverage = Literal["batch", "members", "none"]          # per-cluster gradient averaging
SplitCriterion = Literal["interactions", "grad_norm", "members", "loss", "mean_loss"]
SplitMethod = Literal["sign", "median"]
SplitGradient = Literal["sum", "mean"]                     # what GPCA decomposes per member
UnseenPolicy = Literal["stay", "largest", "pooled"]        # entities without (enough) data
ReassignMode = Literal["exact", "lite"]                    # the trainer's config adds "auto"
LiteScoring = Literal["exact", "linearised"]               # how CEL-Lite scores its candidates
ShardingType = Literal["table_wise", "column_wise", "row_wise", "table_column_wise",
                       "data_parallel"]
BatchScope = Literal["global", "local"]                    # where `batch` averaging counts members
Bags = Literal["auto", "multi_hot"]                        # how a clustered feature's bags are read
MapDtype = Literal["int32", "auto"]                        # the assignment map's integer width

GRAD_AVERAGES: tuple[str, ...] = get_args(GradAverage)
SPLIT_CRITERIA: tuple[str, ...] = get_args(SplitCriterion)
SPLIT_METHODS: tuple[str, ...] = get_args(SplitMethod)
SPLIT_GRADIENTS: tuple[str, ...] = get_args(SplitGradient)
UNSEEN_POLICIES: tuple[str, ...] = get_args(UnseenPolicy)
REASSIGN_MODES: tuple[str, ...] = get_args(ReassignMode)
LITE_SCORINGS: tuple[str, ...] = get_args(LiteScoring)
SHARDING_TYPES: tuple[str, ...] = get_args(ShardingType)
BATCH_SCOPES: tuple[str, ...] = get_args(BatchScope)
BAGS: tuple[str, ...] = get_args(Bags)
MAP_DTYPES: tuple[str, ...] = get_args(MapDtype)
