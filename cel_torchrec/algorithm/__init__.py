"""CEL's clustering math in pure torch: state, vectorised ops, GPCA split, reassignment, schedule."""
from cel_torchrec.algorithm.ops import (cluster_grad_scale, remap_ids, scatter_entity_grads,
                                        segment_count, segment_covariance, segment_sum)
from cel_torchrec.algorithm.reassign import (ReassignPlan, accumulate_candidate_losses,
                                             decide_reassignment, decide_reassignment_from_best,
                                             mf_loss_matrix,
                                             mf_sufficient_stats)
from cel_torchrec.algorithm.schedule import (REASSIGN, SPLIT, ClusterSchedule, coverage_window_steps,
                                           reference_reassign_points)
from cel_torchrec.algorithm.split import (SplitPlan, apply_split, choose_clusters, gpca_split,
                                          principal_directions, top_eigenvectors)
from cel_torchrec.algorithm.state import ClusterState, map_dtype_for
from cel_torchrec.algorithm.window import SplitWindow

__all__ = [
    "ClusterState", "ClusterSchedule", "SplitWindow", "top_eigenvectors", "SplitPlan", "ReassignPlan", "SPLIT", "REASSIGN",
    "remap_ids", "segment_sum", "segment_count", "segment_covariance", "cluster_grad_scale",
    "scatter_entity_grads", "choose_clusters", "principal_directions", "gpca_split", "apply_split",
    "accumulate_candidate_losses", "decide_reassignment", "decide_reassignment_from_best", "mf_sufficient_stats", "mf_loss_matrix",
    "reference_reassign_points", "coverage_window_steps", "map_dtype_for",
]
