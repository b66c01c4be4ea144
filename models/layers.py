"""Layers written the way XLA:CPU runs them fast, with linen's parameters and results."""

import contextlib
import functools
import itertools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp

NHWC = ("NHWC", "HWIO", "NHWC")  # images, kernels, outputs: linen's layout
_plain = False  # see plain_convolutions


@contextlib.contextmanager
def plain_convolutions():
  """Within it, models trace every convolution as lax's own: for counting a model's FLOPs
  (`profile.flops_per_image`, the bench's FLOP utilisation), which the faster product forms would
  inflate with the taps they multiply by zero. Results are the same within float rounding."""
  global _plain
  before, _plain = _plain, True
  try:
    yield
  finally:
    _plain = before


def max_pool_2x2(x: jnp.ndarray) -> jnp.ndarray:
  """2x2 max-pooling with stride 2 (NHWC), as `nn.max_pool(x, (2, 2), (2, 2))`.

  linen's `max_pool` lowers to `reduce_window`, whose gradient is a `select_and_scatter` that
  XLA:CPU runs slowly. Here the pooling is two elementwise maxima of halves of a reshape (rows,
  then columns) and its gradient goes to each window's first maximum in row-major order, as
  linen's (and PyTorch's): the same values and gradients, and XLA fuses both into simple loops
  (docs/performance.md).
  """
  n, height, width, channels = x.shape
  if height % 2 or width % 2:  # VALID pooling drops the odd row/column; crop it the same way
    height, width = height - height % 2, width - width % 2
    x = jax.lax.slice_in_dim(jax.lax.slice_in_dim(x, 0, height, axis=1), 0, width, axis=2)
  return _max_pool_even(x)


