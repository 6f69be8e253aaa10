"""hdaf.integrations.transformers: delta attention added to pretrained BERT-family encoders.

Tiny randomly initialised models (hidden 32, 2 layers, 4 heads), float32, CPU, offline.
"""
from __future__ import annotations

import copy
import math
import warnings

import pytest
import torch

transformers = pytest.importorskip("transformers")
import hdaf.integrations.transformers as hdaf_tf  # noqa: E402
from hdaf.dispatch import resolve  # noqa: E402

VOCAB, E, H, LAYERS = 100, 32, 4, 2
TOL = dict(atol=2e-5, rtol=2e-4)  # float32


def _config(arch: str, **extra):
    if arch == "bert":
        return transformers.BertConfig(vocab_size=VOCAB, hidden_size=E, num_hidden_layers=LAYERS,
                                       num_attention_heads=H, intermediate_size=64,
                                       max_position_embeddings=64, **extra)
    if arch == "roberta":  # positions start at pad_token_id + 1 = 2
        return transformers.RobertaConfig(vocab_size=VOCAB, hidden_size=E, num_hidden_layers=LAYERS,
                                          num_attention_heads=H, intermediate_size=64,
                                          max_position_embeddings=72, **extra)
    if arch == "electra":
        return transformers.ElectraConfig(vocab_size=VOCAB, embedding_size=16, hidden_size=E,
                                          num_hidden_layers=LAYERS, num_attention_heads=H,
                                          intermediate_size=64, max_position_embeddings=64, **extra)
    if arch == "distilbert":
        return transformers.DistilBertConfig(vocab_size=VOCAB, dim=E, n_layers=LAYERS, n_heads=H,
                                             hidden_dim=64, max_position_embeddings=64, **extra)
    raise AssertionError(arch)


ARCHS = ("bert", "roberta", "electra", "distilbert")


def _model(arch="bert", head=None, seed=0, **extra):
    torch.manual_seed(seed)
    cls = transformers.AutoModel if head is None else head
    return cls.from_config(_config(arch, **extra)).eval()


