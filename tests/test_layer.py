"""hdaf.DeltaAttention as a drop-in for nn.MultiheadAttention in other people's models."""
import pytest
import torch
from torch import nn

import hdaf


class EncoderBlock(nn.Module):
    """A pre-norm Transformer encoder block whose attention is any self-attention module."""

    def __init__(self, attn: nn.Module, dim: int):
        super().__init__()
        self.attn, self.norm1, self.norm2 = attn, nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.ff = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))

    def forward(self, x, key_padding_mask=None):
        h = self.norm1(x)
        if isinstance(self.attn, nn.MultiheadAttention):
            h = self.attn(h, h, h, key_padding_mask=key_padding_mask, need_weights=False)[0]
        else:
            h = self.attn(h, key_padding_mask=key_padding_mask)
        x = x + h
        return x + self.ff(self.norm2(x))


def test_drop_in_replacement_trains_in_an_encoder_block():
    torch.manual_seed(0)
    E, H, T, B = 16, 4, 12, 4
    mha = EncoderBlock(nn.MultiheadAttention(E, H, batch_first=True), E)
    block = EncoderBlock(hdaf.DeltaAttention(E, H, batch_first=True, max_distance=4, window=6), E)
    head = nn.Linear(E, 1)
    x = torch.randn(B, T, E)
    mask = torch.zeros(B, T, dtype=torch.bool)
    mask[1, 8:] = True
    # The target depends on changes over time: the sum of |x_t - x_{t-1}| over the first feature.
    y = (x[:, 1:, 0] - x[:, :-1, 0]).abs().sum(1, keepdim=True)
    assert mha(x, mask).shape == block(x, mask).shape == (B, T, E)
    params = list(block.parameters()) + list(head.parameters())
    opt = torch.optim.Adam(params, lr=1e-2)
    losses = []
    for _ in range(30):
        out = head(block(x, mask).masked_fill(mask[..., None], 0).mean(1))
        loss = nn.functional.mse_loss(out, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]
    assert block.attn.last_backend == "cpu"
    assert block.attn.rpe.grad is not None and block.attn.rpe.grad.abs().sum() > 0


def test_seq_first_layout_and_padding_invariance():
    torch.manual_seed(0)
    layer = hdaf.DeltaAttention(8, 2, batch_first=False, delta_dim=5, share_rpe_across_heads=False,
                                max_distance=(1, 3)).double()
    assert layer.rpe.shape == (2, 5, 5)
    x = torch.randn(6, 3, 8, dtype=torch.double)  # [T,B,E]
    mask = torch.zeros(3, 6, dtype=torch.bool)
    mask[0, 4:] = True
    out = layer(x, key_padding_mask=mask)
    assert out.shape == (6, 3, 8)
    x2 = x.clone()
    x2[4:, 0] = 1e3  # change only padded positions of batch 0
    out2 = layer(x2, key_padding_mask=mask)
    torch.testing.assert_close(out[:4, 0], out2[:4, 0], atol=1e-12, rtol=0)


def test_use_delta_false_is_plain_attention():
    torch.manual_seed(0)
    layer = hdaf.DeltaAttention(8, 2, use_delta=False).double()
    x = torch.randn(2, 5, 8, dtype=torch.double)
    q, k, v = layer.in_proj(x).view(2, 5, 3, 2, 4).permute(2, 0, 3, 1, 4).unbind(0)
    ref = nn.functional.scaled_dot_product_attention(q, k, v)
    ref = layer.out_proj(ref.transpose(1, 2).reshape(2, 5, 8))
    torch.testing.assert_close(layer(x), ref)


def test_layer_argument_errors():
    with pytest.raises(ValueError, match="num_heads must be a positive int dividing embed_dim=10, got 3"):
        hdaf.DeltaAttention(10, 3)
    layer = hdaf.DeltaAttention(8, 2)
    with pytest.raises(ValueError, match=r"x must be \[B,T,E\] with E=8, got \(2, 5, 7\)"):
        layer(torch.randn(2, 5, 7))
