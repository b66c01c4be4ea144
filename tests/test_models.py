
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flaxzoo import models
from flaxzoo.models import MLP, ConvNet, create_model, init_variables, list_models

# Every test computes through jax.jit and draws its inputs with NumPy: eagerly, each op and shape
# compiles a program of its own (an eager ConvNet init and forward pass took 4 s, jitted 0.9 s).


def uniform(shape, seed=0):
  return np.random.default_rng(seed).uniform(size=shape).astype(np.float32)


def normal(shape, seed=0):
  return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def trees_equal(a, b) -> bool:
  """Same structure and every leaf equal to the bit (on the host: no per-shape program)."""
  return (jax.tree.structure(a) == jax.tree.structure(b)
          and all(np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b))))


@pytest.mark.parametrize("name,cls", [("convnet", ConvNet), ("mlp", MLP)])
@pytest.mark.parametrize("num_classes", [10, 3])
def test_forward_shape(name, cls, num_classes):
  model = create_model(name, num_classes=num_classes)
  assert isinstance(model, cls)
  variables = init_variables(model, jax.random.PRNGKey(0), (28, 28, 1))
  logits = jax.jit(model.apply)(variables, np.zeros((2, 28, 28, 1), np.float32))
  assert logits.shape == (2, num_classes)
  assert logits.dtype == jnp.float32


def test_convnet_widths_are_attributes():
  model = ConvNet(num_classes=10, widths=(4, 8), hidden=16)
  params = models.abstract_variables(model)["params"]
  assert params["Conv_0"]["kernel"].shape == (3, 3, 1, 4)
  assert params["Conv_1"]["kernel"].shape == (3, 3, 4, 8)
  assert params["head"]["kernel"].shape == (16, 10)


def test_convnet_batch_norm_and_dropout_are_options():
  plain = models.abstract_variables(ConvNet(num_classes=10))
  assert set(plain) == {"params"} and "bias" in plain["params"]["Conv_0"]  # the default is unchanged
  model = ConvNet(num_classes=10, widths=(4, 8), hidden=16, batch_norm=True, dropout=0.5)
  variables = init_variables(model, jax.random.PRNGKey(0), (28, 28, 1))
  assert set(variables["batch_stats"]) == {"BatchNorm_0", "BatchNorm_1"}
  assert "bias" not in variables["params"]["Conv_0"]  # BatchNorm's offset replaces it
  x = uniform((4, 28, 28, 1), seed=1)
  evaluate = jax.jit(model.apply)
  np.testing.assert_array_equal(evaluate(variables, x), evaluate(variables, x))  # eval: no dropout
  train_logits, _ = jax.jit(lambda v, x: model.apply(v, x, train=True, rngs={"dropout": jax.random.PRNGKey(2)},
                                                     mutable=["batch_stats"]))(variables, x)
  assert not np.allclose(train_logits, evaluate(variables, x))


def test_convnet_convs_per_block_stacks_convolutions_before_each_pooling():
  params = models.abstract_variables(ConvNet(num_classes=10, widths=(4, 8), hidden=16,
                                             convs_per_block=2))["params"]
  shapes = [params[f"Conv_{i}"]["kernel"].shape for i in range(4)]
  assert shapes == [(3, 3, 1, 4), (3, 3, 4, 4), (3, 3, 4, 8), (3, 3, 8, 8)]
  assert params["Dense_0"]["kernel"].shape == (7 * 7 * 8, 16)  # two poolings, as with one conv


def test_list_models_with_wildcards():
  assert {"convnet", "mlp"} <= set(list_models())
  assert list_models("conv*") == ["convnet"]
  assert list_models("*lp") == ["mlp"]
  assert list_models("nothing*") == []


def test_unknown_model_lists_available_ones():
  with pytest.raises(models.UnknownModelError) as e:
    create_model("convent")
  message = str(e.value)
  assert "Did you mean convnet" in message
  assert "convnet" in message and "mlp" in message


def test_unknown_kwarg_lists_valid_ones():
  with pytest.raises(TypeError, match="valid arguments: num_classes, widths, hidden"):
    create_model("convnet", width=3)


def test_json_lists_become_tuples_and_round_trip():
  model = create_model("convnet", num_classes=5, widths=[8, 16])
  assert model.widths == (8, 16)
  hash(model)  # jit needs hashable static modules
  assert models.model_kwargs(model) == {"widths": [8, 16], "hidden": 128, "batch_norm": False,
                                        "dropout": 0.0, "convs_per_block": 1}
  assert create_model("convnet", num_classes=5, **models.model_kwargs(model)) == model


