"""hdaf.integrations.transformers: delta attention added to BERT-family encoders and decoder LLMs.

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
                                                          n_head=H, n_positions=64,
                                                          add_cross_attention=True))
    with pytest.raises(ValueError, match=r"h\.0\.crossattention \(GPT2Attention\): it is cross-attention"):
        hdaf_tf.add_delta_attention(gpt2)
    t5 = transformers.T5EncoderModel(transformers.T5Config(vocab_size=VOCAB, d_model=E, d_kv=8,
                                                           d_ff=64, num_layers=1, num_heads=H))
    with pytest.raises(ValueError, match=r"\(T5Attention\) is not a self-attention hdaf recognises"):
        hdaf_tf.add_delta_attention(t5)
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


# ---------------------------------------------------------------------------------------------
# Decoder LLMs: causal, grouped-query heads, sliding window, KV-cache generation.
# Tiny random models (hidden 32, 2 layers, 4 query heads), float32, CPU.

DECODERS = ("llama", "qwen2", "qwen3", "mistral", "gpt2")
GEN = dict(max_new_tokens=20, min_new_tokens=20, do_sample=False)


def _decoder_config(arch: str):
    common = dict(vocab_size=VOCAB, hidden_size=E, num_hidden_layers=LAYERS, num_attention_heads=H,
                  intermediate_size=64, max_position_embeddings=128, pad_token_id=0,
                  bos_token_id=1, eos_token_id=2)
    if arch == "llama":  # grouped-query: 2 key/value heads for 4 query heads
        return transformers.LlamaConfig(num_key_value_heads=2, **common)
    if arch == "qwen2":  # multi-query: 1 key/value head
        return transformers.Qwen2Config(num_key_value_heads=1, **common)
    if arch == "qwen3":  # q/k norms before the rotary embedding; head_dim set apart
        return transformers.Qwen3Config(num_key_value_heads=2, head_dim=8, **common)
    if arch == "mistral":  # a sliding window shorter than the test sequences
        return transformers.MistralConfig(num_key_value_heads=2, sliding_window=6, **common)
    if arch == "gpt2":
        return transformers.GPT2Config(vocab_size=VOCAB, n_embd=E, n_layer=LAYERS, n_head=H,
                                       n_positions=128, pad_token_id=0, bos_token_id=1,
                                       eos_token_id=2)
    raise AssertionError(arch)


def _decoder(arch: str, seed: int = 0):
    torch.manual_seed(seed)
    return transformers.AutoModelForCausalLM.from_config(_decoder_config(arch)).eval()


def _left_padded(T: int = 11, seed: int = 1):
    """Token ids [3,T] and a 0/1 mask: row 0 full, rows 1 and 2 with 4 and T-1 padding tokens
    on the left (the last row has one real token), as generate() batches prompts."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (3, T), generator=g)
    starts = torch.tensor([0, 4, T - 1])
    mask = (torch.arange(T)[None] >= starts[:, None]).long()
    return ids.masked_fill(mask == 0, 0), mask


