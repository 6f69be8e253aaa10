"""Run configuration: defaults, YAML/JSON files, ``--set key=value`` overrides.

A config is a nested dict; ``configs/*.yaml`` in the repository are copies of these defaults
with the values they change.  ``--set a.b.c=VALUE`` parses ``VALUE`` as YAML (``3``, ``1e-4``,
``true``, ``[1, 2]``, ``{x: 1}``), so types come out right.
"""
from __future__ import annotations

import copy
import json
import os
from typing import Any, Dict, Iterable, Optional

import re

import yaml


class _Loader(yaml.SafeLoader):
    """SafeLoader that also reads ``1e-4`` (no dot) as a float, as YAML 1.2 does."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
    |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
    |\.[0-9_]+(?:[eE][-+][0-9]+)?
    |[-+]?\.(?:inf|Inf|INF)
    |\.(?:nan|NaN|NAN))$""", re.X),
    list("-+0123456789."))


def yaml_load(text: str):
    return yaml.load(text, Loader=_Loader)

# Table 1 of the paper (Adam): epochs, learning rate, mini-batch size, weight decay per module.
PAPER_SCHEDULE = {
    "unimodal": {"epochs": 10, "lr": 1e-5, "batch_size": 8, "weight_decay": 1e-4,
                 "lr_per_modality": {"text": 1e-6, "audio": 1e-5, "vision": 1e-5}},
    "dcca": {"epochs": 100, "lr": 2e-4, "batch_size": 4, "weight_decay": 1e-6},
    "fusion": {"epochs": 5, "lr": 1e-5, "batch_size": 8, "weight_decay": 1e-6},
}

DEFAULTS: Dict[str, Any] = {
    "seed": 0,
    "run_dir": "runs/default",
    "device": "auto",          # auto | cpu | cuda | cuda:N
    "threads": None,           # torch intra-op threads while training; an int pins them, which
                               # CPU results depend on (hdaf.training.numerics); null: torch's default
    "data": {
        "source": "synthetic",  # synthetic | csd | pkl
        "dir": "data/synthetic_mosei",
        "path": None,           # the .pkl for source=pkl
        "mode": "aligned",      # aligned | unaligned
        "aligned_combine": "stack",  # stack | average
        "max_frames_per_word": 8,
        "aligned_span": "word",      # word (the SDK rule: frames inside the word) | to_next_word (a word spans to the next one: no frame dropped between words)
        "max_len": {"text": 50, "audio": 200, "vision": 150, "aligned": 200},
        "split": "auto",        # auto | standard | random | path/to/splits.json
        "split_seed": 0,
        "split_fractions": [0.8, 0.1, 0.1],
        "visual": "facet",      # facet (FACET 4.2) | openface (OpenFace 2)
        "files": {},            # role -> file name overrides (words, text, audio, vision, labels)
        "remove_sp": True,
        "strict": False,
        "normalize": "none",    # none | center | standardize | center_scale: per segment and feature (hdaf.data.normalize)
        "max_segments": None,
        "cache_dir": None,
        "synthetic": {},        # overrides of hdaf.data.synthetic.DEFAULTS
        "num_workers": 0,
    },
    "model": {
        "name": "hdaf",         # hdaf | mult
        "config": {},           # passed to hdaf.models.build_model (HDAFConfig / MulTConfig)
    },
    "train": {
        "schedule": "staged",   # staged (Table 1: unimodal -> dcca -> fusion) | end_to_end | staged+end_to_end (the stages, then joint fine-tuning)
        "stages": copy.deepcopy(PAPER_SCHEDULE),
        "end_to_end": {"epochs": 10, "lr": 1e-4, "batch_size": 16, "weight_decay": 1e-5,
                       "unimodal_weight": 0.5, "cca_weight": 0.1},
        "grad_clip": 1.0,
        "select": "last",       # last | best_valid (weights kept at the end of each stage)
        "checkpoint_every_steps": 0,   # 0: at every epoch end only
        "stop_after_steps": None,      # simulate an interruption (tests, debugging)
        "eval_batch_size": 64,
        "progress": True,
        "find_unused_parameters": True,
        "deterministic": True,
    },
    "eval": {"split": "test", "threshold": None},
}


def deep_update(base: dict, other: dict) -> dict:
    for k, v in other.items():
        if isinstance(v, dict) and isinstance(base.get(k), dict):
            deep_update(base[k], v)
        else:
            base[k] = copy.deepcopy(v)
    return base


def load_file(path: str) -> dict:
    if not os.path.exists(path):
        raise FileNotFoundError(f"config file {path} not found")
    with open(path) as f:
        text = f.read()
    try:
        d = json.loads(text) if path.endswith(".json") else yaml_load(text)
    except Exception as exc:
        raise ValueError(f"config file {path}: cannot parse ({type(exc).__name__}: {exc})") from None
    if d is None:
        return {}
    if not isinstance(d, dict):
        raise ValueError(f"config file {path}: top level must be a mapping, got {type(d).__name__}")
    return d


def set_key(cfg: dict, dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    cur = cfg
    for k in keys[:-1]:
        if cur.get(k) is None:
            cur[k] = {}
        if not isinstance(cur[k], dict):
            raise ValueError(f"--set {dotted}: {k!r} is not a section")
        cur = cur[k]
    cur[keys[-1]] = value


def parse_override(text: str):
    if "=" not in text:
        raise ValueError(f"--set expects key=value, got {text!r}")
    key, raw = text.split("=", 1)
    try:
        value = yaml_load(raw) if raw != "" else ""
    except Exception:
        value = raw
    return key.strip(), value


def get_config(path: Optional[str] = None, overrides: Iterable[str] = (),
               base: Optional[dict] = None) -> dict:
    cfg = copy.deepcopy(base if base is not None else DEFAULTS)
    if path:
        deep_update(cfg, load_file(path))
    for o in overrides or ():
        k, v = parse_override(o)
        set_key(cfg, k, v)
    return cfg


def dump(cfg: dict, path: str) -> None:
    with open(path, "w") as f:
        yaml.safe_dump(cfg, f, sort_keys=False)
