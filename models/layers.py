"""Layers written the way XLA:CPU runs them fast, with linen's parameters and results."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp


def max_pool_2x2(x: jnp.ndarray) -> jnp.ndarray:
  """2x2 max-pooling with stride 2 (NHWC), as `nn.max_pool(x, (2, 2), (2, 2))`.

  linen's `max_pool` lowers to `reduce_window`, whose gradient is a `select_and_scatter` that
  XLA:CPU runs slowly; a reshape and a max over the window axes computes the same values and
  trained the ConvNet 2.6x faster (docs/benchmarks.md).
  """
  n, height, width, channels = x.shape
  if height % 2 or width % 2:  # VALID pooling drops the odd row/column; crop it the same way
    height, width = height - height % 2, width - width % 2
    x = jax.lax.slice_in_dim(jax.lax.slice_in_dim(x, 0, height, axis=1), 0, width, axis=2)
  return x.reshape(n, height // 2, 2, width // 2, 2, channels).max(axis=(2, 4))


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
  a fifth of that and gives the same bits (tested on AVX2 and AVX-512 CPUs); its gradients stay
  XLA's own convolution gradients. Only on the CPU backend, where it was measured: elsewhere every
  convolution is lax's.
  """
  plain = functools.partial(
      jax.lax.conv_general_dilated, window_strides=window_strides, padding=padding,
      lhs_dilation=lhs_dilation, rhs_dilation=rhs_dilation, dimension_numbers=dimension_numbers,
      feature_group_count=feature_group_count, precision=precision)
  ones = lambda dims: dims is None or all(d == 1 for d in dims)  # noqa: E731
  if not (jax.default_backend() == "cpu" and lhs.ndim == 4 and rhs.ndim == 4 and lhs.dtype == rhs.dtype == jnp.float32
          and jax.lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers)
          == jax.lax.conv_dimension_numbers(lhs.shape, rhs.shape, ("NHWC", "HWIO", "NHWC"))
          and ones(window_strides) and ones(lhs_dilation) and ones(rhs_dilation)
          and feature_group_count == 1 and precision is None):
    return plain(lhs, rhs)
  if isinstance(padding, str):
    padding = jax.lax.padtype_to_pads(lhs.shape[1:3], rhs.shape[:2], (1, 1), padding)
  padding = tuple(tuple(int(p) for p in pair) for pair in padding)
  (top, bottom), (left, right) = padding
  positions = (lhs.shape[0] * (lhs.shape[1] + top + bottom - rhs.shape[0] + 1)
               * (lhs.shape[2] + left + right - rhs.shape[1] + 1))
  small = isinstance(positions, int) and positions <= SMALL_CONV_POSITIONS  # a symbolic batch: large
  if rhs.shape[2] > 1 and not small:
    return plain(lhs, rhs)
  return _windows_conv(lhs, rhs, padding)


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
                                      dimension_numbers=("NHWC", "HWIO", "NHWC"))


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _windows_conv(x, kernel, padding):
  return _windows_dot(x, kernel, padding)


def _windows_conv_fwd(x, kernel, padding):
  return _windows_dot(x, kernel, padding), (x, kernel)


def _windows_conv_bwd(padding, residuals, grad):
  # XLA's own convolution gradients, so that training takes exactly the steps it took before.
  x, kernel = residuals
  return jax.vjp(lambda x, kernel: _conv_nhwc(x, kernel, padding), x, kernel)[1](grad)


_windows_conv.defvjp(_windows_conv_fwd, _windows_conv_bwd)


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