@pytest.mark.parametrize("arch", DECODERS)
def test_decoder_identical_to_the_original_at_w0(arch):
    base = _decoder(arch)
    conv = _convert(copy.deepcopy(base), max_distance=8)
    assert conv.config._attn_implementation == "hdaf_delta"
    assert len(hdaf_tf.delta_parameters(conv)) == 2 * LAYERS
    ids, mask = _left_padded()
    real = mask.bool()  # padded queries see no key: the operator gives 0 there, sdpa its own fill
    with torch.no_grad():
        torch.testing.assert_close(conv(input_ids=ids, attention_mask=mask).logits[real],
                                   base(input_ids=ids, attention_mask=mask).logits[real],
                                   atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(conv(input_ids=ids).logits, base(input_ids=ids).logits,
                                   atol=1e-5, rtol=1e-5)
        want = base.generate(ids, attention_mask=mask, **GEN)
        got = conv.generate(ids, attention_mask=mask, **GEN)
    assert got.shape == (3, ids.shape[1] + 20)
    assert torch.equal(got, want)


def _decode_in_steps(model, ids, mask, chunks):
    """Logits of ``ids`` fed through the model's KV cache in pieces of the given lengths."""
    out, cache, start = [], None, 0
    for n in chunks:
        step = model(input_ids=ids[:, start:start + n], attention_mask=mask[:, :start + n],
                     cache=cache, use_cache=True)
        cache = step.cache
        out.append(step.logits)
        start += n
    assert start == ids.shape[1]
    return torch.cat(out, dim=1), cache


@pytest.mark.parametrize("arch", DECODERS)
def test_decoder_cached_decoding_equals_the_full_forward(arch):
    """w != 0: token-by-token decoding (after a prompt, and with a multi-token chunk: a query
    block at the end of the cached keys) gives the full-sequence forward's logits."""
    model = _convert(_decoder(arch), max_distance=(3, 2), share_rpe_across_heads=arch != "qwen2",
                     delta_dim=5)
    _randomize_delta(model)
    ids, mask = _left_padded(T=13)
    real = mask.bool()
    with torch.no_grad():
        full = model(input_ids=ids, attention_mask=mask).logits
        stepped, cache = _decode_in_steps(model, ids, mask, [4] + [1] * 5 + [3, 1])
        one_by_one, _ = _decode_in_steps(model, ids, mask, [1] * 13)
        plain = _convert(_decoder(arch), max_distance=(3, 2),
                         share_rpe_across_heads=arch != "qwen2", delta_dim=5)
        off = plain(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(stepped[real], full[real], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(one_by_one[real], full[real], atol=1e-5, rtol=1e-5)
    assert (full - off)[real].abs().max() > 1e-3  # the delta term is in play
    rows, end = cache.hdaf_delta_x[0]
    assert end == 13 and rows.shape[1] == (6 if arch == "mistral" else 13)  # window W - 1 + 1


def test_decoder_left_padding_equals_each_prompt_alone():
    """w != 0: greedy generation of a left-padded batch equals generating each prompt unpadded."""
    model = _convert(_decoder("llama"), max_distance=4)
    _randomize_delta(model, std=0.3)
    ids, mask = _left_padded()
    with torch.no_grad():
        batch = model.generate(ids, attention_mask=mask, **GEN)
        for b in range(ids.shape[0]):
            alone = model.generate(ids[b:b + 1, mask[b].bool()], **GEN)
            assert torch.equal(batch[b, -20:], alone[0, -20:]), b


def test_decoder_masks_reach_the_operator_as_key_padding(monkeypatch):
    """Causal and sliding-window masks become key padding [B,1,1,Tk] (no Tq x Tk tensor); a
    mask hdaf does not recognise is materialized and checked."""
    from transformers import masking_utils as mu

    seen = []
    real_forward = hdaf_tf.delta_attention_forward

    def spy(module, q, k, v, mask, **kw):
        seen.append(None if mask is None else tuple(mask.shape))
        return real_forward(module, q, k, v, mask, **kw)

    ids, mask = _left_padded()
    try:
        for arch in ("llama", "mistral"):
            seen.clear()
            model = _convert(_decoder(arch))
            transformers.AttentionInterface.register("hdaf_delta", spy)  # after the conversion's
            with torch.no_grad():
                model(input_ids=ids, attention_mask=mask)
            assert seen == [(3, 1, 1, 11)] * LAYERS, (arch, seen)
        # A materialized causal + sliding-window mask is accepted after the check ...
        model = _convert(_decoder("mistral"))
        transformers.AttentionInterface.register("hdaf_delta", spy)
        _randomize_delta(model)
        with torch.no_grad():
            ref = model(input_ids=ids, attention_mask=mask).logits
            monkeypatch.setattr(hdaf_tf, "_sliding_window_of", lambda fn: None)
            seen.clear()
            got = model(input_ids=ids, attention_mask=mask).logits
        assert seen == [(3, 1, 11, 11)] * LAYERS
        torch.testing.assert_close(got[mask.bool()], ref[mask.bool()], atol=1e-5, rtol=1e-5)
    finally:
        hdaf_tf.register()
    # ... and a mask that is not causal + padding + window is refused.
    keep = torch.ones(11, 11, dtype=torch.bool).tril()
    keep[5, 2] = False
    with pytest.raises(ValueError, match="not causal attention with key padding"):
        hdaf_tf._decoder_padding_mask(keep[None, None], 1, 11, 11, (5, 0))


def test_decoder_save_pretrained_round_trip(tmp_path):
    model = _convert(_decoder("qwen2"), max_distance=(3, 5), share_rpe_across_heads=False,
                     delta_dim=6, backend="gather")
    _randomize_delta(model)
    ids, mask = _left_padded()
    with torch.no_grad():
        ref = model(input_ids=ids, attention_mask=mask).logits
        ref_gen = model.generate(ids, attention_mask=mask, **GEN)
    model.save_pretrained(tmp_path)
    loaded = hdaf_tf.from_pretrained(transformers.AutoModelForCausalLM, str(tmp_path),
                                     backend="cpu").eval()
    attn = loaded.model.layers[1].self_attn
    assert attn.hdaf_delta.backend == "cpu" and attn.hdaf_delta.causal
    assert attn.hdaf_delta.rpe.shape == (H, 6, 9)
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids, attention_mask=mask).logits, ref,
                                   atol=1e-5, rtol=1e-5)
        assert torch.equal(loaded.generate(ids, attention_mask=mask, **GEN), ref_gen)


@pytest.mark.parametrize("arch", ["llama", "mistral"])
def test_decoder_torch_compile_forward(arch):
    model = _convert(_decoder(arch), max_distance=4)
    _randomize_delta(model)
    ids, mask = _left_padded()
    real = mask.bool()
    with torch.no_grad():
        ref = model(input_ids=ids, attention_mask=mask).logits
        got = torch.compile(model, fullgraph=True)(input_ids=ids, attention_mask=mask,
                                                   use_cache=False).logits
    torch.testing.assert_close(got[real], ref[real], atol=1e-5, rtol=1e-5)


def test_decoder_cache_crop_beam_search_and_static_cache():
    """The stored delta features follow the cache: crop (assisted decoding), beam search's
    reordering; a static cache is refused."""
    model = _convert(_decoder("llama"), max_distance=4)
    _randomize_delta(model, std=0.3)
    ids, mask = _left_padded()
    with torch.no_grad():
        full = model(input_ids=ids, attention_mask=mask).logits
        _, cache = _decode_in_steps(model, ids[:, :9], mask[:, :9], [6, 3])
        cache.crop(-2)  # back to 7 positions, then on from there
        step = model(input_ids=ids[:, 7:], attention_mask=mask, cache=cache).logits
        torch.testing.assert_close(step[mask[:, 7:].bool()], full[:, 7:][mask[:, 7:].bool()],
                                   atol=1e-5, rtol=1e-5)
        cache.reorder_cache(torch.tensor([2, 0, 1]))  # beam search's reordering
        nxt = torch.tensor([[5], [6], [7]])
        mask2 = torch.cat([mask[[2, 0, 1]], torch.ones(3, 1, dtype=mask.dtype)], 1)
        got = model(input_ids=nxt, attention_mask=mask2, cache=cache).logits[:, -1]
        ids2 = torch.cat([ids[[2, 0, 1]], nxt], 1)
        want = model(input_ids=ids2, attention_mask=mask2).logits[:, -1]
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
        beam = dict(attention_mask=mask, num_beams=3, max_new_tokens=8, do_sample=False)
        assert torch.equal(model.generate(ids, **beam), model.generate(ids, use_cache=False, **beam))
        # A cache filled by an unconverted model has no delta features to go with its keys.
        _, plain = _decode_in_steps(_decoder("llama"), ids[:, :4], mask[:, :4], [4])
        with pytest.raises(RuntimeError, match="filled or changed outside"):
            model(input_ids=ids[:, 4:5], attention_mask=mask[:, :5], cache=plain)
        static = transformers.StaticCache(config=model.config, max_cache_len=32)
        with pytest.raises(NotImplementedError, match="static or offloaded cache"):
            model(input_ids=ids, attention_mask=mask, cache=static)


@pytest.mark.parametrize("backend", ["cpu", "gather"])
def test_decoder_training_gradients_and_backends_agree(backend):
    """Causal LM loss through grouped-query heads and a sliding window: the compiled kernel and a
    reference agree with the naive backend on the loss and the delta weights' gradients."""
    ids, mask = _left_padded(T=13)
    labels = ids.masked_fill(mask == 0, -100)
    results = {}
    for name in ("naive", backend):
        model = _convert(_decoder("mistral"), max_distance=(3, 2), share_rpe_across_heads=False,
                         backend=name)
        model.train()
        _randomize_delta(model, std=0.3)
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        results[name] = [loss.detach()] + [p.grad for p in hdaf_tf.delta_parameters(model)]
    for got, ref in zip(results[backend], results["naive"]):
        torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-4)
    assert all(g.abs().max() > 0 for g in results[backend][1:])


