"""Blocks with the structure and arithmetic of timm's, for the benchmark's model section and the
tests of `stochdepth.torch.patch` (timm itself needs torchvision, which may not import beside
the installed torch).

What is copied is the structure that `patch` recognises and the arithmetic of each forward, as
timm defines them:

- `DropPath(drop_prob, scale_by_keep)`: `x * r`, r of shape (B, 1, ...) from `bernoulli_(keep)`,
  divided in place by keep when `scale_by_keep` and keep > 0; the identity at eval or
  drop_prob 0 (timm/layers/drop.py).
- `LayerScale(dim, init_values)`: `x * gamma` (`x.mul_(gamma)` when inplace).
- `Mlp`: fc1, act, drop1, norm (Identity), fc2, drop2.
- `Attention`: qkv, (q_norm, k_norm: Identity), scaled dot-product attention, proj, proj_drop.
- ViT/DeiT `Block`: norm1, attn, ls1, drop_path1, norm2, mlp, ls2, drop_path2;
  `x = x + drop_path1(ls1(attn(norm1(x))))`, then the same with norm2, mlp, ls2, drop_path2.
- `ConvNeXtBlock` (NCHW): conv_dw (depthwise 7x7), then channels last norm and mlp (or 1x1 convs
  with `conv_mlp`), gamma (`x.mul(gamma.reshape(1, -1, 1, 1))`), then
  `drop_path(x) + shortcut(input)`.
- Swin `SwinTransformerBlock` ((B, H, W, C)): `x = x + drop_path1(_attn(norm1(x)))` where
  `_attn` is the cyclic shift, window partition, window attention with the relative position
  bias and the shifted-window mask, window reverse and the shift back; then
  `x = x + drop_path2(mlp(norm2(x)))` on (B, H * W, C).

`vit_stack` and `convnext_stack` build the stacks the benchmark trains.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["Attention", "Block", "ConvNeXtBlock", "DropPath", "LayerScale", "Mlp",
           "SwinTransformerBlock", "WindowAttention", "convnext_stack", "drop_path",
           "drop_rates", "vit_stack"]


def drop_path(x, drop_prob: float = 0.0, training: bool = False, scale_by_keep: bool = True):
    """timm's drop_path."""
    if drop_prob == 0.0 or not training:
        return x
    keep_prob = 1 - drop_prob
    shape = (x.shape[0],) + (1,) * (x.ndim - 1)
    random_tensor = x.new_empty(shape).bernoulli_(keep_prob)
    if keep_prob > 0.0 and scale_by_keep:
        random_tensor.div_(keep_prob)
    return x * random_tensor


class DropPath(nn.Module):
    """timm's DropPath: drop_prob, scale_by_keep."""

    def __init__(self, drop_prob: float = 0.0, scale_by_keep: bool = True):
        super().__init__()
        self.drop_prob = drop_prob
        self.scale_by_keep = scale_by_keep

    def forward(self, x):
        return drop_path(x, self.drop_prob, self.training, self.scale_by_keep)

    def extra_repr(self):
        return f"drop_prob={round(self.drop_prob, 3):0.3f}"


class LayerScale(nn.Module):
    def __init__(self, dim: int, init_values: float = 1e-5, inplace: bool = False):
        super().__init__()
        self.inplace = inplace
        self.gamma = nn.Parameter(init_values * torch.ones(dim))

    def forward(self, x):
        return x.mul_(self.gamma) if self.inplace else x * self.gamma


