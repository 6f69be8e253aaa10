"""The seam between training and ``hdaf.models``: build, stages, parameter groups, reload.

``model.name`` is ``"hdaf"`` or ``"mult"`` (``hdaf.models.build_model``), or ``"pkg.mod:factory"``
for a custom model, called as ``factory(config: dict, dims: dict) -> nn.Module``.
"""
from __future__ import annotations

import importlib
from typing import Dict, List, Tuple

import torch

STAGES = ("unimodal", "dcca", "fusion")
# staged: Table 1's stage-wise training; end_to_end: one joint stage; staged+end_to_end: the stages,
# then a joint fine-tuning stage of every parameter (train.end_to_end, with its unimodal and CCA
# loss weights) starting from the stages' weights
SCHEDULES = ("staged", "end_to_end", "staged+end_to_end")
# Names a model config may use for the input feature sizes.
_DIM_KEYS = {"text": ("text_dim", "d_text", "dim_text", "text_in_dim", "text_input_dim", "orig_d_l"),
             "audio": ("audio_dim", "d_audio", "dim_audio", "audio_in_dim", "audio_input_dim", "orig_d_a"),
             "vision": ("vision_dim", "d_vision", "dim_vision", "vision_in_dim", "vision_input_dim", "orig_d_v")}


def _config_class(name: str):
    try:
        import hdaf.models as M
    except ImportError:
        return None
    return getattr(M, {"hdaf": "HDAFConfig", "mult": "MulTConfig"}.get(name, ""), None)


def _with_dims(name: str, config: dict, dims: Dict[str, int]) -> dict:
    """Put the data's feature sizes into the model config under the keys the config knows."""
    config = dict(config)
    cls = _config_class(name)
    known = None
    if cls is not None:
        try:
            known = set(cls().to_dict())
        except Exception:
            known = None
    if known is None:
        return config
    if "input_dims" in known and "input_dims" not in config:
        config["input_dims"] = dict(dims)
    for m, keys in _DIM_KEYS.items():
        for k in keys:
            if k in known and k not in config:
                config[k] = int(dims[m])
    return config


def build(model_section: dict, dims: Dict[str, int]) -> Tuple[torch.nn.Module, dict]:
    name = model_section["name"]
    config = dict(model_section.get("config") or {})
    if ":" in name:
        mod, fn = name.split(":", 1)
        model = getattr(importlib.import_module(mod), fn)(config, dims)
        return model, config
    from hdaf.models import build_model

    config = _with_dims(name, config, dims)
    model = build_model(name, config)
    cfg_obj = getattr(model, "config", None)
    if cfg_obj is not None and hasattr(cfg_obj, "to_dict"):
        config = cfg_obj.to_dict()
    return model, config


def head_of(model: torch.nn.Module, model_section: dict) -> str:
    cfg_obj = getattr(model, "config", None)
    head = getattr(cfg_obj, "head", None) if cfg_obj is not None else None
    if head is None and isinstance(cfg_obj, dict):
        head = cfg_obj.get("head")
    return head or (model_section.get("config") or {}).get("head", "softmax")


def stage_names(model: torch.nn.Module, schedule: str) -> List[str]:
    if schedule not in SCHEDULES:
        raise ValueError(f"train.schedule must be one of {SCHEDULES}, got {schedule!r}")
    if schedule == "end_to_end" or not hasattr(model, "stage_parameters"):
        return ["end_to_end"]
    if schedule == "staged+end_to_end":
        return stage_names(model, "staged") + ["end_to_end"]
    out = []
    for s in STAGES:
        try:
            if list(model.stage_parameters(s)):
                out.append(s)
        except (KeyError, ValueError, NotImplementedError):
            pass
    return out or ["end_to_end"]


def _modality_params(model, m):
    for attempt in (lambda: model.stage_parameters("unimodal", modality=m),
                    lambda: model.stage_parameters(f"unimodal_{m}"),
                    lambda: model.modality_parameters(m)):
        try:
            ps = list(attempt())
            if ps:
                return ps
        except (TypeError, KeyError, ValueError, AttributeError, NotImplementedError):
            continue
    return None


def stage_param_groups(model: torch.nn.Module, stage: str, scfg: dict) -> List[dict]:
    """Adam parameter groups of a stage; the unimodal stage gets Table 1's lr per modality when
    the model can list a modality's parameters.  ``delta_lr_scale`` (default 1) gives the delta
    term's own weights (``rpe``, ``delta_proj``) their group's learning rate times that factor."""
    groups = _stage_param_groups(model, stage, scfg)
    scale = float(scfg.get("delta_lr_scale") or 1.0)
    if scale == 1.0:
        return groups
    delta = {id(p) for n, p in model.named_parameters()
             if n.endswith(".rpe") or ".delta_proj." in n}
    out = []
    for g in groups:
        lr = float(g.get("lr", scfg["lr"]))
        rest = [p for p in g["params"] if id(p) not in delta]
        mine = [p for p in g["params"] if id(p) in delta]
        if rest:
            out.append({**g, "params": rest})
        if mine:
            out.append({**g, "params": mine, "lr": lr * scale,
                        "name": f"{g.get('name', 'all')}:delta"})
    return out


def _stage_param_groups(model: torch.nn.Module, stage: str, scfg: dict) -> List[dict]:
    if stage == "end_to_end":
        return [{"params": [p for p in model.parameters()]}]
    params = list(model.stage_parameters(stage))
    per = scfg.get("lr_per_modality") if stage == "unimodal" else None
    if per:
        groups, used = [], set()
        for m, lr in per.items():
            ps = _modality_params(model, m)
            if ps is None:
                groups = None
                break
            ps = [p for p in ps if id(p) not in used]
            used.update(id(p) for p in ps)
            groups.append({"params": ps, "lr": float(lr), "name": m})
        if groups is not None:
            rest = [p for p in params if id(p) not in used]
            if rest:
                groups.append({"params": rest, "name": "shared"})
            return groups
    return [{"params": params}]


def model_meta(model, model_section: dict, model_cfg: dict, dims: dict, head: str) -> dict:
    return {"model_name": model_section["name"], "model_config": model_cfg, "dims": dims, "head": head}


def load_model(blob: dict, device) -> Tuple[torch.nn.Module, str]:
    """Rebuild the model of a ``final.pt`` / ``stage_*.pt`` blob and load its weights."""
    config = dict(blob["model_config"])
    if blob["model_name"] == "hdaf" and "fusion_delta" not in config:
        config["fusion_delta"] = True  # saved before the switch existed: trained with the delta term there
    model, _ = build({"name": blob["model_name"], "config": config}, blob["dims"])
    model.load_state_dict(blob["model"])
    model.to(device).eval()
    return model, blob.get("head") or head_of(model, {"config": blob["model_config"]})