def test_register_model_rejects_a_taken_name():
  with pytest.raises(ValueError, match="already registered"):
    models.register_model("convnet")(type("Other", (), {}))


@pytest.mark.parametrize("shape", [(2, 28, 28, 3), (2, 7, 9, 2)])
def test_max_pool_2x2_matches_linen_values_and_gradients(shape):
  import flax.linen as nn

  from flaxzoo.models.layers import max_pool_2x2
  x = normal(shape)
  linen = lambda x: nn.max_pool(x, (2, 2), (2, 2))  # noqa: E731
  np.testing.assert_array_equal(jax.jit(max_pool_2x2)(x), jax.jit(linen)(x))
  weights = normal(jax.eval_shape(linen, x).shape, seed=1)
  grad = lambda pool, x=x: jax.jit(jax.grad(lambda x: jnp.sum(pool(x) * weights)))(x)  # noqa: E731
  np.testing.assert_array_equal(grad(max_pool_2x2), grad(linen))
  # Ties (ReLU's zeros, rounded pixels): each window's gradient goes to its first maximum in
  # row-major order, as linen's (not shared evenly, as a max over the window axes shares it).
  ties = np.round(x)
  assert np.unique(ties).size < ties.size // 4  # many windows hold ties
  np.testing.assert_array_equal(jax.jit(max_pool_2x2)(ties), jax.jit(linen)(ties))
  np.testing.assert_array_equal(grad(max_pool_2x2, ties), grad(linen, ties))