class Mlp(nn.Module):
    def __init__(self, in_features, hidden_features=None, out_features=None,
                 act_layer=nn.GELU, drop=0.0, use_conv=False):
        super().__init__()
        out_features = out_features or in_features
        hidden_features = hidden_features or in_features
        if use_conv:
            self.fc1 = nn.Conv2d(in_features, hidden_features, kernel_size=1)
            self.fc2 = nn.Conv2d(hidden_features, out_features, kernel_size=1)
        else:
            self.fc1 = nn.Linear(in_features, hidden_features)
            self.fc2 = nn.Linear(hidden_features, out_features)
        self.act = act_layer()
        self.drop1 = nn.Dropout(drop)
        self.norm = nn.Identity()
        self.drop2 = nn.Dropout(drop)

    def forward(self, x):
        x = self.drop1(self.act(self.fc1(x)))
        return self.drop2(self.fc2(self.norm(x)))


class Attention(nn.Module):
    def __init__(self, dim, num_heads=8, qkv_bias=False, attn_drop=0.0, proj_drop=0.0):
        super().__init__()
        assert dim % num_heads == 0, "dim should be divisible by num_heads"
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim ** -0.5
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.q_norm = nn.Identity()
        self.k_norm = nn.Identity()
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x, attn_mask=None):
        B, N, C = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        q, k = self.q_norm(q), self.k_norm(k)
        x = F.scaled_dot_product_attention(
            q, k, v, attn_mask=attn_mask,
            dropout_p=self.attn_drop.p if self.training else 0.0)
        x = x.transpose(1, 2).reshape(B, N, C)
        return self.proj_drop(self.proj(x))


class Block(nn.Module):
    """timm's ViT/DeiT block (pre-norm, optional LayerScale)."""

    def __init__(self, dim, num_heads, mlp_ratio=4.0, qkv_bias=False, proj_drop=0.0,
                 attn_drop=0.0, init_values=None, drop_path=0.0, act_layer=nn.GELU,
                 norm_layer=nn.LayerNorm):
        super().__init__()
        self.norm1 = norm_layer(dim)
        self.attn = Attention(dim, num_heads=num_heads, qkv_bias=qkv_bias, attn_drop=attn_drop,
                              proj_drop=proj_drop)
        self.ls1 = LayerScale(dim, init_values=init_values) if init_values else nn.Identity()
        self.drop_path1 = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()
        self.norm2 = norm_layer(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), act_layer=act_layer, drop=proj_drop)
        self.ls2 = LayerScale(dim, init_values=init_values) if init_values else nn.Identity()
        self.drop_path2 = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()

    def forward(self, x, attn_mask=None):
        x = x + self.drop_path1(self.ls1(self.attn(self.norm1(x), attn_mask=attn_mask)))
        x = x + self.drop_path2(self.ls2(self.mlp(self.norm2(x))))
        return x


