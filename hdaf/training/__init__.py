"""Training and evaluation: staged / end-to-end loop, DDP, resume, metrics, reports."""
from .config import DEFAULTS, get_config
from .metrics import compute_metrics

__all__ = ["DEFAULTS", "get_config", "compute_metrics", "train", "evaluate_run", "run_experiment"]


def __getattr__(name):  # lazy: keep `import hdaf.training` light
    if name == "train":
        from .trainer import train
        return train
    if name == "evaluate_run":
        from .evaluate import evaluate_run
        return evaluate_run
    if name == "run_experiment":
        from .experiment import run_experiment
        return run_experiment
    raise AttributeError(name)