@pytest.mark.parametrize("features, kernel, padding, in_channels, shape", [
    (16, (3, 3), "SAME", 1, (16, 28, 28)), (6, (5, 5), "SAME", 1, (16, 28, 28)),
    (16, (5, 5), "VALID", 1, (16, 28, 28)), (8, (3, 3), ((2, 0), (1, 1)), 1, (16, 28, 28)),
    (8, (3, 3), "SAME", 3, (16, 28, 28)),  # several input channels, large: lax's convolution
    # several input channels, at most SMALL_CONV_POSITIONS output positions: the matrix product
    (32, (3, 3), "SAME", 16, (1, 14, 14)), (8, (3, 3), "VALID", 3, (2, 9, 9)),
    (16, (5, 5), "SAME", 6, (1, 7, 7)),
])
def test_conv_layer_matches_nn_conv(features, kernel, padding, in_channels, shape):
  """layers.Conv computes some convolutions' forward pass as a matrix product, for speed, with
  nn.Conv's parameters: its outputs and gradients are nn.Conv's within float32 rounding, and it
  runs the form expected for each shape."""
  import flax.linen as nn

  from flaxzoo.models import layers
  x = uniform((*shape, in_channels))
  plain, fast = nn.Conv(features, kernel, padding=padding), layers.Conv(features, kernel, padding=padding)
  variables = jax.jit(plain.init)(jax.random.PRNGKey(1), x)
  assert trees_equal(variables, jax.jit(fast.init)(jax.random.PRNGKey(1), x))
  apply = lambda module: jax.jit(module.apply)  # noqa: E731
  grad = lambda module: jax.jit(jax.grad(  # noqa: E731
      lambda v, x: jnp.sum(jnp.tanh(module.apply(v, x)) ** 2), argnums=(0, 1)))(variables, x)
  has_convolution = "convolution(" in jax.jit(fast.apply).lower(variables, x).as_text(dialect="hlo")
  small = np.prod(jax.eval_shape(fast.apply, variables, x).shape[:3]) <= layers.SMALL_CONV_POSITIONS
  assert has_convolution == (in_channels > 1 and not small)  # the form expected is the one that runs
  # Two different XLA programs: equal within float32 rounding, not necessarily to the bit (the
  # ConvNet's second convolution at batch 1 differed by 3.6e-7 on an AVX2 EPYC).
  np.testing.assert_allclose(apply(fast)(variables, x), apply(plain)(variables, x), rtol=1e-6, atol=1e-6)
  for a, b in zip(jax.tree.leaves(grad(fast)), jax.tree.leaves(grad(plain))):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("features, kernel, padding, in_channels, shape", [
    (16, (3, 3), "SAME", 1, (16, 28, 28)), (6, (5, 5), "SAME", 1, (16, 28, 28)),
    (16, (5, 5), "VALID", 1, (16, 28, 28)),  # a 24x24 output
    (8, (3, 3), "VALID", 1, (4, 13, 12)),  # an odd 11x10 output: pooling drops its last row
    (8, (3, 3), ((2, 0), (1, 1)), 1, (1, 28, 28)),
    (32, (3, 3), "SAME", 16, (16, 14, 14)), (16, (5, 5), "VALID", 6, (8, 14, 14)),  # lax's conv
])
def test_conv_relu_max_pool_matches_the_plain_layers(features, kernel, padding, in_channels, shape):
  """layers.ConvReluMaxPool computes a one-channel convolution and its pooling as shifted taps
  when evaluated and as one matrix product when differentiated (a custom gradient), and moves bias
  and ReLU after the pooling: nn.Conv's parameters, and max_pool_2x2(relu(nn.Conv)) 's outputs
  (both forms) and gradients within float32 rounding."""
  import flax.linen as nn

  from flaxzoo.models import layers
  x = uniform((*shape, in_channels))
  conv, fused = nn.Conv(features, kernel, padding=padding), layers.ConvReluMaxPool(features, kernel, padding)
  variables = jax.jit(conv.init)(jax.random.PRNGKey(1), x)
  assert trees_equal(variables, jax.jit(fused.init)(jax.random.PRNGKey(1), x))
  variables = jax.tree.map(lambda v: np.asarray(v) + np.float32(0.1), variables)  # a nonzero bias: its place matters
  plain = lambda v, x: layers.max_pool_2x2(nn.relu(conv.apply(v, x)))  # noqa: E731
  hlo = jax.jit(fused.apply).lower(variables, x).as_text(dialect="hlo")
  assert ("convolution(" in hlo) == (in_channels > 1)  # the form expected is the one that runs
  if in_channels == 1:  # evaluated: shifted taps (no product) for a 3x3 kernel over many positions
    positions = np.prod(jax.eval_shape(conv.apply, variables, x).shape[:3])
    shifted = kernel == (3, 3) and positions > layers.SHIFTED_TAPS_MIN_POSITIONS
    assert ("dot(" in hlo) != shifted
  expected = jax.jit(plain)(variables, x)
  np.testing.assert_allclose(jax.jit(fused.apply)(variables, x), expected, rtol=1e-5, atol=1e-5)
  differentiated = jax.jit(lambda v, x: jax.vjp(fused.apply, v, x)[0])(variables, x)
  np.testing.assert_allclose(differentiated, expected, rtol=1e-5, atol=1e-5)
  weights = normal(jax.eval_shape(plain, variables, x).shape, seed=2)
  grad = lambda apply: jax.jit(jax.grad(  # noqa: E731
      lambda v, x: jnp.sum(jnp.tanh(apply(v, x)) * weights), argnums=(0, 1)))(variables, x)
  for a, b in zip(jax.tree.leaves(grad(fused.apply)), jax.tree.leaves(grad(plain))):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4 * float(np.abs(b).max()))


def test_conv_relu_max_pool_gradients_where_the_image_is_blank():
  """MNIST-like images (mostly exact zeros) give tied pooling windows: the product form's
  gradient goes to each window's first maximum, and still matches the plain layers'."""
  import flax.linen as nn

  from flaxzoo.models import layers
  x = uniform((16, 28, 28, 1))
  x = np.where(x < 0.7, 0, x).astype(np.float32)
  conv, fused = nn.Conv(16, (3, 3)), layers.ConvReluMaxPool(16, (3, 3))
  variables = jax.tree.map(lambda v: np.asarray(v) + np.float32(0.1),
                           jax.jit(conv.init)(jax.random.PRNGKey(1), x))
  plain = lambda v, x: layers.max_pool_2x2(nn.relu(conv.apply(v, x)))  # noqa: E731
  weights = normal(jax.eval_shape(plain, variables, x).shape, seed=2)
  grad = lambda apply: jax.jit(jax.grad(  # noqa: E731
      lambda v: jnp.sum(jnp.tanh(apply(v, x)) * weights)))(variables)
  for a, b in zip(jax.tree.leaves(grad(fused.apply)), jax.tree.leaves(grad(plain))):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4 * float(np.abs(b).max()))


