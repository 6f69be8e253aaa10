"""Command line: ``hdaf {train,evaluate,experiment,make-data,info}`` (also ``python -m hdaf``).

Configuration: a YAML/JSON file (``--config``) over the built-in defaults, then ``--set key=value``
overrides (dotted keys, YAML values), then the shortcuts (``--data-dir``, ``--run-dir``, ...).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import List, Optional


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", "-c", help="YAML or JSON config file (over the built-in defaults)")
    p.add_argument("--set", "-s", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. --set train.stages.dcca.epochs=3 (repeatable)")
    p.add_argument("--data-dir", help="a folder of CMU-MOSEI .csd files (sets data.source=csd); "
                                      "without it the config's source is used (default: synthetic)")
    p.add_argument("--pkl", help="MulT-style .pkl tensors (sets data.source=pkl)")
    p.add_argument("--run-dir", help="output folder (config key run_dir)")
    p.add_argument("--device", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--seed", type=int)


def _config(args) -> dict:
    from .training.config import get_config

    cfg = get_config(args.config, args.overrides)
    if args.data_dir:
        cfg["data"]["source"], cfg["data"]["dir"] = "csd", args.data_dir
    if args.pkl:
        cfg["data"]["source"], cfg["data"]["path"] = "pkl", args.pkl
    if args.run_dir:
        cfg["run_dir"] = args.run_dir
    if args.device:
        cfg["device"] = args.device
    if args.seed is not None:
        cfg["seed"] = args.seed
    return cfg


def _fmt_info(info, indent=0) -> str:
    pad = "  " * indent
    lines = []
    if isinstance(info, dict):
        width = max((len(str(k)) for k in info), default=0)
        for k, v in info.items():
            if isinstance(v, dict):
                lines.append(f"{pad}{k}:")
                lines.append(_fmt_info(v, indent + 1))
            else:
                if isinstance(v, (list, tuple)):
                    v = ", ".join(map(str, v)) if v else "(none)"
                elif isinstance(v, bool):
                    v = "yes" if v else "no"
                lines.append(f"{pad}{str(k) + ':':<{width + 1}} {v}")
    else:
        lines.append(f"{pad}{info}")
    return "\n".join(lines)


# The distributions whose versions decide what gets built, what the tests see and the main job's
# figures; `hdaf info` prints them so that a change in the registry shows in any log.
KEY_PACKAGES = ("pip", "setuptools", "torch", "triton", "numpy", "scipy", "scikit-learn", "h5py",
                "transformers", "kernels", "huggingface-hub", "tokenizers", "safetensors",
                "pytest", "pytest-benchmark", "hypothesis", "ninja", "cmu-multimodal-sdk")


def package_versions() -> dict:
    """Python's version and each of :data:`KEY_PACKAGES`' installed version ("-" if absent)."""
    import importlib.metadata
    import platform

    out = {"python": platform.python_version()}
    for name in KEY_PACKAGES:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = "-"
    return out


def cmd_info(args) -> int:
    import hdaf

    print(f"hdaf {getattr(hdaf, '__version__', '?')}")
    try:
        info = hdaf.backends()
    except Exception as exc:
        print(f"hdaf.backends() failed: {type(exc).__name__}: {exc}")
        return 1
    info = dict(info, packages=package_versions())
    if args.json:
        print(json.dumps(info, indent=2, default=str))
    else:
        print(_fmt_info(info))
    return 0


def cmd_train(args) -> int:
    from .training.trainer import Interrupted, train

    cfg = _config(args)
    try:
        train(cfg, resume=args.resume, overwrite=args.overwrite)
    except Interrupted as exc:
        print(f"[train] {exc}", file=sys.stderr)
        return 3
    return 0


def cmd_experiment(args) -> int:
    from .training.experiment import run_experiment

    cfg = _config(args)
    seeds = None
    if args.seeds:
        from .training.multiseed import parse_seeds

        seeds = parse_seeds(args.seeds)
    run_experiment(cfg, only=args.only, seeds=seeds)
    return 0


def cmd_evaluate(args) -> int:
    from .training.evaluate import evaluate_run
    from .training.config import parse_override, set_key

    over = {}
    if args.data_dir:
        over.update({"source": "csd", "dir": args.data_dir})
    for o in args.overrides:
        k, v = parse_override(o)
        if not k.startswith("data."):
            raise SystemExit(f"evaluate --set only takes data.* keys, got {k}")
        set_key(over, k[len("data."):], v)
    res = evaluate_run(args.run_dir, split=args.split, data_overrides=over,
                       checkpoint=args.checkpoint, device=args.device or "auto")
    from .training.report import build_table, to_markdown

    rows = [("Fused", res["fused"], None)] + [(f"{m} only", v, None) for m, v in res["unimodal"].items()]
    print(to_markdown(build_table([(f"{args.run_dir} ({args.split})", rows)])))
    print(f"\nsaved {os.path.join(args.run_dir, f'metrics_{args.split}.json')}")
    return 0


def cmd_make_data(args) -> int:
    from .data.synthetic import generate_synthetic
    from .training.config import parse_override

    over = dict(parse_override(o) for o in args.overrides)
    paths = generate_synthetic(args.out, **over)
    for k, v in paths.items():
        print(f"{k:>7}: {v}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="hdaf", description="Hierarchical Delta-Attention multimodal "
                                 "fusion: data, training, evaluation")
    sub = ap.add_subparsers(dest="command", required=True)
    p = sub.add_parser("train", help="train one model (staged per Table 1, or end to end)")
    _add_config_args(p)
    p.add_argument("--resume", action="store_true", help="continue the run in run_dir")
    p.add_argument("--overwrite", action="store_true", help="discard an existing run in run_dir")
    p.set_defaults(fn=cmd_train)
    p = sub.add_parser("experiment", help="the main job: every Table-2 row, then the table")
    _add_config_args(p)
    p.add_argument("--only", nargs="+", help="run only these experiment.runs entries")
    p.add_argument("--seeds", help="run every entry once per seed, e.g. 0,1,2,3,4 or 0-4, and report "
                                   "mean ± sd, 95%% intervals and paired tests (RUN_DIR/seed<s>/...); "
                                   "default: experiment.seeds, else one run with --seed")
    p.set_defaults(fn=cmd_experiment)
    p = sub.add_parser("evaluate", help="evaluate a trained run (final.pt) on a split")
    p.add_argument("--run-dir", required=True)
    p.add_argument("--split", default="test", choices=["train", "valid", "test"])
    p.add_argument("--checkpoint", help="another weights file (default: RUN_DIR/final.pt)")
    p.add_argument("--data-dir", help="evaluate on this .csd folder (same preprocessing)")
    p.add_argument("--set", "-s", dest="overrides", action="append", default=[],
                   help="data.* overrides, e.g. --set data.mode=unaligned")
    p.add_argument("--device")
    p.set_defaults(fn=cmd_evaluate)
    p = sub.add_parser("make-data", help="write the synthetic MOSEI-shaped .csd dataset")
    p.add_argument("--out", required=True)
    p.add_argument("--set", "-s", dest="overrides", action="append", default=[],
                   help="generator parameters, e.g. --set n_speakers=20")
    p.set_defaults(fn=cmd_make_data)
    p = sub.add_parser("info", help="what was compiled and what each device uses")
    p.add_argument("--json", action="store_true")
    p.set_defaults(fn=cmd_info)
    return ap


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.fn(args) or 0)
    except (FileNotFoundError, FileExistsError, ValueError, KeyError, RuntimeError, ImportError) as exc:
        if os.environ.get("HDAF_TRACEBACK"):
            raise
        print(f"hdaf {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
