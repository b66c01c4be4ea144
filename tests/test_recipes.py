"""Training options from optax: label smoothing, learning-rate schedules, SGD with Nesterov
momentum; and in evaluation top-5 accuracy and flip test-time augmentation."""

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import generated_images, write_checkpoint
from PIL import Image

from flaxzoo import models
from flaxzoo.models import init_variables
from flaxzoo.training import checkpoint
from flaxzoo.training.config import Config, ConfigError, validate
from flaxzoo.training.evaluation import evaluate, logits_step
from flaxzoo.training.inference import predict_arrays, predict_files
from flaxzoo.training.optimizer import learning_rate_schedule
from flaxzoo.training.state import create_train_state
from flaxzoo.training.steps import cross_entropy, train_step

TINY = {"widths": [4, 8], "hidden": 16}


def test_label_smoothing_is_optax_smoothed_cross_entropy():
  logits = jax.random.normal(jax.random.PRNGKey(0), (6, 10))
  labels = jnp.arange(6) % 10
  e = 0.1
  targets = (1 - e) * jax.nn.one_hot(labels, 10) + e / 10
  by_hand = -jnp.sum(targets * jax.nn.log_softmax(logits), axis=-1)
  np.testing.assert_allclose(cross_entropy(logits, labels, e), by_hand, rtol=1e-6)
  np.testing.assert_array_equal(cross_entropy(logits, labels, 0.0),
                                optax.softmax_cross_entropy_with_integer_labels(logits, labels))


def test_schedules_have_their_shapes():
  base = Config(learning_rate=0.1, warmup_fraction=0.1)
  at = lambda schedule, step: float(learning_rate_schedule(  # noqa: E731
      dataclasses.replace(base, schedule=schedule), 100)(step))
  onecycle = optax.cosine_onecycle_schedule(transition_steps=100, peak_value=0.1, pct_start=0.1)
  assert all(at("onecycle", s) == float(onecycle(s)) for s in (0, 10, 50, 99))  # the default, unchanged
  for schedule in ("cosine", "linear", "step"):
    assert at(schedule, 0) == 0.0 and at(schedule, 10) == pytest.approx(0.1)  # linear warm-up
  assert at("cosine", 100) == pytest.approx(0.0, abs=1e-9) and at("linear", 55) == pytest.approx(0.05)
  assert at("step", 49) == pytest.approx(0.1) and at("step", 60) == pytest.approx(0.01)
  assert at("step", 80) == pytest.approx(0.001)
  assert at("constant", 0) == at("constant", 99) == pytest.approx(0.1)


@pytest.mark.slow  # 2 x 2 x 20 steps; the fast tier keeps the unit tests of each option
@pytest.mark.parametrize("overrides", [dict(optimizer="sgd", schedule="cosine", learning_rate=0.05),
                                       dict(label_smoothing=0.1, schedule="step")])
def test_options_train_deterministically(overrides):
  images, labels = generated_images(64)
  labels = labels % 2
  images[labels == 1] //= 4  # a learnable difference: darker images are class 1

  def run():
    config = Config(model_kwargs=TINY, **{"learning_rate": 1e-2, **overrides})
    model = models.create_model("convnet", num_classes=10, **TINY)
    state = create_train_state(model, config, (28, 28, 1), total_steps=20)
    losses = []
    for _ in range(20):
      state, step_metrics = train_step(state, images, labels)
      losses.append(float(step_metrics["loss"]))
    return state, losses

  (state_a, losses_a), (state_b, losses_b) = run(), run()
  assert losses_a == losses_b  # same seed, same numbers
  assert jax.tree.all(jax.tree.map(lambda a, b: np.array_equal(a, b), state_a.params, state_b.params))
  assert losses_a[-1] < losses_a[0]


def test_bad_option_values_are_refused():
  for overrides, fragment in [({"optimizer": "adam"}, "optimizer must be adamw or sgd"),
                              ({"schedule": "cyclic"}, "schedule must be onecycle or cosine"),
                              ({"label_smoothing": 1.0}, "label_smoothing must be in [0, 1)"),
                              ({"tta": "rotate"}, "tta must be none or flip")]:
    with pytest.raises(ConfigError, match=fragment.replace("[", r"\[").replace(")", r"\)")):
      validate(Config(**overrides))


