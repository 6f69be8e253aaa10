"""Context-parallel delta attention on this machine: time and peak memory per rank of
``hdaf.distributed.ring_delta_attention`` at world sizes 1 and 2 (gloo, one thread per rank),
forward and forward+backward, for T up to 32k under a causal window.

    python bench/bench_context_parallel.py --out bench/results/context_parallel_cpu.json
    python bench/bench_context_parallel.py --summary bench/results/context_parallel_cpu.json

Case: B=1, H=4, Hkv=4, D=32, Dr=16, max_distance=(16, 0) (R=17), window=(256, 0) with
causal, float32, zigzag layout, the ``cpu`` backend; T in {2048, 8192, 32768}. Each rank runs
one torch thread (so world size 2 uses both cores of a 2-core machine, world size 1 one).
Per configuration: the median and spread of ``--repeats`` timed calls after one warm-up, and the
largest peak extra memory over the ranks (the resident-set high-water mark above the level
before the call, bench/_memory.py). Both include the ring's transfers; at world size 1 there
are none. The rows are data; the README quotes the table printed by ``--summary``.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _memory import peak_extra_bytes  # noqa: E402

CASE = dict(B=1, H=4, D=32, Dr=16, max_distance=(16, 0), window=(256, 0), causal=True,
            dtype="float32", layout="zigzag", backend="cpu")


def _inputs(T, rank, world):
    from hdaf.distributed import shard
    g = torch.Generator().manual_seed(0)
    B, H, D, Dr = CASE["B"], CASE["H"], CASE["D"], CASE["Dr"]
    R = sum(CASE["max_distance"]) + 1
    full = [torch.randn(B, H, T, D, generator=g) for _ in range(3)]
    x, w = torch.randn(B, T, Dr, generator=g), torch.randn(Dr, R, generator=g) * 0.1
    parts = [shard(t, 2, None, CASE["layout"]) for t in full] + [shard(x, 1, None, CASE["layout"])]
    return [t.requires_grad_(True) for t in parts] + [w.requires_grad_(True)]


def _rank(rank, world, store_path, Ts, repeats, out_path):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", store=dist.FileStore(store_path, world), rank=rank,
                            world_size=world, timeout=datetime.timedelta(minutes=5))
    from hdaf.distributed import ring_delta_attention
    options = {k: CASE[k] for k in ("max_distance", "window", "causal", "layout", "backend")}
    rows = []
    for T in Ts:
        q, k, v, x, w = _inputs(T, rank, world)

        def fwd():
            with torch.no_grad():
                return ring_delta_attention(q, k, v, x, w, group=None, **options)

        def fwd_bwd():
            out = ring_delta_attention(q, k, v, x, w, group=None, **options)
            out.sum().backward()

        for mode, fn in (("fwd", fwd), ("fwd+bwd", fwd_bwd)):
            fn()  # warm-up
            times = []
            for _ in range(repeats):
                dist.barrier()
                t0 = time.perf_counter()
                fn()
                times.append(time.perf_counter() - t0)
            dist.barrier()
            peak = peak_extra_bytes(fn, "cpu")
            rows.append(dict(world=world, T=T, mode=mode, rank=rank, times_s=times, peak_bytes=peak))
    gathered = [None] * world
    dist.all_gather_object(gathered, rows)
    if rank == 0:
        with open(out_path, "w") as f:
            json.dump([r for part in gathered for r in part], f)
    dist.destroy_process_group()


def run(Ts, worlds, repeats):
    rows = []
    for world in worlds:
        with tempfile.TemporaryDirectory() as tmp:
            out = os.path.join(tmp, "rows.json")
            mp.spawn(_rank, args=(world, os.path.join(tmp, "store"), Ts, repeats, out),
                     nprocs=world)
            with open(out) as f:
                raw = json.load(f)
        for T in Ts:
            for mode in ("fwd", "fwd+bwd"):
                mine = [r for r in raw if r["T"] == T and r["mode"] == mode]
                per_call = [max(ts) for ts in zip(*(r["times_s"] for r in mine))]  # slowest rank
                peaks = [r["peak_bytes"] for r in mine if r["peak_bytes"] is not None]
                rows.append(dict(world=world, T=T, mode=mode,
                                 median_ms=1e3 * statistics.median(per_call),
                                 min_ms=1e3 * min(per_call), max_ms=1e3 * max(per_call),
                                 peak_bytes_per_rank=max(peaks) if peaks else None))
    return rows


def summary(path: str) -> str:
    data = json.load(open(path))
    lines = ["| T | mode | world 1: ms | world 2: ms | world 1: MiB | world 2: MiB per rank |",
             "|---|---|---|---|---|---|"]
    by = {(r["world"], r["T"], r["mode"]): r for r in data["rows"]}
    for T in sorted({r["T"] for r in data["rows"]}):
        for mode in ("fwd", "fwd+bwd"):
            one, two = by.get((1, T, mode)), by.get((2, T, mode))

            def ms(r):
                return "–" if r is None else f"{r['median_ms']:.0f}"

            def mib(r):
                return ("–" if r is None or r["peak_bytes_per_rank"] is None
                        else f"{r['peak_bytes_per_rank'] / 2**20:.1f}")
            lines.append(f"| {T} | {mode} | {ms(one)} | {ms(two)} | {mib(one)} | {mib(two)} |")
    m = data["machine"]
    lines.append(f"\n{m['cpu']}, {m['cores']} cores; torch {data['versions']['torch']}; "
                 f"{data['date_utc']}; command: `{data['command']}`")
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--T", type=int, nargs="+", default=[2048, 8192, 32768])
    ap.add_argument("--worlds", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out", default=None)
    ap.add_argument("--summary", default=None, help="print the table of a results file")
    args = ap.parse_args(argv)
    if args.summary:
        print(summary(args.summary))
        return
    import hdaf
    from hdaf.training.numerics import cpu_model
    rows = run(args.T, args.worlds, args.repeats)
    data = dict(command="python " + " ".join(sys.argv), case=CASE, repeats=args.repeats,
                date_utc=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M"),
                machine=dict(platform=platform.platform(), cpu=cpu_model(),
                             cores=os.cpu_count()),
                versions=dict(python=platform.python_version(), torch=torch.__version__,
                              hdaf=hdaf.__version__),
                threads_per_rank=1, rows=rows)
    text = json.dumps(data, indent=1)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")
        print(summary(args.out))
    else:
        print(text)


if __name__ == "__main__":
    main()
