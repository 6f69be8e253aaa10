"""The training loop: the paper's stage-wise schedule (Table 1) or end-to-end, Adam, DDP, resume.

Run folder layout (``run_dir``)::

    config.yaml                the resolved config
    data_report.{json,txt}     every dropped / truncated segment, word and frame
    checkpoints/last.pt        model + optimizer + RNG + data-order state (for --resume)
    checkpoints/stage_<s>.pt   the weights at the end of stage s (loaded by the next stage)
    final.pt                   final weights + model config (what ``hdaf evaluate`` loads)
    history.json               per-epoch train / valid loss and valid metrics
    ranks/rank<r>.json         each rank's fingerprint of its final weights (DDP check)
    metrics_<split>.json       evaluation (fused head and each unimodal head)
    curves.png                 training curves

Resume is bitwise: the checkpoint holds the model, the optimizer, every RNG state (per rank) and
the data order (epoch, batches done; epoch orders come from ``seed + epoch`` generators), so a
resumed run replays exactly the batches and random draws the uninterrupted run would have.
"""
from __future__ import annotations

import json
import os
import sys
import time
from typing import Dict, List, Optional

import torch
import torch.nn.functional as F

from ..data.dataset import ResumableSampler, make_loader, to_device
from ..data.loading import load_data
from . import checkpoint as ckpt
from . import distributed as D
from . import numerics
from .config import dump
from .evaluate import evaluate_model, save_metrics
from .models_api import build, head_of, model_meta, stage_names, stage_param_groups

STAGES = ("unimodal", "dcca", "fusion")


class Interrupted(RuntimeError):
    """Raised by ``train.stop_after_steps`` after saving a checkpoint (simulated crash)."""


def classification_loss(logits: torch.Tensor, labels: torch.Tensor, head: str) -> torch.Tensor:
    """softmax head: cross-entropy on the dominant emotion (ties -> lowest index), rows without
    any emotion skipped; sigmoid head: binary cross-entropy on presence (intensity > 0)."""
    if head == "sigmoid":
        return F.binary_cross_entropy_with_logits(logits, (labels > 0).to(logits.dtype))
    has = labels.max(dim=1).values > 0
    if not bool(has.any()):
        return logits.sum() * 0.0
    target = labels.argmax(dim=1)
    return F.cross_entropy(logits[has], target[has])


def stage_loss(stage: str, out: dict, labels: torch.Tensor, head: str, e2e: dict) -> torch.Tensor:
    if stage == "unimodal":
        return sum(classification_loss(v, labels, head) for v in out["unimodal_logits"].values())
    if stage == "dcca":
        return out["cca_loss"]
    loss = classification_loss(out["logits"], labels, head)
    if stage == "end_to_end":
        if out.get("unimodal_logits") and e2e.get("unimodal_weight", 0):
            loss = loss + e2e["unimodal_weight"] * sum(
                classification_loss(v, labels, head) for v in out["unimodal_logits"].values())
        if out.get("cca_loss") is not None and e2e.get("cca_weight", 0):
            loss = loss + e2e["cca_weight"] * out["cca_loss"]
    return loss


def _log_factory(info: D.DistInfo, run_dir: str):
    path = os.path.join(run_dir, "train.log")

    def log(msg: str) -> None:
        if not info.is_main:
            return
        print(msg, flush=True)
        with open(path, "a") as f:
            f.write(msg + "\n")
    return log


def _stage_cfg(cfg: dict, stage: str) -> dict:
    if stage == "end_to_end":
        return dict(cfg["train"]["end_to_end"])
    return dict(cfg["train"]["stages"][stage])


def _write_json(path: str, obj) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2, default=float)
    os.replace(tmp, path)


def train(cfg: dict, resume: bool = False, overwrite: bool = False, log=None) -> dict:
    """Train per ``cfg``; returns a summary (paths, metrics).  See the module docstring."""
    prev = (torch.are_deterministic_algorithms_enabled(),
            torch.is_deterministic_algorithms_warn_only_enabled())
    try:
        with numerics.pinned_threads(cfg.get("threads")):
            return _train(cfg, resume, overwrite, log)
    finally:  # the flag is process-wide: leave it as found
        torch.use_deterministic_algorithms(prev[0], warn_only=prev[1])