def test_top5_accuracy_for_more_than_five_classes_only():
  images, labels = generated_images(40)
  for num_classes, has_top5 in ((10, True), (3, False)):
    model = models.create_model("convnet", num_classes=num_classes, **TINY)
    variables = init_variables(model, jax.random.PRNGKey(0), (28, 28, 1))
    result = evaluate(model, variables, (images, labels % num_classes), batch_size=16)
    assert ("top5_accuracy" in result) == has_top5
    if has_top5:
      assert result["accuracy"] <= result["top5_accuracy"] <= 1.0


def test_flip_tta_averages_the_probabilities_of_each_image_and_its_mirror():
  images, labels = generated_images(40)
  model = models.create_model("convnet", num_classes=10, **TINY)
  variables = init_variables(model, jax.random.PRNGKey(0), (28, 28, 1))
  plain, mirrored = (logits_step(model, variables, x) for x in (images, images[:, :, ::-1]))
  by_hand = np.log((jax.nn.softmax(plain) + jax.nn.softmax(mirrored)) / 2)
  flip = logits_step(model, variables, images, tta="flip")
  np.testing.assert_allclose(flip, by_hand, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(logits_step(model, variables, images[:, :, ::-1], tta="flip"), flip,
                             rtol=1e-5, atol=1e-6)  # a mirrored input gets the same answer
  assert not np.allclose(plain, mirrored, atol=1e-3)  # the model alone is not mirror-symmetric
  result = evaluate(model, variables, (images, labels), batch_size=16, tta="flip")
  assert result["tta"] == "flip" and "tta" not in evaluate(model, variables, (images, labels), 16)
  assert result["accuracy"] == pytest.approx(np.mean(np.argmax(by_hand, -1) == labels))
  with pytest.raises(ConfigError, match="tta must be none or flip"):
    logits_step(model, variables, images, tta="rotate")


def test_a_run_with_flip_tta_predicts_with_it(tmp_path):
  write_checkpoint(tmp_path / "run", steps=2, tta="flip", **TINY)
  model, variables, card = checkpoint.load_checkpoint(tmp_path / "run")
  image = generated_images(1)[0]
  Image.fromarray(image[0, :, :, 0]).save(tmp_path / "shirt.png")
  predictions, errors, _ = predict_files(tmp_path / "run", [tmp_path / "shirt.png"], top_k=10)
  by_class = {p["class"]: p["probability"] for p in predictions[0]["top_k"]}
  expected = predict_arrays(model, variables, image, tta="flip")[0]
  assert not errors and card["config"]["tta"] == "flip"
  np.testing.assert_allclose([by_class[f"class-{i}"] for i in range(10)], expected, rtol=1e-5)
  assert not np.allclose(expected, predict_arrays(model, variables, image)[0], atol=1e-4)


def tiny_state(steps=0, model="convnet", **overrides):
  """A TINY ConvNet's (or `model`'s) train state after `steps` steps on generated images."""
  kwargs = TINY if model == "convnet" else {"widths": [4, 8, 8]}
  config = Config(model=model, model_kwargs=kwargs, **{"learning_rate": 1e-2, **overrides})
  state = create_train_state(models.create_model(model, num_classes=10, **kwargs), config,
                             (28, 28, 1), total_steps=max(steps, 10))
  images, labels = generated_images(64)
  for _ in range(steps):
    state, _ = train_step(state, images, labels)
  return state


def max_difference(tree_a, tree_b) -> float:
  return max(float(jnp.max(jnp.abs(a - b))) for a, b in zip(jax.tree.leaves(tree_a), jax.tree.leaves(tree_b)))


def test_ema_follows_the_weights_with_its_warm_up_decay():
  state = tiny_state(0, ema_decay=0.9)
  before = jax.tree.map(np.asarray, state.params)  # the step donates the state it is given
  assert max_difference(state.ema_params, before) == 0  # starts at the initial weights
  images, labels = generated_images(64)
  state, _ = train_step(state, images, labels)
  decay = min(0.9, 2 / 11)  # (1 + step) / (10 + step) after step 1
  expected = jax.tree.map(lambda e, p: decay * e + (1 - decay) * p, before, state.params)
  assert max_difference(state.ema_params, expected) < 1e-7
  assert state.variables()["params"] is state.ema_params  # what eval reads
  assert max_difference(state.ema_params, state.params) > 0
  assert tiny_state(0).ema_params == {}  # no EMA: nothing kept


def test_a_checkpoint_with_ema_loads_the_ema_weights_for_eval_predict_export_and_finetune(tmp_path):
  from conftest import write_checkpoint

  from flaxzoo.training import checkpoint
  from flaxzoo.training.inference import predict_arrays
  state = write_checkpoint(tmp_path / "run", steps=3, ema_decay=0.5, **TINY)
  model, variables, card = checkpoint.load_checkpoint(tmp_path / "run")
  assert card["weights"] == "ema (decay 0.5)"
  assert max_difference(variables["params"], state.ema_params) == 0
  assert max_difference(variables["params"], state.params) > 0
  images, _ = generated_images(8)
  np.testing.assert_array_equal(predict_arrays(model, variables, images),
                                predict_arrays(model, state.variables(), images))
  write_checkpoint(tmp_path / "plain", steps=1, **TINY)
  assert checkpoint.load_checkpoint(tmp_path / "plain")[2]["weights"] == "trained"


def test_ema_averages_the_batchnorm_statistics_too():
  state = tiny_state(0, model="resnet", ema_decay=0.9)
  before = jax.tree.map(np.asarray, state.batch_stats)
  assert max_difference(state.ema_batch_stats, before) == 0
  images, labels = generated_images(64)
  state, _ = train_step(state, images, labels)
  decay = min(0.9, 2 / 11)
  expected = jax.tree.map(lambda e, s: decay * e + (1 - decay) * s, before, state.batch_stats)
  assert max_difference(state.ema_batch_stats, expected) < 1e-7
  assert max_difference(state.ema_batch_stats, state.batch_stats) > 0
  variables = state.variables()  # what eval reads: the EMA's params with the EMA's statistics
  assert variables["params"] is state.ema_params and variables["batch_stats"] is state.ema_batch_stats
  assert tiny_state(0, model="resnet").ema_batch_stats == {}  # no EMA
  assert tiny_state(0, ema_decay=0.9).ema_batch_stats == {}  # no BatchNorm


def test_a_batchnorm_checkpoint_loads_and_resumes_its_ema_statistics(tmp_path):
  """Also one saved before the EMA kept statistics (its card has no fingerprint of them): eval
  reads its live statistics, a resumed run starts their EMA from them."""
  from conftest import write_checkpoint

  from flaxzoo.training import checkpoint
  workdir = tmp_path / "run"
  state = write_checkpoint(workdir, "resnet", steps=2, ema_decay=0.5, widths=[4, 8, 8])
  target = tiny_state(0, model="resnet", ema_decay=0.5)
  for expected in ("ema", "live"):
    variables = checkpoint.load_checkpoint(workdir)[1]
    resumed = checkpoint.restore_latest(workdir, target)[0]
    assert max_difference(resumed.batch_stats, state.batch_stats) == 0
    assert max_difference(resumed.ema_params, state.ema_params) == 0
    stats = state.ema_batch_stats if expected == "ema" else state.batch_stats
    assert max_difference(variables["batch_stats"], stats) == 0
    assert max_difference(resumed.ema_batch_stats, stats) == 0
    if expected == "ema":  # then as a checkpoint written before the change
      card_file = next(workdir.glob("*/card/metadata"))
      card = json.loads(card_file.read_text())
      del card["fingerprints"]["ema_batch_stats"]
      card_file.write_text(json.dumps(card))


# The ResNet case (BatchNorm's per-micro-batch statistics) compiles two ResNet train steps (~12 s):
# full suite only.
@pytest.mark.parametrize("model", ["convnet", pytest.param("resnet", marks=pytest.mark.slow)])
def test_grad_accum_micro_batches_give_the_one_batch_update(model):
  """K micro-batches of B/K rows, gradients averaged, equal one batch of B within float rounding
  (SGD, so the update is the gradient itself). BatchNorm normalises each micro-batch by its own
  statistics and updates its running averages once per micro-batch: for the ResNet only the
  running statistics' shape is compared, and its params are allowed a looser tolerance."""
  one, accumulated = (tiny_state(2, model=model, optimizer="sgd", schedule="constant", grad_accum=k)
                      for k in (1, 4))
  tolerance = 1e-6 if model == "convnet" else 5e-3  # measured: 7e-9 and 4e-4
  assert max_difference(one.params, accumulated.params) < tolerance
  assert jax.tree.structure(one.batch_stats) == jax.tree.structure(accumulated.batch_stats)


def test_grad_accum_returns_the_whole_batch_metrics():
  images, labels = generated_images(64)
  states = [tiny_state(0, grad_accum=k) for k in (1, 2)]
  (_, a), (_, b) = (train_step(s, images, labels) for s in states)
  assert float(a["accuracy"]) == float(b["accuracy"])
  assert float(a["loss"]) == pytest.approx(float(b["loss"]), rel=1e-6)


AUGMENTATION_NAMES = ["shift", "crop", "flip", "affine", "erase", "mixup", "cutmix"]


@pytest.mark.parametrize("name", AUGMENTATION_NAMES)
def test_each_augmentation_keeps_shape_and_dtype_and_is_a_function_of_the_key(name):
  from flaxzoo.training import augment
  images = jnp.asarray(generated_images(16)[0], jnp.float32) / 255
  targets = jax.nn.one_hot(jnp.arange(16) % 10, 10)
  out, mixed = augment.augment_batch(jax.random.PRNGKey(0), images, targets, name)
  assert out.shape == images.shape and out.dtype == images.dtype
  assert float(out.min()) >= 0 and float(out.max()) <= 1
  again, mixed_again = augment.augment_batch(jax.random.PRNGKey(0), images, targets, name)
  np.testing.assert_array_equal(out, again)
  np.testing.assert_array_equal(mixed, mixed_again)
  other, _ = augment.augment_batch(jax.random.PRNGKey(1), images, targets, name)
  assert not np.array_equal(out, other) and not np.array_equal(out, images)
  np.testing.assert_allclose(mixed.sum(-1), 1, rtol=1e-6)  # still class probabilities
  if name not in ("mixup", "cutmix"):
    assert mixed is targets


def test_what_each_augmentation_does():
  from flaxzoo.training import augment
  images = jnp.asarray(generated_images(32)[0], jnp.float32) / 255
  targets = jax.nn.one_hot(jnp.arange(32) % 10, 10)
  key = jax.random.PRNGKey(0)
  flipped = augment.flip(key, images)
  per_image = [np.array_equal(f, i[:, ::-1]) or np.array_equal(f, i) for f, i in zip(flipped, images)]
  assert all(per_image)
  erased = augment.erase(key, images)
  assert bool(jnp.all((erased == images) | (erased == 0)))
  changed = np.asarray(jnp.any(erased != images, axis=(1, 2, 3)))
  assert 0 < changed.sum() < 32  # with probability 1/2 per image
  mixed, mixed_targets = augment.mixup(key, images, targets)
  weight = float(mixed_targets[0, 0])  # image 0 (class 0) and image 31 (class 1)
  np.testing.assert_allclose(mixed[0], weight * images[0] + (1 - weight) * images[31], atol=1e-6)
  pasted, pasted_targets = augment.cutmix(key, images, targets)
  from_other = float(jnp.mean(pasted[0] != images[0]))  # share of pixels from image 31 (almost all differ)
  assert pasted_targets[0, 1] == pytest.approx(from_other, abs=0.02)
  ones, zeros = jnp.ones(32), jnp.zeros(32)
  np.testing.assert_allclose(augment.warp_affine(images, zeros, ones, jnp.zeros((32, 2))), images,
                             atol=1e-6)  # no rotation, scale or move: the same image
  quarter_turn = augment.warp_affine(images, ones * np.pi / 2, ones, jnp.zeros((32, 2)))
  np.testing.assert_allclose(quarter_turn, np.rot90(images, -1, axes=(1, 2)), atol=1e-5)
  moved = augment.warp_affine(images, zeros, ones, jnp.tile(jnp.array([[2.0, -3.0]]), (32, 1)))
  np.testing.assert_allclose(moved[:, 2:, :-3], images[:, :-2, 3:], atol=1e-6)


def test_augment_names_are_checked():
  validate(Config(augment="erase, affine"))
  for value, fragment in [("blur", "augment must be none or comma-separated names from shift"),
                          ("mixup,cutmix", "at most one of mixup and cutmix"),
                          ("", "augment must be none")]:
    with pytest.raises(ConfigError, match=fragment):
      validate(Config(augment=value))
  with pytest.raises(ConfigError, match="grad_accum must be at least 1 and divide batch_size 128"):
    validate(Config(grad_accum=3))
  with pytest.raises(ConfigError, match="ema_decay must be in"):
    validate(Config(ema_decay=1.0))