@pytest.mark.parametrize("arch", ["bert", "llama"])
def test_converting_a_model_leaves_others_built_from_its_config_alone(arch):
    """Two models built from one config object share it; converting one must not switch the
    other's attention implementation (it then raised "called attn_implementation='hdaf_delta'
    but was not converted") nor write the delta settings into its config."""
    config = _config(arch) if arch == "bert" else _decoder_config(arch)
    cls = transformers.BertModel if arch == "bert" else transformers.LlamaForCausalLM
    torch.manual_seed(0)
    first, second = cls(config).eval(), cls(config).eval()
    assert first.config is second.config
    implementation = config._attn_implementation
    ids, mask = _batch(7)
    with torch.no_grad():
        before = second(input_ids=ids, attention_mask=mask)[0]
    _convert(first, max_distance=4)
    assert first.config._attn_implementation == hdaf_tf.ATTN_IMPLEMENTATION
    assert all(m.config is first.config for m in first.modules() if hasattr(m, "config"))
    assert config._attn_implementation == implementation and second.config is config
    assert not hasattr(config, hdaf_tf.CONFIG_KEY)
    with torch.no_grad():
        torch.testing.assert_close(second(input_ids=ids, attention_mask=mask)[0], before)
        first(input_ids=ids, attention_mask=mask)
