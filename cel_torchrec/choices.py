"""Every string option of the CEL library, defined once: the library validates against these
tuples and the trainer's typed config offers exactly them. Pure Python (no torch import), so a
config can be checked without loading the stack."""

GRAD_AVERAGES = ("batch", "members", "none")          # per-cluster gradient averaging
SPLIT_CRITERIA = ("interactions", "grad_norm", "members", "loss", "mean_loss")
SPLIT_METHODS = ("sign", "median")
SPLIT_GRADIENTS = ("sum", "mean")                     # what GPCA decomposes per member
UNSEEN_POLICIES = ("stay", "largest", "pooled")       # entities without (enough) data
REASSIGN_MODES = ("exact", "lite")                    # the config adds "auto"
LITE_SCORINGS = ("exact", "linearised")               # how CEL-Lite scores its candidates
SHARDING_TYPES = ("table_wise", "column_wise", "row_wise", "table_column_wise", "data_parallel")
BATCH_SCOPES = ("global", "local")                    # where `batch` averaging counts members