def _pairwise_max_pool(x):
  n, height, width, channels = x.shape
  # lax slices, not indexing: with a symbolic batch (jax.export) indexing becomes a dynamic gather,
  # which TFLite cannot take.
  rows = x.reshape(n, height // 2, 2, width, channels)
  rows = jnp.maximum(jax.lax.index_in_dim(rows, 0, 2, False), jax.lax.index_in_dim(rows, 1, 2, False))
  columns = rows.reshape(n, height // 2, width // 2, 2 * channels)
  return jnp.maximum(jax.lax.slice_in_dim(columns, 0, channels, axis=3),
                     jax.lax.slice_in_dim(columns, channels, 2 * channels, axis=3))


def _first_winner(candidates, best):
  """The index (uint8) of the first of `candidates` (equal shapes) equal to their maximum `best`.
  The backward pass keeps this quarter-size index rather than the pooling's input: its gradient
  is then a select of the output gradient, which on XLA:CPU ran faster than matching the input
  against the maximum again (docs/performance.md)."""
  index = jnp.full(best.shape, len(candidates) - 1, jnp.uint8)
  for i in reversed(range(len(candidates) - 1)):
    index = jnp.where(candidates[i] == best, jnp.uint8(i), index)
  return index


def _to_winners(grad, index, count):
  """`grad` at each of `count` candidates: where `index` names it, else 0."""
  return [jnp.where(index == i, grad, 0.0) for i in range(count)]


@jax.custom_vjp
def _max_pool_even(x):
  return _pairwise_max_pool(x)


def _max_pool_even_fwd(x):
  pooled = _pairwise_max_pool(x)
  n, height, width, channels = x.shape
  windows = x.reshape(n, height // 2, 2, width // 2, 2, channels)
  corner = lambda a, b: jax.lax.index_in_dim(  # noqa: E731
      jax.lax.index_in_dim(windows, a, 2, False), b, 3, False)
  return pooled, _first_winner([corner(a, b) for a in (0, 1) for b in (0, 1)], pooled)


def _max_pool_even_bwd(index, grad):
  n, half_height, half_width, channels = grad.shape
  g00, g01, g10, g11 = _to_winners(grad, index, 4)
  rows = [jnp.stack(pair, axis=3) for pair in ((g00, g01), (g10, g11))]  # (n, H/2, W/2, 2, C)
  windows = jnp.stack(rows, axis=2)  # (n, H/2, 2, W/2, 2, C)
  return (windows.reshape(n, 2 * half_height, 2 * half_width, channels),)


_max_pool_even.defvjp(_max_pool_even_fwd, _max_pool_even_bwd)


def _pairs(x, kernel, padding):
  """Padding as ((top, bottom), (left, right)) for a stride-1 convolution, from a string or pairs."""
  if isinstance(padding, str):
    padding = jax.lax.padtype_to_pads(x.shape[1:3], kernel.shape[:2], (1, 1), padding)
  return tuple(tuple(int(p) for p in pair) for pair in padding)


def _output_size(x, kernel, padding):
  """(H', W') of the stride-1 convolution of NHWC `x` with HWIO `kernel`, padding as pairs."""
  (top, bottom), (left, right) = padding
  return x.shape[1] + top + bottom - kernel.shape[0] + 1, x.shape[2] + left + right - kernel.shape[1] + 1


# Output positions (N * H' * W') up to which a convolution with several input channels is computed
# as a matrix product too. XLA:CPU hands even a batch-1 convolution to its thread pool, and waking
# the other core cost more than the convolution (14x14x16->32 at batch 1, async dispatch off, on a
# 2-core AVX-512 machine: 86 us against 24 us); the product of so few rows runs on the calling
# thread. From batch 2 on (392 positions) XLA's own convolution was faster (docs/benchmarks.md,
# "Batch-1 latency on two cores"). Training never runs convolutions this small at the zoo's batch
# sizes; in serving, the product may round differently from XLA's convolution on some CPUs (the
# ConvNet's second convolution at batch 1 on an AVX2 EPYC: up to 3.6e-7 on outputs up to 2.1).
SMALL_CONV_POSITIONS = 256


def conv(lhs, rhs, window_strides, padding, lhs_dilation=None, rhs_dilation=None,
         dimension_numbers=None, feature_group_count=1, precision=None):
  """`lax.conv_general_dilated`, for `nn.Conv(conv_general_dilated=conv)`: the same parameters
  and gradients, with the forward pass of a one-input-channel convolution, or of a small
  one (`SMALL_CONV_POSITIONS`), computed as one matrix product over the kernel's shifted windows.

  XLA:CPU runs a convolution with one input channel (an MNIST model's first layer) at ~8 GFLOP/s,
  5.6x slower than PyTorch's (benchmarks/op_profile.py). As a matrix product its forward pass costs
  a fifth of that and gives the same bits (tested on AVX2 and AVX-512 CPUs), so training takes the
  steps it took with nn.Conv; its gradients stay XLA's own convolution gradients. Evaluated without
  differentiation, a small kernel over many positions (SHIFTED_TAPS_*) is shifted taps instead,
  which XLA fuses with the layers after it (values within float rounding of the product's). Only
  on the CPU backend, where it was measured: elsewhere every convolution is lax's.
  """
  plain = functools.partial(
      jax.lax.conv_general_dilated, window_strides=window_strides, padding=padding,
      lhs_dilation=lhs_dilation, rhs_dilation=rhs_dilation, dimension_numbers=dimension_numbers,
      feature_group_count=feature_group_count, precision=precision)
  ones = lambda dims: dims is None or all(d == 1 for d in dims)  # noqa: E731
  if _plain or not (
          jax.default_backend() == "cpu" and lhs.ndim == 4 and rhs.ndim == 4 and lhs.dtype == rhs.dtype == jnp.float32
          and jax.lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers)
          == jax.lax.conv_dimension_numbers(lhs.shape, rhs.shape, NHWC)
          and ones(window_strides) and ones(lhs_dilation) and ones(rhs_dilation)
          and feature_group_count == 1 and precision is None):
    return plain(lhs, rhs)
  padding = _pairs(lhs, rhs, padding)
  if rhs.shape[2] > 1 and not _few_positions(lhs, rhs, padding):
    return plain(lhs, rhs)
  return _windows_conv(lhs, rhs, padding)


def _output_positions(x, kernel, padding) -> int | None:
  """N * H' * W' of the convolution's output; None for a symbolic batch (jax.export: many)."""
  out_h, out_w = _output_size(x, kernel, padding)
  positions = x.shape[0] * out_h * out_w
  return positions if isinstance(positions, int) else None


def _few_positions(x, kernel, padding) -> bool:
  positions = _output_positions(x, kernel, padding)
  return positions is not None and positions <= SMALL_CONV_POSITIONS


# Where an evaluated one-channel convolution is shifted taps rather than the product: kernels of
# at most SHIFTED_TAPS_MAX taps over more than SHIFTED_TAPS_MIN_POSITIONS output positions. On the
# AVX2 EPYC (docs/performance.md) the ConvNet (3x3, 16 features) evaluated 1.2-1.4x faster that
# way at batch 1024 and 1.07-1.21x at batch 2-16, but 0.8-0.9x at batch 1 (784 positions);
# LeNet-5 (5x5, 6 features) 0.55-0.92x at batch 1024.
SHIFTED_TAPS_MAX = 9
SHIFTED_TAPS_MIN_POSITIONS = 1024


def _as_shifted_taps(x, kernel, padding) -> bool:
  positions = _output_positions(x, kernel, padding)
  many = positions is None or positions > SHIFTED_TAPS_MIN_POSITIONS
  return kernel.shape[2] == 1 and kernel.shape[0] * kernel.shape[1] <= SHIFTED_TAPS_MAX and many


def _shifted_taps(x, kernel, padding):
  """The one-input-channel convolution as a sum of KH*KW shifted copies of the image, each
  times one tap's F weights: elementwise work, which XLA fuses with the pooling after it."""
  (top, bottom), (left, right) = padding
  kh, kw, _, _ = kernel.shape
  out_h, out_w = _output_size(x, kernel, padding)
  padded = jnp.pad(x, ((0, 0), (top, bottom), (left, right), (0, 0)))
  tap = lambda i, j: jax.lax.slice_in_dim(  # noqa: E731
      jax.lax.slice_in_dim(padded, i, i + out_h, axis=1), j, j + out_w, axis=2) * kernel[i, j, 0]
  total = tap(0, 0)
  for i, j in itertools.product(range(kh), range(kw)):
    if i or j:
      total = total + tap(i, j)
  return total


def _windows_dot(x, kernel, padding):
  """The convolution of (N, H, W, C) `x` with (KH, KW, C, F) `kernel` as (N, H', W', KH*KW*C)
  windows times (KH*KW*C, F)."""
  (top, bottom), (left, right) = padding
  kh, kw, in_channels, features = kernel.shape
  padded = jnp.pad(x, ((0, 0), (top, bottom), (left, right), (0, 0)))
  out_h, out_w = padded.shape[1] - kh + 1, padded.shape[2] - kw + 1
  # lax slices, not indexing: with a symbolic batch (jax.export) indexing becomes a dynamic gather,
  # which TFLite cannot take.
  window = lambda i, j: jax.lax.slice_in_dim(jax.lax.slice_in_dim(padded, i, i + out_h, axis=1),
                                             j, j + out_w, axis=2)
  windows = jnp.concatenate([window(i, j) for i in range(kh) for j in range(kw)], axis=-1)
  return windows @ kernel.reshape(kh * kw * in_channels, features)


def _conv_nhwc(x, kernel, padding):
  return jax.lax.conv_general_dilated(x, kernel, (1, 1), padding,
                                      dimension_numbers=NHWC)


# Evaluated without differentiation, a one-channel convolution is shifted taps (elementwise, fused
# with what follows) where SHIFTED_TAPS_* say so; differentiated, the product.
@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _windows_conv(x, kernel, padding):
  if _as_shifted_taps(x, kernel, padding):
    return _shifted_taps(x, kernel, padding)
  return _windows_dot(x, kernel, padding)


def _windows_conv_fwd(x, kernel, padding):
  return _windows_dot(x, kernel, padding), (x, kernel)


def _windows_conv_bwd(padding, residuals, grad):
  # XLA's own convolution gradients, so that training takes exactly the steps it took before.
  x, kernel = residuals
  return jax.vjp(lambda x, kernel: _conv_nhwc(x, kernel, padding), x, kernel)[1](grad)


_windows_conv.defvjp(_windows_conv_fwd, _windows_conv_bwd)


# Pooling windows (N * H'/2 * W'/2) up to which conv_max_pool_2x2 computes the convolution and the
# pooling apart, and ConvReluMaxPool in linen's order (bias, ReLU, then pooling): a batch-1
# ConvNet forward pass took 150-230 us with the product form and 96-149 us in the earlier order
# (2-core AVX2 EPYC, one-off timing script), though the first block alone ran level either way.
SMALL_POOLED_WINDOWS = 256


def conv_max_pool_2x2(x: jnp.ndarray, kernel: jnp.ndarray, padding="SAME") -> jnp.ndarray:
  """`max_pool_2x2` of the stride-1 NHWC/HWIO convolution of `x` with `kernel`.

  With one input channel (an MNIST model's first layer) on the CPU, each pooling window's four
  outputs come from one (KH+1)x(KW+1) patch of the image, so the convolution and the pooling's
  layout are one matrix product: patches (N, H'/2, W'/2, (KH+1)(KW+1)) times the kernel placed at
  the window's four offsets ((KH+1)(KW+1), 4F), then a max over the four. XLA:CPU runs the
  one-channel convolution at ~6-15 GFLOP/s; with the product the ConvNet trained at 1.14-1.15x
  PyTorch eager's rate instead of 0.97-1.01x (docs/performance.md). The gradients are XLA's convolution
  gradients of the pooled window's winner (the first of ties, as `max_pool_2x2`'s); values match the
  plain form to float rounding, not bit for bit.
  """
  padding = _pairs(x, kernel, padding)
  if _plain or _few_windows(x, kernel, padding) or not (
      jax.default_backend() == "cpu" and x.ndim == 4 and kernel.ndim == 4 and kernel.shape[2] == 1
      and x.dtype == kernel.dtype == jnp.float32):
    return max_pool_2x2(conv(x, kernel, (1, 1), padding, dimension_numbers=NHWC))
  return _conv_pool_product(x, kernel, padding)


def _few_windows(x, kernel, padding) -> bool:
  out_h, out_w = _output_size(x, kernel, padding)
  windows = x.shape[0] * (out_h // 2) * (out_w // 2)
  return isinstance(windows, int) and windows <= SMALL_POOLED_WINDOWS  # a symbolic batch: many


def _pooled_windows(x, kernel, padding):
  """The convolution's outputs at each pooling window's four positions, (N, H'/2, W'/2, 4, F)."""
  (top, bottom), (left, right) = padding
  kh, kw, _, features = kernel.shape
  out_h, out_w = _output_size(x, kernel, padding)
  pooled_h, pooled_w = out_h // 2, out_w // 2
  # Window (i, j) reads the padded image's 2x2 blocks i..i+bh-1, j..j+bw-1: the image as 2x2 blocks
  # (space to depth) and bh*bw shifted slices of it are the patches, cheaper to gather than
  # (KH+1)(KW+1) strided slices.
  bh, bw = (kh + 2) // 2, (kw + 2) // 2
  rows, columns = 2 * (pooled_h + bh - 1), 2 * (pooled_w + bw - 1)
  image = jnp.pad(jax.lax.squeeze(x, (3,)), ((0, 0), (top, max(0, rows - x.shape[1] - top)),
                              (left, max(0, columns - x.shape[2] - left))))
  # lax slices, not indexing: with a symbolic batch (jax.export) indexing becomes a dynamic gather.
  image = jax.lax.slice_in_dim(jax.lax.slice_in_dim(image, 0, rows, axis=1), 0, columns, axis=2)
  n = x.shape[0]
  blocks = image.reshape(n, rows // 2, 2, columns // 2, 2).transpose(0, 1, 3, 2, 4)
  blocks = blocks.reshape(n, rows // 2, columns // 2, 4)
  shifted = lambda i, j: jax.lax.slice_in_dim(  # noqa: E731
      jax.lax.slice_in_dim(blocks, i, i + pooled_h, axis=1), j, j + pooled_w, axis=2)
  patches = jnp.concatenate([shifted(i, j) for i in range(bh) for j in range(bw)], axis=-1)
  # The kernel at the window's offsets (0,0), (0,1), (1,0), (1,1) of its (2bh)x(2bw) patch, its
  # rows and columns ordered as the patches' (block, then position in the block).
  kernel = kernel[:, :, 0, :]
  placed = jnp.stack([jnp.pad(kernel, ((a, 2 * bh - kh - a), (b, 2 * bw - kw - b), (0, 0)))
                      for a in (0, 1) for b in (0, 1)], axis=2)
  placed = placed.reshape(bh, 2, bw, 2, 4 * features).transpose(0, 2, 1, 3, 4)
  windows = patches @ placed.reshape(4 * bh * bw, 4 * features)
  return windows.reshape(*windows.shape[:3], 4, features)


def _max_of_four(windows):  # (..., 4, F) -> (..., F), as elementwise maxima (see max_pool_2x2)
  window = lambda i: jax.lax.index_in_dim(windows, i, windows.ndim - 2, False)  # noqa: E731
  return jnp.maximum(jnp.maximum(window(0), window(1)), jnp.maximum(window(2), window(3)))


# Evaluated without differentiation (eval, predict, export), shifted taps fused with the pooling
# where SHIFTED_TAPS_* say so; differentiated (training), the product, whose four windows the
# gradient reuses.
@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _conv_pool_product(x, kernel, padding):
  if _as_shifted_taps(x, kernel, padding):
    return max_pool_2x2(_shifted_taps(x, kernel, padding))
  return _max_of_four(_pooled_windows(x, kernel, padding))


def _conv_pool_product_fwd(x, kernel, padding):
  windows = _pooled_windows(x, kernel, padding)
  pooled = _max_of_four(windows)
  window = lambda i: jax.lax.index_in_dim(windows, i, 3, False)  # noqa: E731
  return pooled, (x, kernel, _first_winner([window(i) for i in range(4)], pooled))


def _conv_pool_product_bwd(padding, residuals, grad):
  x, kernel, index = residuals
  window_grad = jnp.stack(_to_winners(grad, index, 4), axis=3)  # (N, H'/2, W'/2, 4, F)
  return _conv_grads_of_windows(x, kernel, padding, window_grad)


def _conv_grads_of_windows(x, kernel, padding, window_grad):
  """XLA's convolution gradients (of `x` and `kernel`) for the gradient of each pooling window's
  four outputs, (N, H'/2, W'/2, 4, F)."""
  n, pooled_h, pooled_w, _, features = window_grad.shape
  conv_grad = window_grad.reshape(n, pooled_h, pooled_w, 2, 2, features).transpose(0, 1, 3, 2, 4, 5)
  conv_grad = conv_grad.reshape(n, 2 * pooled_h, 2 * pooled_w, features)
  out_h, out_w = _output_size(x, kernel, padding)
  # The row and column an odd-sized output loses to pooling get no gradient.
  conv_grad = jnp.pad(conv_grad, ((0, 0), (0, out_h - 2 * pooled_h), (0, out_w - 2 * pooled_w), (0, 0)))
  return jax.vjp(lambda x, kernel: _conv_nhwc(x, kernel, padding), x, kernel)[1](conv_grad)


_conv_pool_product.defvjp(_conv_pool_product_fwd, _conv_pool_product_bwd)


class ConvReluMaxPool(nn.Module):
  """`max_pool_2x2(relu(nn.Conv(features, kernel_size, padding)(x)))` with nn.Conv's parameters
  (name it as the nn.Conv it replaces and checkpoints load unchanged), computed as
  relu(conv_max_pool_2x2(x, kernel) + bias). The reordering is exact, since a max commutes with
  adding a per-channel bias and with ReLU, and puts the bias and ReLU on a quarter of the elements;
  the one-channel product rounds differently from XLA's convolution (see conv_max_pool_2x2)."""

  features: int
  kernel_size: tuple = (3, 3)
  padding: str = "SAME"

  @nn.compact
  def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
    kernel = self.param("kernel", nn.initializers.lecun_normal(),
                        (*self.kernel_size, x.shape[-1], self.features))
    bias = self.param("bias", nn.initializers.zeros_init(), (self.features,))
    if _few_windows(x, kernel, _pairs(x, kernel, self.padding)):  # see SMALL_POOLED_WINDOWS
      convolved = conv(x, kernel, (1, 1), self.padding, dimension_numbers=NHWC)
      return max_pool_2x2(nn.relu(convolved + bias))
    return nn.relu(conv_max_pool_2x2(x, kernel, self.padding) + bias)


def normal(stddev: float = 1e-2):
  """`nn.initializers.normal(stddev)` with the same bits in a jitted `init` as in an eager one.

  Under jit, XLA folds the scale into the normal sampler's own arithmetic and rounds differently
  (vit_tiny's pos_embed moved by up to 3.7e-9); the barrier keeps the sample and the scaling apart.
  """
  def init(key, shape, dtype=jnp.float32):
    sample = jax.lax.optimization_barrier(jax.random.normal(key, shape, dtype))
    return sample * jnp.array(stddev, dtype)
  return init


# nn.Conv computing with `conv`: same parameter names, initialisation and results as nn.Conv.
Conv = functools.partial(nn.Conv, conv_general_dilated=conv)


def keep_mask(key: jax.Array, shape: tuple[int, ...], keep_prob: float) -> tuple[jnp.ndarray, float]:
  """Dropout's Bernoulli(keep_prob) mask of `shape`, and the scale that keeps the mean.

  `jax.random.bernoulli` draws a 32-bit threefry word per element; this cuts each word into four
  8-bit draws. ViT-tiny draws ~25k per image; its train step ran 1.25x faster (docs/performance.md).
  keep_prob is rounded to a multiple of 1/256 (rate 0.1 drops 26/256); the scale is exact for it.
  """
  size = math.prod(shape)
  words = jax.random.bits(key, ((size + 3) // 4,), jnp.uint32)
  draws = jax.lax.bitcast_convert_type(words, jnp.uint8).reshape(-1)[:size].reshape(shape)
  threshold = max(1, round(keep_prob * 256))
  return draws.astype(jnp.uint32) < threshold, 256 / threshold


def dropout(key: jax.Array, x: jnp.ndarray, rate: float, mask_shape=None) -> jnp.ndarray:
  """Inverted dropout of `x` at `rate` with `keep_mask`'s draws; a `mask_shape` of 1s where `x`
  has more broadcasts one mask over those axes."""
  if rate >= 1.0:
    return jnp.zeros_like(x)
  keep, scale = keep_mask(key, x.shape if mask_shape is None else mask_shape, 1.0 - rate)
  return jnp.where(keep, x * jnp.asarray(scale, x.dtype), jnp.zeros((), x.dtype))


class Dropout(nn.Module):
  """nn.Dropout (rate, `deterministic`, the `dropout` rng stream) drawing with `keep_mask`."""

  rate: float
  deterministic: bool | None = None

  @nn.compact
  def __call__(self, x: jnp.ndarray, deterministic: bool | None = None) -> jnp.ndarray:
    deterministic = nn.merge_param("deterministic", self.deterministic, deterministic)
    if deterministic or self.rate == 0.0:
      return x
    return dropout(self.make_rng("dropout"), x, self.rate)


def dot_product_attention(query, key, value, mask=None, dropout_rng=None, dropout_rate=0.0,
                          broadcast_dropout=True, deterministic=True, dtype=None, precision=None):
  """`nn.dot_product_attention` (an `attention_fn` for nn.MultiHeadDotProductAttention) whose
  dropout on the attention weights draws with `keep_mask`, one (query, key) mask for the whole
  batch and every head unless `broadcast_dropout` is False; without dropout the same operations."""
  weights = nn.dot_product_attention_weights(query, key, mask=mask, dtype=dtype,
                                             precision=precision)
  if not deterministic and dropout_rate > 0.0:
    mask_shape = (1,) * (weights.ndim - 2) + weights.shape[-2:] if broadcast_dropout else None
    weights = dropout(dropout_rng, weights, dropout_rate, mask_shape)
  return jnp.einsum("...hqk,...khd->...qhd", weights, value, precision=precision)


def _channel_sums(x: jnp.ndarray) -> jnp.ndarray:
  """Per-channel sums of an (N, ..., C) array: a matrix product over the batch, then a small
  reduction over the positions. XLA:CPU runs a reduction over batch × height × width slowly: up
  to 3.7x the time of this (docs/performance.md, "BatchNorm's statistics as matrix products")."""
  batch = x.shape[0]
  per_position = jnp.ones((1, batch), x.dtype) @ x.reshape(batch, -1)
  return per_position.reshape(-1, x.shape[-1]).sum(0)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def batch_norm_train(x, scale, bias, epsilon):
  """BatchNorm over all but the last axis with the batch's own statistics, as nn.BatchNorm
  (use_fast_variance): returns (y, mean, var); every reduction, forward and backward, is
  `_channel_sums`."""
  return _batch_norm_train_fwd(x, scale, bias, epsilon)[0]


def _batch_norm_train_fwd(x, scale, bias, epsilon):
  count = x.size // x.shape[-1]
  mean = _channel_sums(x) / count
  var = jnp.maximum(_channel_sums(x * x) / count - mean * mean, 0.0)
  inv = jax.lax.rsqrt(var + epsilon)
  y = (x - mean) * (inv * scale) + bias  # nn.BatchNorm's order of operations
  return (y, mean, var), (x, mean, inv, scale)


def _batch_norm_train_bwd(epsilon, residuals, cotangents):
  x, mean, inv, scale = residuals
  grad, grad_mean, grad_var = cotangents  # the last two from whatever reads the statistics
  count = x.size // x.shape[-1]
  centered = x - mean
  normalized = centered * inv
  grad_bias = _channel_sums(grad)
  grad_scale = _channel_sums(grad * normalized)
  grad_x = (scale * inv / count) * (count * grad - grad_bias - normalized * grad_scale)
  grad_x = grad_x + grad_mean / count + grad_var * (2.0 / count) * centered
  return grad_x, grad_scale, grad_bias


batch_norm_train.defvjp(_batch_norm_train_fwd, _batch_norm_train_bwd)


class BatchNorm(nn.Module):
  """nn.BatchNorm over the last axis (its parameters, statistics, names and initialisation: it
  replaces nn.BatchNorm in checkpoints unchanged) whose training-mode statistics and gradients
  are `batch_norm_train`'s matrix products. With running averages it computes as nn.BatchNorm."""

  use_running_average: bool | None = None
  momentum: float = 0.99
  epsilon: float = 1e-5
  scale_init: nn.initializers.Initializer = nn.initializers.ones
  bias_init: nn.initializers.Initializer = nn.initializers.zeros

  @nn.compact
  def __call__(self, x: jnp.ndarray, use_running_average: bool | None = None) -> jnp.ndarray:
    use_running_average = nn.merge_param("use_running_average", self.use_running_average,
                                         use_running_average)
    shape = (x.shape[-1],)
    running_mean = self.variable("batch_stats", "mean", lambda s: jnp.zeros(s, jnp.float32), shape)
    running_var = self.variable("batch_stats", "var", lambda s: jnp.ones(s, jnp.float32), shape)
    scale = self.param("scale", self.scale_init, shape, jnp.float32)
    bias = self.param("bias", self.bias_init, shape, jnp.float32)
    if use_running_average:
      return (x - running_mean.value) * (jax.lax.rsqrt(running_var.value + self.epsilon) * scale) + bias
    y, mean, var = batch_norm_train(x, scale, bias, self.epsilon)
    if not self.is_initializing():
      running_mean.value = self.momentum * running_mean.value + (1 - self.momentum) * mean
      running_var.value = self.momentum * running_var.value + (1 - self.momentum) * var
    return y
