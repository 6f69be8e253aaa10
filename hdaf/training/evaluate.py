"""Evaluation: predictions of the fused head and of every unimodal head, metrics, saving."""
from __future__ import annotations

import json
import os
from typing import Callable, Dict, Optional

import numpy as np
import torch

from ..data.dataset import SegmentDataset, make_loader, to_device
from .metrics import compute_metrics


@torch.no_grad()
def predict(model: torch.nn.Module, dataset: SegmentDataset, device, batch_size: int = 64,
            loss_fn: Optional[Callable] = None) -> Dict[str, object]:
    """Logits of the fused head (``"logits"``) and each unimodal head, labels, ids, mean loss."""
    was_training = model.training
    model.eval()
    fused, uni, labels, ids, losses, weights = [], {}, [], [], [], []
    try:
        for batch in make_loader(dataset, batch_size=batch_size):
            batch = to_device(batch, device)
            out = model(batch)
            fused.append(out["logits"].float().cpu())
            for m, v in (out.get("unimodal_logits") or {}).items():
                uni.setdefault(m, []).append(v.float().cpu())
            labels.append(batch["labels"].cpu())
            ids.extend(batch["ids"])
            if loss_fn is not None:
                losses.append(float(loss_fn(out, batch["labels"])))
                weights.append(len(batch["ids"]))
    finally:
        model.train(was_training)
    res = {"logits": torch.cat(fused).numpy(), "labels": torch.cat(labels).numpy(), "ids": ids,
           "unimodal": {m: torch.cat(v).numpy() for m, v in uni.items()}}
    res["loss"] = float(np.average(losses, weights=weights)) if losses else float("nan")
    return res


def evaluate_model(model, dataset, device, head: str, batch_size: int = 64,
                   threshold: Optional[float] = None, loss_fn=None, keep_predictions: bool = False):
    """``{"fused": metrics, "unimodal": {modality: metrics}, "loss": mean loss, "n": N}``."""
    pred = predict(model, dataset, device, batch_size, loss_fn)
    out = {"fused": compute_metrics(pred["logits"], pred["labels"], head, threshold),
           "unimodal": {m: compute_metrics(v, pred["labels"], head, threshold)
                        for m, v in pred["unimodal"].items()},
           "loss": pred["loss"], "n": len(pred["ids"])}
    if keep_predictions:
        out["predictions"] = pred
    return out


def save_metrics(res: dict, run_dir: str, split: str) -> str:
    res = dict(res)
    pred = res.pop("predictions", None)
    path = os.path.join(run_dir, f"metrics_{split}.json")
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(res, f, indent=2, default=float)
    os.replace(tmp, path)
    if pred is not None:
        np.savez(os.path.join(run_dir, f"predictions_{split}.npz"), logits=pred["logits"],
                 labels=pred["labels"], ids=np.array(pred["ids"]),
                 **{f"unimodal_{m}": v for m, v in pred["unimodal"].items()})
    return path


def evaluate_run(run_dir: str, split: str = "test", data_overrides: Optional[dict] = None,
                 checkpoint: Optional[str] = None, device: str = "auto", log=print) -> dict:
    """Load ``final.pt`` (or ``checkpoint``) of a run and evaluate it on ``split``.

    The data section of the run's ``config.yaml`` is used, updated with ``data_overrides``
    (e.g. another ``data.dir`` with the same preprocessing).
    """
    from ..data.loading import load_data
    from . import checkpoint as ckpt
    from .config import deep_update, load_file
    from .distributed import pick_device
    from .models_api import load_model

    cfg = load_file(os.path.join(run_dir, "config.yaml"))
    if data_overrides:
        deep_update(cfg["data"], data_overrides)
    dev = pick_device(device)
    path = checkpoint or os.path.join(run_dir, "final.pt")
    model, head = load_model(ckpt.load(path, map_location=dev), dev)
    datasets, report = load_data(cfg["data"], log=log)
    if split not in datasets:
        raise ValueError(f"split must be one of {sorted(datasets)}, got {split!r}")
    res = evaluate_model(model, datasets[split], dev, head,
                         batch_size=int(cfg.get("train", {}).get("eval_batch_size", 64)),
                         threshold=cfg.get("eval", {}).get("threshold"), keep_predictions=True)
    res["split"], res["checkpoint"] = split, path
    save_metrics(res, run_dir, split)
    res.pop("predictions", None)
    return res