# Eager init compiles every op on its own (~10 s for resnet or a 6-block vit_tiny): one block of
# ViT-tiny carries its own initialiser (pos_embed); resnet's are convnet's and BatchNorm's constants.
@pytest.mark.parametrize("name, kwargs", [("convnet", {}), ("lenet5", {}), ("mlp", {}), ("vit_tiny", {"depth": 1})])
def test_jitted_init_matches_the_eager_init(name, kwargs):
  """models.init_variables jits `model.init` for a faster start: the same parameters as an
  eager init within float32 rounding (two XLA programs; a seeded run repeats its own bits)."""
  model, key = create_model(name, num_classes=10, **kwargs), jax.random.PRNGKey(7)
  eager = model.init(key, jnp.zeros((1, 28, 28, 1)), train=False)
  jitted = init_variables(model, key, (28, 28, 1))
  assert jax.tree.structure(eager) == jax.tree.structure(jitted)
  for a, b in zip(jax.tree.leaves(eager), jax.tree.leaves(jitted)):  # two XLA programs: rounding may differ
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-8)


def test_run_once_compilation_keeps_the_default_levels_bits():
  """The train state is compiled at XLA's backend level 1 for a quicker start (state.run_once): the
  initial parameters must stay those of the default level, or seeded runs would change."""
  from flaxzoo.training import state
  model, key = create_model("convnet", num_classes=10), jax.random.PRNGKey(3)
  init = lambda key: model.init(key, jnp.zeros((1, 28, 28, 1)), train=False)  # noqa: E731
  default, quick = jax.jit(init)(key), state.run_once(init)(key)
  assert jax.tree.all(jax.tree.map(np.array_equal, default, quick))


def test_conv_layer_leaves_other_convolutions_to_lax():
  import flax.linen as nn

  from flaxzoo.models import layers
  for conv, x in [(dict(features=4, kernel_size=(3,)), np.ones((2, 10, 1), np.float32)),  # 1-D
                  (dict(features=4, kernel_size=(3, 3), strides=2), np.ones((2, 8, 8, 1), np.float32))]:
    variables = jax.jit(nn.Conv(**conv).init)(jax.random.PRNGKey(0), x)
    np.testing.assert_array_equal(jax.jit(layers.Conv(**conv).apply)(variables, x),
                                  jax.jit(nn.Conv(**conv).apply)(variables, x))


