"""Training options from optax: label smoothing, learning-rate schedules, SGD with Nesterov
momentum; and top-5 accuracy in evaluation."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import generated_images

from flaxzoo import models
from flaxzoo.training.config import Config, ConfigError, validate
from flaxzoo.training.evaluation import evaluate
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
                              ({"label_smoothing": 1.0}, "label_smoothing must be in [0, 1)")]:
    with pytest.raises(ConfigError, match=fragment.replace("[", r"\[").replace(")", r"\)")):
      validate(Config(**overrides))


def test_top5_accuracy_for_more_than_five_classes_only():
  images, labels = generated_images(40)
  for num_classes, has_top5 in ((10, True), (3, False)):
    model = models.create_model("convnet", num_classes=num_classes, **TINY)
    variables = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 28, 28, 1)))
    result = evaluate(model, variables, (images, labels % num_classes), batch_size=16)
    assert ("top5_accuracy" in result) == has_top5
    if has_top5:
      assert result["accuracy"] <= result["top5_accuracy"] <= 1.0