def _convert(model, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # the attention-dropout notice
        return hdaf_tf.add_delta_attention(model, **kw)


def _batch(T: int, B: int = 3, seed: int = 1):
    """Token ids and a 0/1 attention mask with lengths T, ceil(T/2), 1 (padding on the right)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (B, T), generator=g)
    lengths = torch.tensor([T, (T + 1) // 2, 1][:B])
    mask = (torch.arange(T)[None] < lengths[:, None]).long()
    return ids.masked_fill(mask == 0, 0), mask


def _randomize_delta(model, seed=2, std=0.5):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in hdaf_tf.delta_parameters(model):
            p.copy_(torch.randn(p.shape, generator=g) * std)


def _hidden(model, ids, mask):
    return model(input_ids=ids, attention_mask=mask).last_hidden_state


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("T", [1, 7, 33])
def test_outputs_equal_before_training(arch, T):
    base = _model(arch)
    conv = _convert(copy.deepcopy(base), max_distance=8)
    assert conv.config._attn_implementation == "hdaf_delta"
    assert len(hdaf_tf.delta_parameters(conv)) == 2 * LAYERS
    ids, mask = _batch(T)
    with torch.no_grad():
        # Every position, padded queries included: with key padding only, a padded query still
        # attends to the real keys in both models, so its output is defined and must match too.
        torch.testing.assert_close(_hidden(conv, ids, mask), _hidden(base, ids, mask), **TOL)
        torch.testing.assert_close(_hidden(conv, ids, None), _hidden(base, ids, None), **TOL)


def test_delta_term_is_the_spec_on_the_layer_input():
    """Layer 0 with w != 0 against the spec written out: x = hidden_states @ Wx^T, padding masked."""
    model = _convert(_model("bert"), max_distance=(2, 3), delta_dim=5)
    _randomize_delta(model)
    sa = model.encoder.layer[0].attention.self
    seen = {}
    sa.register_forward_hook(lambda m, args, kwargs, out: seen.update(h=args[0], out=out[0]),
                             with_kwargs=True)
    ids, mask = _batch(9)
    with torch.no_grad():
        model(input_ids=ids, attention_mask=mask)
        h, B, T = seen["h"], ids.shape[0], ids.shape[1]
        split = lambda t: t.view(B, T, H, E // H).transpose(1, 2)  # noqa: E731
        q, k, v = split(sa.query(h)), split(sa.key(h)), split(sa.value(h))
        x = h @ sa.hdaf_delta.proj.weight.T  # [B,T,Dr]
        pos = torch.arange(T)
        r = (pos[None, :] - pos[:, None]).clamp(-2, 3) + 2  # r(i,j), [T,T]
        w_ij = sa.hdaf_delta.rpe.T[r]  # [T,T,Dr]
        rpe = ((x[:, None, :, :] - x[:, :, None, :]) * w_ij).sum(-1)  # (x_j - x_i)·w[:, r(i,j)]
        logits = (q @ k.transpose(-1, -2) + rpe[:, None]) / math.sqrt(E // H)
        logits = logits.masked_fill(mask[:, None, None, :] == 0, float("-inf"))
        ref = (logits.softmax(-1) @ v).transpose(1, 2).reshape(B, T, E)
    torch.testing.assert_close(seen["out"], ref, **TOL)
    assert (seen["out"] - sa.value(h)).abs().max() > 1e-3  # not trivially the values


@pytest.mark.parametrize("backend", ["auto", "cpu", "gather", "naive"])
def test_backends_agree(backend):
    ids, mask = _batch(17)
    outs, grads = {}, {}
    for name in ("naive", backend):
        model = _convert(_model("bert"), max_distance=4, share_rpe_across_heads=False,
                         backend=name)
        _randomize_delta(model)
        out = _hidden(model, ids, mask)
        (out * torch.linspace(-1, 1, E)).sum().backward()
        outs[name] = out.detach()
        grads[name] = [p.grad for p in hdaf_tf.delta_parameters(model)]
    torch.testing.assert_close(outs[backend], outs["naive"], **TOL)
    for g, ref in zip(grads[backend], grads["naive"]):
        torch.testing.assert_close(g, ref, atol=1e-4, rtol=1e-3)
    if backend == "auto":
        assert resolve("auto", torch.device("cpu")) == "cpu"  # the compiled kernel, as usual


def test_gradients_reach_w_and_the_x_projection():
    model = _convert(_model("bert", head=transformers.AutoModelForSequenceClassification,
                            num_labels=2), max_distance=4)
    ids, mask = _batch(11)
    labels = torch.tensor([0, 1, 1])
    model(input_ids=ids, attention_mask=mask, labels=labels).loss.backward()
    for layer in model.bert.encoder.layer:
        d = layer.attention.self.hdaf_delta
        assert d.rpe.grad is not None and d.rpe.grad.abs().max() > 0
        # At w = 0 the x projection's gradient is exactly 0 (dx = dP·wᵀ) ...
        assert d.proj.weight.grad is not None and d.proj.weight.grad.abs().max() == 0
    model.zero_grad()
    _randomize_delta(model, std=0.1)  # ... and nonzero as soon as w is
    model(input_ids=ids, attention_mask=mask, labels=labels).loss.backward()
    for layer in model.bert.encoder.layer:
        d = layer.attention.self.hdaf_delta
        assert d.rpe.grad.abs().max() > 0 and d.proj.weight.grad.abs().max() > 0


def test_tiny_training_lowers_the_loss():
    torch.manual_seed(0)
    model = _convert(_model("bert", head=transformers.AutoModelForSequenceClassification,
                            num_labels=2), max_distance=4)
    model.train()
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(3, VOCAB, (16, 12), generator=g)
    labels = (ids[:, 1:] > ids[:, :-1]).sum(1).gt(5).long()  # depends on neighbour changes
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(25):
        loss = model(input_ids=ids, labels=labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert sum(losses[-5:]) / 5 < 0.5 * sum(losses[:5]) / 5, losses
    assert all(p.abs().max() > 0 for p in hdaf_tf.delta_parameters(model))  # w moved off zero


def test_torch_compile_fullgraph_matches_eager():
    """Forward and backward through torch.compile (inductor, no graph break) against eager."""
    model = _convert(_model("bert"), max_distance=4)
    _randomize_delta(model)
    ids, mask = _batch(13)
    results = []
    for fn in (model, torch.compile(model, fullgraph=True)):
        model.zero_grad()
        out = _hidden(fn, ids, mask)
        (out * torch.linspace(-1, 1, E)).sum().backward()
        results.append([out.detach()] + [p.grad.clone() for p in hdaf_tf.delta_parameters(model)])
    for got, ref in zip(results[1], results[0]):
        torch.testing.assert_close(got, ref, atol=1e-4, rtol=1e-3)


def test_save_pretrained_round_trip(tmp_path):
    model = _convert(_model("bert"), max_distance=(3, 5), share_rpe_across_heads=False,
                     delta_dim=6, backend="gather")
    _randomize_delta(model)
    ids, mask = _batch(10)
    with torch.no_grad():
        ref = _hidden(model, ids, mask)
    model.save_pretrained(tmp_path)
    loaded = hdaf_tf.from_pretrained(transformers.AutoModel, str(tmp_path), backend="cpu").eval()
    assert loaded.encoder.layer[1].attention.self.hdaf_delta.backend == "cpu"
    assert loaded.encoder.layer[1].attention.self.hdaf_delta.rpe.shape == (H, 6, 9)
    with torch.no_grad():
        torch.testing.assert_close(_hidden(loaded, ids, mask), ref, **TOL)
    # A base-model checkpoint into a model with a head ("bert." prefix on the keys).
    cls = hdaf_tf.from_pretrained(transformers.AutoModelForSequenceClassification, str(tmp_path))
    torch.testing.assert_close(cls.bert.encoder.layer[0].attention.self.hdaf_delta.rpe,
                               model.encoder.layer[0].attention.self.hdaf_delta.rpe)
    # The state_dict path: convert a fresh model with the same settings, load strictly.
    fresh = _convert(_model("bert", seed=5), max_distance=(3, 5), share_rpe_across_heads=False,
                     delta_dim=6)
    fresh.load_state_dict(model.state_dict(), strict=True)
    with torch.no_grad():
        torch.testing.assert_close(_hidden(fresh, ids, mask), ref, **TOL)


def test_from_pretrained_refuses_an_unconverted_checkpoint(tmp_path):
    _model("bert").save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="hdaf_delta_attention"):
        hdaf_tf.from_pretrained(transformers.AutoModel, str(tmp_path))


def test_refuses_unsupported_models():
    gpt2 = transformers.GPT2Model(transformers.GPT2Config(vocab_size=VOCAB, n_embd=E, n_layer=1,
                                                          n_head=H, n_positions=64))
    with pytest.raises(ValueError, match=r"module h\.0\.attn \(GPT2Attention\) is not a self-attention"):
        hdaf_tf.add_delta_attention(gpt2)
    with pytest.raises(ValueError, match=r"BertSelfAttention\): it is causal"):
        hdaf_tf.add_delta_attention(_model("bert", is_decoder=True))
    with pytest.raises(TypeError, match="PreTrainedModel, got Linear"):
        hdaf_tf.add_delta_attention(torch.nn.Linear(2, 2))
    model = _convert(_model("bert"))
    with pytest.raises(ValueError, match="already converted"):
        hdaf_tf.add_delta_attention(model)
    with pytest.raises(ValueError, match="backend must be one of"):
        hdaf_tf.add_delta_attention(_model("bert"), backend="fast")


def test_masks_other_than_key_padding_are_refused():
    base = _model("bert")
    model = _convert(copy.deepcopy(base))
    ids, mask = _batch(6)
    keep = mask.bool()[:, None, None, :].expand(-1, 1, 6, 6)  # a materialized key-padding mask
    with torch.no_grad():
        torch.testing.assert_close(_hidden(model, ids, keep), _hidden(base, ids, mask), **TOL)
        additive = torch.zeros(keep.shape).masked_fill(~keep, torch.finfo(torch.float32).min)
        torch.testing.assert_close(_hidden(model, ids, additive), _hidden(base, ids, mask), **TOL)
        causal = keep & torch.ones(6, 6, dtype=torch.bool).tril()
        with pytest.raises(ValueError, match="differs between queries"):
            _hidden(model, ids, causal)
        with pytest.raises(ValueError, match="attention bias"):
            _hidden(model, ids, additive + 0.5)
