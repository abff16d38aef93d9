"""pilot: Triton-fused PILoT sparse training (x = m * w with a dynamic weight decay on the factors)."""
from .baselines import (ProxSGD, SoftThreshold, lasso_param_groups, remove_str_, soft_threshold, spred_optimizer,
                        str_param_groups, to_str_model)
from .factorisation import factorise, is_factorised, is_prunable
from .gmp import GradualMagnitudePruning
from .iterative import IterativePruning, PruningCycle
from .optim import FusedPILoTSGD
from .pruning import (SparsityReport, apply_masks_, export_masks, export_sparse, prune_, sparsity_report,
                      to_torch_prune)
from .schedule import (AlphaScheduler, ConstantAlpha, GeometricAlpha, HarmonicAlpha, PILoTSchedule, QuadraticAlpha,
                       SparsityCourse, SparsityTarget, alpha_schedule, sparsity_target)
from .sparse_checkpoint import (SparseCheckpointError, dense_fp32_bytes, load_sparse, read_sparse_metadata,
                                save_sparse)
from .sparse_inference import SparseInferenceModel, sparse_inference

__all__ = [
    "FusedPILoTSGD", "factorise", "is_factorised", "is_prunable",
    "PILoTSchedule", "AlphaScheduler", "ConstantAlpha", "HarmonicAlpha", "QuadraticAlpha", "GeometricAlpha",
    "alpha_schedule", "SparsityCourse", "SparsityTarget", "sparsity_target", "GradualMagnitudePruning",
    "prune_", "apply_masks_", "sparsity_report", "SparsityReport", "export_masks", "export_sparse", "to_torch_prune",
    "spred_optimizer", "ProxSGD", "soft_threshold", "lasso_param_groups", "SoftThreshold", "to_str_model",
    "str_param_groups", "remove_str_",
    "IterativePruning", "PruningCycle",
    "save_sparse", "load_sparse", "read_sparse_metadata", "dense_fp32_bytes", "SparseCheckpointError",
    "sparse_inference", "SparseInferenceModel",
]
__version__ = "0.1.0"