def _train(cfg: dict, resume: bool, overwrite: bool, log) -> dict:
    info = D.init(cfg.get("device", "auto"))
    run_dir = cfg["run_dir"]
    ckdir = os.path.join(run_dir, "checkpoints")
    last_path = os.path.join(ckdir, "last.pt")
    if info.is_main:
        os.makedirs(ckdir, exist_ok=True)
        if os.path.exists(last_path) and not resume:
            if not overwrite:
                raise FileExistsError(f"{run_dir} already holds a run (checkpoints/last.pt); pass "
                                      "--resume to continue it or --overwrite to start over")
            for name in os.listdir(ckdir):
                os.unlink(os.path.join(ckdir, name))
            for name in ("final.pt", "history.json", "train.log"):
                if os.path.exists(os.path.join(run_dir, name)):
                    os.unlink(os.path.join(run_dir, name))
    D.barrier(info)
    log = log or _log_factory(info, run_dir)
    tcfg = cfg["train"]
    seed = int(cfg.get("seed", 0))
    if tcfg.get("deterministic", True):
        torch.use_deterministic_algorithms(True, warn_only=True)
    ckpt.seed_everything(seed + info.rank)

    datasets, report = load_data(cfg["data"], log=log)
    if info.is_main:
        log(report.summary())
        report.save(run_dir)
        dump(cfg, os.path.join(run_dir, "config.yaml"))
    dims = datasets["train"].dims()
    torch.manual_seed(seed)  # identical initial weights on every rank
    model, model_cfg = build(cfg["model"], dims)
    model.to(info.device)
    head = head_of(model, cfg["model"])
    stages = stage_names(model, tcfg.get("schedule", "staged"))
    from hdaf.dispatch import resolve
    from hdaf.nn.delta_attention import DeltaAttention

    attn = sorted({resolve(m.backend, torch.device(info.device)) for m in model.modules()
                   if isinstance(m, DeltaAttention)})
    log(f"[train] model={cfg['model']['name']} params={sum(p.numel() for p in model.parameters()):,} "
        f"device={info.device} world_size={info.world_size} stages={stages} head={head} "
        f"delta_attention_backend={','.join(attn) or 'none'}")
    if str(info.device).startswith("cpu"):
        log("[train] cpu numerics: " + ", ".join(f"{k}={v}" for k, v in numerics.describe().items()))

    state = {"stage_index": 0, "epoch": 0, "batch": 0, "global_step": 0, "history": [],
             "loss_sum": 0.0, "loss_count": 0, "best": None}
    opt_state = None
    restored = False
    if resume and os.path.exists(last_path):
        blob = ckpt.load(last_path, map_location=info.device)
        model.load_state_dict(blob["model"])
        state = blob["state"]
        opt_state = blob.get("optimizer")
        rngs = blob.get("rng") or []
        if len(rngs) == info.world_size:
            ckpt.set_rng_state(rngs[info.rank])
            restored = True
        else:
            log(f"[train] warning: checkpoint has RNG states of {len(rngs)} ranks, now "
                f"{info.world_size}: reseeding (the resumed run will not be bitwise identical)")
            ckpt.seed_everything(seed + info.rank + 7919 * state["global_step"])
        log(f"[train] resumed from {last_path}: stage {stages[state['stage_index']] if state['stage_index'] < len(stages) else 'done'}, "
            f"epoch {state['epoch']}, batch {state['batch']}, step {state['global_step']}")
    elif resume:
        log(f"[train] --resume: no checkpoint in {ckdir}, starting from scratch")
    if not restored and not (resume and os.path.exists(last_path)):
        ckpt.seed_everything(seed + info.rank)

    def save_last(optimizer) -> None:
        rngs = D.all_gather_object(info, ckpt.rng_state())
        if info.is_main:
            ckpt.atomic_save({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                              "state": state, "rng": rngs, "model_config": model_cfg,
                              "model_name": cfg["model"]["name"], "dims": dims}, last_path)
        D.barrier(info)

    stop_after = tcfg.get("stop_after_steps")
    every = int(tcfg.get("checkpoint_every_steps") or 0)
    progress = bool(tcfg.get("progress", True)) and info.is_main
    t_start = time.time()

    while state["stage_index"] < len(stages):
        stage = stages[state["stage_index"]]
        scfg = _stage_cfg(cfg, stage)
        fresh_stage = state["epoch"] == 0 and state["batch"] == 0
        if fresh_stage and state["stage_index"] > 0:
            prev = os.path.join(ckdir, f"stage_{stages[state['stage_index'] - 1]}.pt")
            model.load_state_dict(ckpt.load(prev, map_location=info.device)["model"])
            log(f"[train] stage {stage}: loaded the previous stage's weights from {prev}")
        groups = stage_param_groups(model, stage, scfg)
        trainable = {id(p) for g in groups for p in g["params"]}
        for p in model.parameters():
            p.requires_grad_(id(p) in trainable)
        optimizer = torch.optim.Adam(groups, lr=scfg["lr"], weight_decay=scfg.get("weight_decay", 0.0))
        if opt_state is not None and not fresh_stage:
            optimizer.load_state_dict(opt_state)
        opt_state = None
        net = model
        if info.enabled:
            net = torch.nn.parallel.DistributedDataParallel(
                model, device_ids=[info.device.index] if info.device.type == "cuda" else None,
                find_unused_parameters=bool(tcfg.get("find_unused_parameters", True)))
        sampler = ResumableSampler(len(datasets["train"]), int(scfg["batch_size"]),
                                   seed=seed * 1000 + 17 * state["stage_index"],
                                   rank=info.rank, world_size=info.world_size)
        loader = make_loader(datasets["train"], sampler, num_workers=cfg["data"].get("num_workers", 0))
        n_params = sum(p.numel() for p in model.parameters() if p.requires_grad)
        log(f"[train] stage {stage}: epochs={scfg['epochs']} lr={scfg['lr']} batch_size="
            f"{scfg['batch_size']} (per process) weight_decay={scfg.get('weight_decay', 0.0)} "
            f"trainable params={n_params:,}")
        while state["epoch"] < int(scfg["epochs"]):
            epoch = state["epoch"]
            sampler.set_epoch(epoch, start_batch=state["batch"])
            model.train()
            bar = None
            if progress:
                from tqdm import tqdm
                bar = tqdm(total=sampler.num_batches(), initial=state["batch"], leave=False,
                           desc=f"{cfg['model']['name']}:{stage} ep {epoch + 1}/{scfg['epochs']}",
                           file=sys.stderr, dynamic_ncols=True, mininterval=1.0)
            for batch in loader:
                batch = to_device(batch, info.device)
                out = net(batch)
                loss = stage_loss(stage, out, batch["labels"], head, cfg["train"]["end_to_end"])
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                if tcfg.get("grad_clip"):
                    torch.nn.utils.clip_grad_norm_([p for g in groups for p in g["params"]],
                                                   float(tcfg["grad_clip"]))
                optimizer.step()
                state["batch"] += 1
                state["global_step"] += 1
                state["loss_sum"] += float(loss.detach())
                state["loss_count"] += 1
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(loss=f"{state['loss_sum'] / state['loss_count']:.4f}", refresh=False)
                if every and state["global_step"] % every == 0:
                    save_last(optimizer)
                if stop_after is not None and state["global_step"] >= int(stop_after):
                    save_last(optimizer)
                    if bar is not None:
                        bar.close()
                    raise Interrupted(f"stopped after {state['global_step']} steps "
                                      "(train.stop_after_steps); continue with --resume")
            if bar is not None:
                bar.close()
            train_loss = D.all_reduce_mean(info, [state["loss_sum"] / max(1, state["loss_count"])])[0]
            val = evaluate_model(model, datasets["valid"], info.device, head,
                                 batch_size=int(tcfg.get("eval_batch_size", 64)),
                                 loss_fn=lambda o, y: stage_loss(stage, o, y, head, cfg["train"]["end_to_end"]))
            entry = {"stage": stage, "epoch": epoch + 1, "step": state["global_step"],
                     "train_loss": train_loss, "valid_loss": val["loss"],
                     "valid_acc6": val["fused"]["acc6"], "valid_f1_6": val["fused"]["f1_6"],
                     "time_s": round(time.time() - t_start, 2)}
            if stage == "unimodal":
                entry["valid_unimodal_acc6"] = {m: v["acc6"] for m, v in val["unimodal"].items()}
            state["history"].append(entry)
            log(f"[train] {stage} epoch {epoch + 1}/{scfg['epochs']}: train_loss={train_loss:.4f} "
                f"valid_loss={val['loss']:.4f} valid_acc6={val['fused']['acc6']:.3f} "
                f"valid_f1={val['fused']['f1_6']:.3f}"
                + (" unimodal_acc6=" + ",".join(f"{m}:{a:.3f}" for m, a in entry["valid_unimodal_acc6"].items())
                   if stage == "unimodal" else ""))
            if tcfg.get("select", "last") == "best_valid":
                if state["best"] is None or val["loss"] < state["best"]["loss"]:
                    state["best"] = {"loss": val["loss"], "epoch": epoch + 1}
                    if info.is_main:
                        ckpt.atomic_save({"model": model.state_dict()}, os.path.join(ckdir, f"best_{stage}.pt"))
            state["epoch"] += 1
            state["batch"] = 0
            state["loss_sum"], state["loss_count"] = 0.0, 0
            save_last(optimizer)
        if tcfg.get("select", "last") == "best_valid" and state["best"] is not None:
            model.load_state_dict(ckpt.load(os.path.join(ckdir, f"best_{stage}.pt"), map_location=info.device)["model"])
            log(f"[train] stage {stage}: kept the best-valid weights (epoch {state['best']['epoch']})")
        if info.is_main:
            ckpt.atomic_save({"model": model.state_dict(), "stage": stage, "model_config": model_cfg,
                              "model_name": cfg["model"]["name"], "dims": dims},
                             os.path.join(ckdir, f"stage_{stage}.pt"))
        state["stage_index"] += 1
        state["epoch"] = state["batch"] = 0
        state["best"] = None
        save_last(optimizer)
        del net

    for p in model.parameters():
        p.requires_grad_(True)
    final = os.path.join(run_dir, "final.pt")
    meta = model_meta(model, cfg["model"], model_cfg, dims, head)
    if info.is_main:
        ckpt.atomic_save({"model": model.state_dict(), **meta}, final)
        _write_json(os.path.join(run_dir, "history.json"), state["history"])
    os.makedirs(os.path.join(run_dir, "ranks"), exist_ok=True)
    _write_json(os.path.join(run_dir, "ranks", f"rank{info.rank}.json"),
                {"rank": info.rank, "world_size": info.world_size,
                 "fingerprint": ckpt.state_fingerprint(model.state_dict())})
    summary = {"run_dir": run_dir, "final": final, "train_seconds": round(time.time() - t_start, 2),
               "world_size": info.world_size}
    if info.is_main:
        split = cfg.get("eval", {}).get("split", "test")
        res = evaluate_model(model, datasets[split], info.device, head,
                             batch_size=int(tcfg.get("eval_batch_size", 64)),
                             threshold=cfg.get("eval", {}).get("threshold"))
        res["split"] = split
        save_metrics(res, run_dir, split)
        summary["metrics"] = res
        try:
            from .report import plot_curves
            plot_curves({cfg["model"]["name"]: state["history"]}, os.path.join(run_dir, "curves.png"))
        except Exception as exc:  # plotting must never fail a run
            log(f"[train] could not draw curves: {exc}")
        log(f"[train] done in {summary['train_seconds']}s: {split} acc6={res['fused']['acc6']:.3f} "
            f"f1={res['fused']['f1_6']:.3f}; weights {final}")
    D.barrier(info)
    D.shutdown(info)
    return summary
