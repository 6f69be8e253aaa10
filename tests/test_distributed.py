"""hdaf.distributed on the CPU with gloo: spawned processes, a file store, a short timeout and one
thread per rank. Each rank builds the same full float64 inputs, runs ring_delta_attention on its
shards and compares its shard of the output and of every gradient with the single-process
operator (w's gradient: the sum over ranks), for every mask kind, both layouts, padding,
grouped heads and shared or per-head x/w; a second run must be bitwise identical. A rank that
raises makes the others fail with a clear error instead of hanging."""
from __future__ import annotations

import datetime
import os
import subprocess
import sys
import traceback

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

# The group's timeout: a failing rank is detected when its connection closes (about 2 s here),
# so this only bounds a real hang; it is long enough that a rank starved by other jobs on a
# loaded 2-core machine is not mistaken for a failed one.
TIMEOUT_S = 60


def _init(rank, world, store_path):
    torch.set_num_threads(1)
    store = dist.FileStore(store_path, world)
    dist.init_process_group("gloo", store=store, rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=TIMEOUT_S))


def _inputs(B, H, Hkv, T, D, Dr, R, per_head_x, per_head_w, pad):
    g = torch.Generator().manual_seed(1234)

    def rnd(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64)

    q, k, v = rnd(B, H, T, D), rnd(B, Hkv, T, D), rnd(B, Hkv, T, D)
    x = rnd(B, H, T, Dr) if per_head_x else rnd(B, T, Dr)
    w = rnd(H, Dr, R) if per_head_w else rnd(Dr, R)
    mask = None
    if pad:  # element 0 padded at its end, element 1 in the middle of the sequence
        mask = torch.zeros(B, T, dtype=torch.bool)
        mask[0, T - T // 3:] = True
        mask[-1, T // 4:T // 2] = True
    dout = rnd(B, H, T, D)
    return q, k, v, x, w, mask, dout


def _check_case(case, group, dtype=torch.float64, D=3, tol=dict(atol=1e-10, rtol=1e-9)):
    """The ring on shards (cast to ``dtype``, head dim ``D``) against the float64 single-process
    operator: output and every gradient within ``tol``, and bitwise equal over two runs."""
    from hdaf.distributed import ring_delta_attention, shard

    import hdaf
    layout = case.pop("layout")
    shape = {k: case.pop(k) for k in ("B", "H", "Hkv", "T", "per_head_x", "per_head_w", "pad")}
    ring_backend = case.pop("backend", "auto")
    q, k, v, x, w, mask, dout = _inputs(D=D, Dr=2, R=5, **shape)
    leaves = [t.requires_grad_(True) for t in (q, k, v, x, w)]
    want = hdaf.delta_attention(q, k, v, x, w, key_padding_mask=mask, max_distance=2,
                                backend="cpu", **case)
    want_grads = torch.autograd.grad(want, leaves, dout)

    def sh(t, dim=2):
        return shard(t.detach(), dim, group, layout)

    runs = []
    for _ in range(2):
        parts = [sh(q), sh(k), sh(v), sh(x, x.dim() - 2), w.detach().clone()]
        parts = [t.to(dtype).requires_grad_(True) for t in parts]
        out = ring_delta_attention(*parts, group=group, layout=layout, max_distance=2,
                                   key_padding_mask=None if mask is None else sh(mask, 1),
                                   backend=ring_backend, **case)
        grads = list(torch.autograd.grad(out, parts, sh(dout).to(dtype)))
        runs.append([out] + grads)
    for a, b in zip(*runs):
        assert torch.equal(a, b), f"{case}: two runs differ"
    out, dq, dk, dv, dx, dw = runs[0]
    dist.all_reduce(dw, group=group)
    checks = [("out", sh(want), out), ("dq", sh(want_grads[0]), dq),
              ("dk", sh(want_grads[1]), dk), ("dv", sh(want_grads[2]), dv),
              ("dx", sh(want_grads[3], x.dim() - 2), dx), ("dw", want_grads[4], dw)]
    for name, ref, got in checks:
        torch.testing.assert_close(got.to(ref.dtype), ref, **tol,
                                   msg=lambda m: f"{layout} {shape} {case} {name}: {m}")


def _check_layers(group):
    """Both layers with a context_parallel_group (set by hdaf.distributed.context_parallel, or
    the constructor) equal the same layers on the full sequence: output shards, the input's
    gradient shards and every parameter's gradient summed over the ranks."""
    import hdaf
    from hdaf.distributed import context_parallel, shard

    torch.manual_seed(0)
    E, T = 8, 16
    layers = [hdaf.DeltaAttention(E, 2, max_distance=3, window=(5, 0), delta_dim=4),
              hdaf.DeltaMultiheadAttention(E, 2, batch_first=True, max_distance=(2, 3),
                                           share_rpe_across_heads=False)]
    with torch.no_grad():  # DeltaMultiheadAttention's w starts at 0: give it a value
        layers[1].rpe.normal_()
    x = torch.randn(2, T, E, dtype=torch.float64)
    mask = torch.zeros(2, T, dtype=torch.bool)
    mask[1, 11:] = True
    dout = torch.randn(2, T, E, dtype=torch.float64)
    for layer in layers:
        layer.double()
        xf = x.clone().requires_grad_(True)
        if isinstance(layer, hdaf.DeltaAttention):
            full = layer(xf, key_padding_mask=mask)
        else:
            full = layer(xf, xf, xf, key_padding_mask=mask, need_weights=False, is_causal=True,
                         attn_mask=torch.nn.Transformer.generate_square_subsequent_mask(
                             T, dtype=torch.float64))[0]
        params = list(layer.parameters())
        want = torch.autograd.grad(full, [xf] + params, dout)
        assert context_parallel(layer, dist.group.WORLD) == [""]
        xs = shard(x, 1, group).requires_grad_(True)
        ms = shard(mask, 1, group)
        if isinstance(layer, hdaf.DeltaAttention):
            out = layer(xs, key_padding_mask=ms)
        else:
            out = layer(xs, xs, xs, key_padding_mask=ms, need_weights=False, is_causal=True)[0]
        assert layer.last_backend == "cpu"
        got = torch.autograd.grad(out, [xs] + params, shard(dout, 1, group))
        torch.testing.assert_close(out, shard(full.detach(), 1, group), atol=1e-10, rtol=1e-9)
        torch.testing.assert_close(got[0], shard(want[0], 1, group), atol=1e-10, rtol=1e-9)
        for name, g, wg in zip([n for n, _ in layer.named_parameters()], got[1:], want[1:]):
            dist.all_reduce(g, group=group)
            torch.testing.assert_close(g, wg, atol=1e-10, rtol=1e-9, msg=lambda m: f"{name}: {m}")
    # without the delta term (x and w None through the ring)
    plain = hdaf.DeltaAttention(E, 2, causal=True, use_delta=False).double()
    xf = x.clone().requires_grad_(True)
    full = plain(xf, key_padding_mask=mask)
    want = torch.autograd.grad(full, xf, dout)[0]
    context_parallel(plain, dist.group.WORLD)
    xs = shard(x, 1, group).requires_grad_(True)
    out = plain(xs, key_padding_mask=shard(mask, 1, group))
    got = torch.autograd.grad(out, xs, shard(dout, 1, group))[0]
    torch.testing.assert_close(out, shard(full.detach(), 1, group), atol=1e-10, rtol=1e-9)
    torch.testing.assert_close(got, shard(want, 1, group), atol=1e-10, rtol=1e-9)


def _worker(rank, world, store_path, cases, result_dir, layers=False):
    try:
        _init(rank, world, store_path)
        for case in cases:
            _check_case(dict(case), None)
        if layers:
            _check_layers(None)
        dist.barrier()
        dist.destroy_process_group()
    except BaseException:
        with open(os.path.join(result_dir, f"rank{rank}.err"), "w") as f:
            f.write(traceback.format_exc())
        raise


def _spawn(fn, world, tmp_path, *args):
    ctx = mp.start_processes(fn, args=(world, str(tmp_path / "store"), *args), nprocs=world,
                             join=False, start_method="spawn")
    # every rank finishes or fails well within this (a hang would fail the test, not block CI)
    while not ctx.join(timeout=4 * TIMEOUT_S):
        pass


def _run(world, cases, tmp_path, layers=False):
    try:
        _spawn(_worker, world, tmp_path, cases, str(tmp_path), layers)
    except Exception:
        errs = sorted(tmp_path.glob("rank*.err"))
        raise AssertionError("\n".join(e.read_text() for e in errs) or "a rank failed")


def _case(layout="zigzag", B=2, H=2, Hkv=2, T=8, per_head_x=False, per_head_w=False, pad=False,
          **options):
    return dict(layout=layout, B=B, H=H, Hkv=Hkv, T=T, per_head_x=per_head_x,
                per_head_w=per_head_w, pad=pad, **options)


def test_world_2_every_mask_kind_and_the_layers(tmp_path):
    """W=2, T=16: shards of 8 (zigzag chunks of 4). Windows wider and narrower than a chunk,
    causal with both layouts (its first rows' running lse is -inf on later ranks), padding,
    grouped heads, per-head x and w; then both layers with a context_parallel_group."""
    cases = [
        _case(T=16),
        _case("contiguous", T=16),
        _case(T=16, causal=True),
        _case("contiguous", T=16, causal=True),
        _case(T=16, window=2),  # narrower than a chunk
        _case(T=16, window=(9, 5)),  # wider than a chunk
        _case("contiguous", T=16, window=(3, 0)),  # causal window: one ring step
        _case(T=16, causal=True, pad=True),
        _case("contiguous", T=16, window=(6, 2), pad=True),
        _case(T=16, H=4, Hkv=2, causal=True, per_head_x=True),
        _case(T=16, H=2, Hkv=1, per_head_w=True, window=5),
        _case(T=16, H=2, per_head_x=True, per_head_w=True, backend="gather", causal=True),
    ]
    _run(2, cases, tmp_path, layers=True)


def test_world_3(tmp_path):
    cases = [
        _case(T=12, B=1, causal=True, pad=True),
        _case("contiguous", T=12, B=1, window=(2, 3), H=2, Hkv=1),
        _case(T=12, B=1, window=(7, 1), per_head_x=True),
    ]
    _run(3, cases, tmp_path)


def test_world_4_tiny(tmp_path):
    cases = [_case(T=8, B=1, H=1, Hkv=1, causal=True),
             _case("contiguous", T=8, B=1, H=1, Hkv=1, window=(1, 2), pad=True)]
    _run(4, cases, tmp_path)


def _failing_worker(rank, world, store_path, result_dir):
    """Rank 1 raises before its call (a bad argument); rank 0 must fail with a clear error,
    not hang. Then both pass different windows: both get the mismatch error. Each rank writes
    what it raised."""
    from hdaf.distributed import ring_delta_attention, shard, unshard

    _init(rank, world, store_path)
    q, k, v, x, w, _, _ = _inputs(1, 2, 2, 8, 3, 2, 5, False, False, False)
    sh = [shard(t, 2 if t.dim() == 4 else 1, None, "zigzag") for t in (q, k, v, x)]
    lines = []
    try:  # shard and unshard round trip, and the length rule
        assert torch.equal(unshard(sh[0], 2, None), q)
        shard(q[:, :, :7], 2, None)
    except ValueError as exc:
        lines.append(f"shard: {exc}")
    try:
        ring_delta_attention(*sh, w, group=None, window=2 + rank, max_distance=2)
    except ValueError as exc:
        lines.append(f"mismatch: {exc}")
    try:
        if rank == 1:
            ring_delta_attention(sh[0], sh[1][..., :2], sh[2], sh[3], w, group=None,
                                 max_distance=2)
        else:
            ring_delta_attention(*sh, w, group=None, max_distance=2)
    except (ValueError, RuntimeError) as exc:
        lines.append(f"failed: {type(exc).__name__}: {exc}")
    with open(os.path.join(result_dir, f"rank{rank}.txt"), "w") as f:
        f.write("\n".join(lines))
    # Rank 1 leaves without a goodbye while rank 0 is still waiting on the group; rank 0, whose
    # group now has a dead peer, leaves the same way once it has written what it raised: tearing
    # down a gloo group with a dead peer can abort the process ("terminate called without an
    # active exception"), which is not what this test checks.
    os._exit(0)


def test_errors_and_a_failing_rank_fail_every_rank(tmp_path):
    _spawn(_failing_worker, 2, tmp_path, str(tmp_path))
    r0 = (tmp_path / "rank0.txt").read_text().splitlines()
    r1 = (tmp_path / "rank1.txt").read_text().splitlines()
    for lines in (r0, r1):
        assert lines[0].startswith("shard: shard: the length 7 of dim 2") and "divisible by 4" in lines[0]
        assert lines[1].startswith("mismatch: ring_delta_attention: rank ")
        assert "passed different shapes or options" in lines[1]
    assert r1[2].startswith("failed: ValueError: k must be [B,Hkv,Tk,Dk]")
    assert r0[2].startswith("failed: RuntimeError: ring_delta_attention: ")
    assert "another rank of the process group probably failed" in r0[2]


def test_example_trains_on_two_ranks_like_one(tmp_path):
    """examples/context_parallel.py under torchrun: two gloo ranks, a few steps; the script
    itself compares every step's loss with a one-rank run and exits 1 on a mismatch."""
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, PYTHONPATH=repo + os.pathsep + os.environ.get("PYTHONPATH", ""))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
           os.path.join(repo, "examples", "context_parallel.py"), "--steps", "3", "--seq-len",
           "64", "--window", "16"]
    res = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=8 * TIMEOUT_S)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "context parallel over 2 rank(s) (gloo, layout zigzag)" in res.stdout
    assert "(ok, rtol" in res.stdout