class ConvNeXtBlock(nn.Module):
    """timm's ConvNeXt block on (B, C, H, W)."""

    def __init__(self, in_chs, out_chs=None, kernel_size=7, stride=1, mlp_ratio=4,
                 conv_mlp=False, ls_init_value=1e-6, drop_path=0.0):
        super().__init__()
        out_chs = out_chs or in_chs
        self.use_conv_mlp = conv_mlp
        self.conv_dw = nn.Conv2d(in_chs, out_chs, kernel_size, stride=stride,
                                 padding=kernel_size // 2, groups=in_chs)
        # Channels last LayerNorm (timm's LayerNorm is F.layer_norm over the last axis); with
        # conv_mlp timm uses LayerNorm2d, the same over the channel axis.
        self.norm = _LayerNorm2d(out_chs) if conv_mlp else nn.LayerNorm(out_chs, eps=1e-6)
        self.mlp = Mlp(out_chs, int(mlp_ratio * out_chs), use_conv=conv_mlp)
        self.gamma = (nn.Parameter(ls_init_value * torch.ones(out_chs))
                      if ls_init_value is not None else None)
        if in_chs != out_chs or stride != 1:
            self.shortcut = nn.Sequential(nn.AvgPool2d(2, stride, ceil_mode=True,
                                                       count_include_pad=False)
                                          if stride > 1 else nn.Identity(),
                                          nn.Conv2d(in_chs, out_chs, 1)
                                          if in_chs != out_chs else nn.Identity())
        else:
            self.shortcut = nn.Identity()
        self.drop_path = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()

    def forward(self, x):
        shortcut = x
        x = self.conv_dw(x)
        if self.use_conv_mlp:
            x = self.norm(x)
            x = self.mlp(x)
        else:
            x = x.permute(0, 2, 3, 1)
            x = self.norm(x)
            x = self.mlp(x)
            x = x.permute(0, 3, 1, 2)
        if self.gamma is not None:
            x = x.mul(self.gamma.reshape(1, -1, 1, 1))
        x = self.drop_path(x) + self.shortcut(shortcut)
        return x


class _LayerNorm2d(nn.LayerNorm):
    """LayerNorm over the channels of (B, C, H, W)."""

    def __init__(self, num_channels, eps=1e-6):
        super().__init__(num_channels, eps=eps)

    def forward(self, x):
        x = x.permute(0, 2, 3, 1)
        x = F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
        return x.permute(0, 3, 1, 2)


def _window_partition(x, window_size):
    B, H, W, C = x.shape
    x = x.view(B, H // window_size[0], window_size[0], W // window_size[1], window_size[1], C)
    return x.permute(0, 1, 3, 2, 4, 5).contiguous().view(-1, window_size[0], window_size[1], C)


def _window_reverse(windows, window_size, H, W):
    C = windows.shape[-1]
    x = windows.view(-1, H // window_size[0], W // window_size[1], window_size[0],
                     window_size[1], C)
    return x.permute(0, 1, 3, 2, 4, 5).contiguous().view(-1, H, W, C)


def _relative_position_index(win_h, win_w):
    coords = torch.stack(torch.meshgrid(torch.arange(win_h), torch.arange(win_w),
                                        indexing="ij")).flatten(1)
    relative = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0).contiguous()
    relative[:, :, 0] += win_h - 1
    relative[:, :, 1] += win_w - 1
    relative[:, :, 0] *= 2 * win_w - 1
    return relative.sum(-1)


class WindowAttention(nn.Module):
    """Window attention with a relative position bias (Swin)."""

    def __init__(self, dim, num_heads, window_size=7, qkv_bias=True, attn_drop=0.0,
                 proj_drop=0.0):
        super().__init__()
        self.dim = dim
        self.window_size = (window_size, window_size)
        win_h, win_w = self.window_size
        self.window_area = win_h * win_w
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim ** -0.5
        self.relative_position_bias_table = nn.Parameter(
            torch.zeros((2 * win_h - 1) * (2 * win_w - 1), num_heads))
        nn.init.trunc_normal_(self.relative_position_bias_table, std=0.02)
        self.register_buffer("relative_position_index", _relative_position_index(win_h, win_w),
                             persistent=False)
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def _bias(self):
        bias = self.relative_position_bias_table[self.relative_position_index.view(-1)]
        bias = bias.view(self.window_area, self.window_area, -1).permute(2, 0, 1).contiguous()
        return bias.unsqueeze(0)

    def forward(self, x, mask=None):
        B_, N, C = x.shape
        qkv = self.qkv(x).reshape(B_, N, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        attn_mask = self._bias()
        if mask is not None:
            num_win = mask.shape[0]
            mask = mask.view(1, num_win, 1, N, N).expand(B_ // num_win, -1, self.num_heads,
                                                         -1, -1)
            attn_mask = attn_mask + mask.reshape(-1, self.num_heads, N, N)
        x = F.scaled_dot_product_attention(
            q, k, v, attn_mask=attn_mask,
            dropout_p=self.attn_drop.p if self.training else 0.0)
        x = x.transpose(1, 2).reshape(B_, N, -1)
        return self.proj_drop(self.proj(x))


class SwinTransformerBlock(nn.Module):
    """timm's Swin block on (B, H, W, C), with the shifted-window mask when shift_size > 0."""

    def __init__(self, dim, input_resolution, num_heads=4, window_size=7, shift_size=0,
                 mlp_ratio=4.0, qkv_bias=True, proj_drop=0.0, attn_drop=0.0, drop_path=0.0,
                 act_layer=nn.GELU, norm_layer=nn.LayerNorm):
        super().__init__()
        self.dim = dim
        self.input_resolution = input_resolution
        self.window_size = (window_size, window_size)
        self.shift_size = (shift_size, shift_size)
        self.window_area = window_size * window_size
        self.mlp_ratio = mlp_ratio
        self.norm1 = norm_layer(dim)
        self.attn = WindowAttention(dim, num_heads, window_size, qkv_bias, attn_drop, proj_drop)
        self.drop_path1 = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()
        self.norm2 = norm_layer(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), act_layer=act_layer, drop=proj_drop)
        self.drop_path2 = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()
        self.register_buffer("attn_mask", self._attn_mask(), persistent=False)

    def _attn_mask(self):
        if not any(self.shift_size):
            return None
        H, W = self.input_resolution
        img_mask = torch.zeros((1, H, W, 1))
        cnt = 0
        for h in ((0, -self.window_size[0]), (-self.window_size[0], -self.shift_size[0]),
                  (-self.shift_size[0], None)):
            for w in ((0, -self.window_size[1]), (-self.window_size[1], -self.shift_size[1]),
                      (-self.shift_size[1], None)):
                img_mask[:, h[0]:h[1], w[0]:w[1], :] = cnt
                cnt += 1
        mask_windows = _window_partition(img_mask, self.window_size)
        mask_windows = mask_windows.view(-1, self.window_area)
        attn_mask = mask_windows.unsqueeze(1) - mask_windows.unsqueeze(2)
        return attn_mask.masked_fill(attn_mask != 0, float(-100.0)).masked_fill(
            attn_mask == 0, float(0.0))

    def _attn(self, x):
        B, H, W, C = x.shape
        has_shift = any(self.shift_size)
        if has_shift:
            shifted_x = torch.roll(x, shifts=(-self.shift_size[0], -self.shift_size[1]),
                                   dims=(1, 2))
        else:
            shifted_x = x
        x_windows = _window_partition(shifted_x, self.window_size)
        x_windows = x_windows.view(-1, self.window_area, C)
        attn_windows = self.attn(x_windows, mask=self.attn_mask)
        attn_windows = attn_windows.view(-1, self.window_size[0], self.window_size[1], C)
        shifted_x = _window_reverse(attn_windows, self.window_size, H, W)
        if has_shift:
            return torch.roll(shifted_x, shifts=self.shift_size, dims=(1, 2))
        return shifted_x

    def forward(self, x):
        B, H, W, C = x.shape
        x = x + self.drop_path1(self._attn(self.norm1(x)))
        x = x.reshape(B, -1, C)
        x = x + self.drop_path2(self.mlp(self.norm2(x)))
        x = x.reshape(B, H, W, C)
        return x


def drop_rates(drop_path_rate, depth):
    """timm's schedule: linear from 0 to `drop_path_rate` over the depth."""
    return [x.item() for x in torch.linspace(0, drop_path_rate, depth)]


def vit_stack(dim, num_heads, depth, drop_path_rate=0.0, init_values=None):
    """`depth` ViT blocks with timm's linear drop path schedule (as VisionTransformer builds)."""
    return nn.Sequential(*[Block(dim, num_heads, qkv_bias=True, init_values=init_values,
                                 drop_path=r) for r in drop_rates(drop_path_rate, depth)])


def convnext_stack(dim, depth, drop_path_rate=0.0, ls_init_value=1e-6):
    """`depth` ConvNeXt blocks of one stage with the linear drop path schedule."""
    return nn.Sequential(*[ConvNeXtBlock(dim, ls_init_value=ls_init_value, drop_path=r)
                           for r in drop_rates(drop_path_rate, depth)])
