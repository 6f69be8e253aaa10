"""Data: CMU-MultimodalSDK computational sequences, MulT .pkl tensors, synthetic MOSEI, batching."""
from .csd import ComputationalSequence, CSDError, load_csd, read_csd, write_csd
from .mosei import EMOTIONS, MODALITIES, load_csd_folder
from .report import DataReport
from .splits import random_split, resolve_split, standard_folds
from .synthetic import ensure_synthetic, generate_synthetic

__all__ = ["ComputationalSequence", "CSDError", "load_csd", "read_csd", "write_csd", "EMOTIONS",
           "MODALITIES", "load_csd_folder", "DataReport", "random_split", "resolve_split",
           "standard_folds", "ensure_synthetic", "generate_synthetic"]