@pytest.mark.parametrize("shape", [(16, 7, 7, 8), (8, 4, 4, 3), (32, 5)])
def test_batch_norm_layer_matches_nn_batch_norm(shape):
  """layers.BatchNorm: nn.BatchNorm's variables, eval outputs to the bit; in training its outputs,
  updated statistics and gradients (parameters and input) within float rounding."""
  from flaxzoo.models import layers
  x = normal(shape) * 2.0 + 0.5
  w = normal(shape, seed=1)
  ours, theirs = (cls(momentum=0.9, scale_init=nn.initializers.constant(1.3))
                  for cls in (layers.BatchNorm, nn.BatchNorm))
  init = lambda module: jax.jit(functools.partial(module.init, use_running_average=False))  # noqa: E731
  variables = init(ours)(jax.random.PRNGKey(2), x)
  assert trees_equal(variables, init(theirs)(jax.random.PRNGKey(2), x))  # names, shapes, values
  variables = jax.tree.map(lambda v: np.asarray(v) + np.float32(0.1), variables)
  evaluate = lambda module: jax.jit(functools.partial(module.apply, use_running_average=True))  # noqa: E731
  np.testing.assert_array_equal(evaluate(ours)(variables, x), evaluate(theirs)(variables, x))

  def loss(module, params, x):
    y, updates = module.apply({**variables, "params": params}, x, use_running_average=False,
                              mutable=["batch_stats"])
    return jnp.sum(jnp.tanh(y) * w), (y, updates)

  (value, (y, stats)), grads = jax.jit(jax.value_and_grad(functools.partial(loss, ours), (0, 1), has_aux=True))(
      variables["params"], x)
  (value_ref, (y_ref, stats_ref)), grads_ref = jax.jit(jax.value_and_grad(
      functools.partial(loss, theirs), (0, 1), has_aux=True))(variables["params"], x)
  expected = jax.tree.leaves((value_ref, y_ref, stats_ref, grads_ref))
  for got, want in zip(jax.tree.leaves((value, y, stats, grads)), expected, strict=True):
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_batch_norm_statistics_are_differentiable_outputs():
  """batch_norm_train's mean and variance carry their gradients too (as nn.BatchNorm's would)."""
  from flaxzoo.models import layers
  x = normal((6, 3, 3, 4)) + 1.0
  scale, bias = np.full((4,), 0.7, np.float32), np.full((4,), 0.2, np.float32)

  def plain(x, scale, bias):
    mean = x.mean((0, 1, 2))
    var = jnp.maximum((x * x).mean((0, 1, 2)) - mean * mean, 0.0)
    return (x - mean) * (jax.lax.rsqrt(var + 1e-5) * scale) + bias, mean, var

  def uses_all(norm, x, scale, bias):
    y, mean, var = norm(x, scale, bias)
    return jnp.sum(jnp.sin(y)) + jnp.sum(mean ** 2) + jnp.sum(jnp.cos(var))

  gradient = lambda norm: jax.jit(jax.grad(functools.partial(uses_all, norm), (0, 1, 2)))(x, scale, bias)  # noqa: E731
  got = gradient(lambda *a: layers.batch_norm_train(*a, 1e-5))
  want = gradient(plain)
  for g, r in zip(got, want):
    np.testing.assert_allclose(g, r, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("rate", [0.1, 0.25, 0.5])
def test_dropout_draws_are_a_function_of_the_key_and_keep_the_rate(rate):
  from flaxzoo.models import layers
  key = jax.random.key(3)
  keep, scale = layers.keep_mask(key, (64, 33, 17), 1.0 - rate)
  again, _ = layers.keep_mask(key, (64, 33, 17), 1.0 - rate)
  other, _ = layers.keep_mask(jax.random.key(4), (64, 33, 17), 1.0 - rate)
  assert keep.shape == (64, 33, 17) and keep.dtype == jnp.bool_
  np.testing.assert_array_equal(keep, again)
  assert not np.array_equal(keep, other)
  kept = round((1.0 - rate) * 256) / 256  # the rate rounded to 1/256
  assert scale == pytest.approx(1.0 / kept)
  assert float(keep.mean()) == pytest.approx(kept, abs=0.01)  # 35,904 draws: 5 sigma < 0.013
  x = normal((64, 33, 17)) + 2.0
  dropped = layers.dropout(key, x, rate)
  np.testing.assert_array_equal(dropped, np.where(keep, x * np.float32(scale), 0.0))
  assert float(dropped.mean()) == pytest.approx(float(x.mean()), rel=0.02)


def test_dropout_layer_is_the_identity_in_eval_and_draws_from_the_dropout_stream():
  from flaxzoo.models import layers
  x = normal((8, 16)) + 1.0
  layer = layers.Dropout(0.3)
  np.testing.assert_array_equal(layer.apply({}, x, deterministic=True), x)
  train = lambda seed: layer.apply({}, x, deterministic=False, rngs={"dropout": jax.random.key(seed)})  # noqa: E731
  np.testing.assert_array_equal(train(0), train(0))
  assert not np.array_equal(train(0), train(1))
  assert 0 < int((train(0) == 0).sum()) < x.size


def test_attention_fn_matches_linens_and_broadcasts_its_dropout_mask():
  """Without dropout, layers.dot_product_attention computes as nn.dot_product_attention; with it,
  one (query, key) mask serves every example and head, as linen's broadcast_dropout does."""
  from flaxzoo.models import layers
  query, key, value = normal((3, 5, 2, 4)), normal((3, 5, 2, 4)) * 0.5, normal((3, 5, 2, 4))
  np.testing.assert_allclose(layers.dot_product_attention(query, key, value),
                             nn.dot_product_attention(query, key, value), rtol=1e-6, atol=1e-6)
  ones = jnp.ones((3, 5, 2, 5))  # value = identity per head: the output is the weights themselves
  eye = jnp.broadcast_to(jnp.eye(5)[None, :, None, :], (3, 5, 2, 5))
  weights = layers.dot_product_attention(ones[..., :4], ones[..., :4], eye, dropout_rate=0.5,
                                         dropout_rng=jax.random.key(0), deterministic=False)
  zeros = np.asarray(weights == 0)  # (batch, query, head, key)
  assert zeros.any() and not zeros.all()
  assert (zeros == zeros[:1, :, :1, :]).all()
  kept = round(0.5 * 256) / 256
  np.testing.assert_allclose(weights[~zeros], 0.2 / kept, rtol=1e-6)  # uniform weights, rescaled
