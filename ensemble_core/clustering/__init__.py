"""Partitioning tasks into groups from the task affinity (stage 3; Appendix A.1 of the paper;
docs/design.md, "Stage 3"): the registry of clustering methods (``base``), the paper's SDP
(``sdp``) and the spectral baseline (``spectral``). A new method is one module beside them
(docs/design.md, "Extending")."""
from .base import (CLUSTERING_METHODS, ClusteringConfig, ClusteringMethod, Estimator,
                   centered_affinity, clustering_method, groups_to_json, join_by_affinity,
                   labels_to_groups, partition_objective, register_clustering_method,
                   validate_clustering)
from .sdp import (SDPClustering, SDPConfig, SDPSolveError, density_affinity, paper_density,
                  round_solution, solve_sdp)
from .spectral import SpectralClustering, SpectralConfig, spectral_cluster

__all__ = ["CLUSTERING_METHODS", "ClusteringConfig", "ClusteringMethod", "Estimator",
           "centered_affinity", "clustering_method", "groups_to_json", "join_by_affinity",
           "labels_to_groups", "partition_objective", "register_clustering_method",
           "validate_clustering", "SDPClustering", "SDPConfig", "SDPSolveError", "paper_density",
           "density_affinity",
           "round_solution", "solve_sdp", "SpectralClustering", "SpectralConfig",
           "spectral_cluster"]
