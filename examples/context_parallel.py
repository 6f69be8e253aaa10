"""Train a small model of hdaf.DeltaAttention layers on sequences sharded over the ranks of a
torch.distributed group (context parallelism), and check its losses against a one-rank run.

    torchrun --nproc-per-node 2 examples/context_parallel.py           # CPU: gloo
    torchrun --nproc-per-node 2 examples/context_parallel.py --steps 5 --seq-len 128
    python examples/context_parallel.py                                # one rank

Each rank holds a shard of every sequence (``hdaf.distributed.shard``, zigzag layout: chunks r
and 2W-1-r of 2W, balanced under the causal mask) and only its shard's activations; the
attention layers run ``hdaf.distributed.ring_delta_attention`` (set by
``hdaf.distributed.context_parallel(model, group)``). The loss of a rank is its tokens' share of
the mean over all tokens, so the gradients summed over the ranks (one all-reduce) are those of
the whole batch, and every rank takes the same optimizer step.

Task: next-token prediction on random sequences in which every token after the first ``LAG``
repeats the token ``LAG`` positions back plus one (mod the vocabulary), with 10 % noise: a
fixed relative offset, which the delta term's buckets can learn.

The check: rank 0 then trains the same model from the same weights on the full sequences on its
own (no group) and compares the loss of every step; the script exits with status 1 if any step
differs by more than ``--rtol``. On GPUs (CUDA available) the group uses nccl and one GPU per
rank.
"""
from __future__ import annotations

import argparse
import datetime
import os
import sys
import tempfile

import torch
import torch.distributed as dist
from torch import nn

import hdaf
from hdaf.distributed import context_parallel, shard

LAG = 3


class Block(nn.Module):
    def __init__(self, dim, heads, window, max_distance):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = hdaf.DeltaAttention(dim, heads, max_distance=(max_distance, 0),
                                        window=(window, 0), causal=True)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))

    def forward(self, h):
        h = h + self.attn(self.norm1(h))
        return h + self.mlp(self.norm2(h))


class TinyModel(nn.Module):
    def __init__(self, vocab, dim, heads, layers, window, max_distance):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.blocks = nn.ModuleList(Block(dim, heads, window, max_distance)
                                    for _ in range(layers))
        self.head = nn.Linear(dim, vocab)

    def forward(self, tokens):
        h = self.embed(tokens)
        for block in self.blocks:
            h = block(h)
        return self.head(h)


def make_batch(step, args):
    g = torch.Generator().manual_seed(1000 + step)
    B, T, V = args.batch, args.seq_len + 1, args.vocab
    tokens = torch.randint(V, (B, T), generator=g)
    for t in range(LAG, T):
        noise = torch.rand(B, generator=g) < 0.1
        tokens[:, t] = torch.where(noise, tokens[:, t], (tokens[:, t - LAG] + 1) % V)
    return tokens[:, :-1], tokens[:, 1:]  # inputs, next-token targets


def train(model, args, device, group=None):
    """Losses per step; with a group, each rank trains on its shards of every batch."""
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr)
    total_tokens = args.batch * args.seq_len
    losses = []
    for step in range(args.steps):
        inputs, targets = (t.to(device) for t in make_batch(step, args))
        if group is not None:
            inputs, targets = shard(inputs, 1, group), shard(targets, 1, group)
        logits = model(inputs)
        # this rank's tokens' share of the mean over all tokens of the batch
        loss = nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten(),
                                           reduction="sum") / total_tokens
        opt.zero_grad()
        loss.backward()
        if group is not None:
            for p in model.parameters():  # the gradient of the whole batch, on every rank
                dist.all_reduce(p.grad, group=group)
            dist.all_reduce(loss := loss.detach().clone(), group=group)
        opt.step()
        losses.append(loss.item())
    return losses


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--seq-len", type=int, default=256, help="full sequence length T")
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--dim", type=int, default=32)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--vocab", type=int, default=16)
    ap.add_argument("--window", type=int, default=64, help="causal window (keys back)")
    ap.add_argument("--max-distance", type=int, default=8)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--layout", default="zigzag", choices=hdaf.distributed.LAYOUTS)
    ap.add_argument("--rtol", type=float, default=1e-4,
                    help="largest relative loss difference to the one-rank run")
    ap.add_argument("--no-check", action="store_true", help="skip the one-rank comparison")
    args = ap.parse_args(argv)

    cuda = torch.cuda.is_available()
    if "RANK" in os.environ:  # torchrun
        local = int(os.environ.get("LOCAL_RANK", 0))
        if cuda:
            torch.cuda.set_device(local)
        dist.init_process_group("nccl" if cuda else "gloo",
                                timeout=datetime.timedelta(minutes=5))
    else:  # one rank, no launcher
        store = dist.FileStore(os.path.join(tempfile.mkdtemp(), "store"), 1)
        dist.init_process_group("gloo", store=store, rank=0, world_size=1)
        local = 0
    device = torch.device("cuda", local) if cuda else torch.device("cpu")
    rank, world = dist.get_rank(), dist.get_world_size()
    if not cuda:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))

    def build():
        torch.manual_seed(0)
        return TinyModel(args.vocab, args.dim, args.heads, args.layers, args.window,
                         args.max_distance).to(device)

    model = build()
    context_parallel(model, dist.group.WORLD, args.layout)
    losses = train(model, args, device, dist.group.WORLD)
    status = 0
    if rank == 0:
        print(f"context parallel over {world} rank(s) ({dist.get_backend()}, layout "
              f"{args.layout}), T={args.seq_len}, {args.steps} steps: loss "
              f"{losses[0]:.4f} -> {losses[-1]:.4f}")
        if not args.no_check:
            ref = train(build(), args, device)  # one rank, full sequences
            worst = max(abs(a - b) / abs(b) for a, b in zip(losses, ref))
            ok = worst <= args.rtol
            print(f"one-rank run: loss {ref[0]:.4f} -> {ref[-1]:.4f}; largest relative "
                  f"difference per step {worst:.2e} ({'ok' if ok else 'MISMATCH'}, rtol "
                  f"{args.rtol:g})")
            status = 0 if ok else 1
    flag = torch.tensor([status], device=device)
    dist.broadcast(flag, 0)
    dist.destroy_process_group()
    return int(flag.item())


if __name__ == "__main__":
    sys.exit(main())
