import json
import shutil

import jax
import numpy as np
import pytest
from conftest import generated_images

from flaxzoo import data, models, training
from flaxzoo.training import checkpoint
from flaxzoo.training.config import Config, ConfigError, override, validate
from flaxzoo.training.state import create_train_state
from flaxzoo.training.steps import train_step

TINY = {"widths": [4, 8], "hidden": 16}


def small_config(data_dir, **changes) -> Config:
  values = dict(model_kwargs=TINY, data_dir=data_dir, epochs=2, batch_size=64, train_examples=640,
                test_examples=500, log_every_steps=4, learning_rate=3e-3)
  values.update(changes)
  return Config(**values)


def trees_equal(a, b) -> bool:
  return jax.tree.structure(a) == jax.tree.structure(b) and all(
      np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def read_metrics(workdir):
  return [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]


def without_timing(records):
  return [{k: v for k, v in r.items() if k != "img_per_s"} for r in records]


def bright_square_images(count: int, seed: int = 0):
  """Noise with a bright 4x4 square in one of ten places; the place is the label (learnable in a
  few steps, as MNIST is)."""
  images, _ = generated_images(count, seed=seed)
  images = images // 4
  labels = np.arange(count, dtype=np.int32) % 10
  for image, label in zip(images, labels):
    row, col = divmod(int(label), 5)
    image[4 + 12 * row:8 + 12 * row, 2 + 5 * col:6 + 5 * col] = 255
  return images, labels


def test_a_few_steps_reduce_the_loss():
  images, labels = bright_square_images(128)
  model = models.create_model("convnet", num_classes=10, **TINY)
  state = create_train_state(model, Config(learning_rate=1e-2), (28, 28, 1), total_steps=30)
  losses = []
  for _ in range(30):
    state, metrics = train_step(state, images[:128], labels[:128])
    losses.append(float(metrics["loss"]))
  assert losses[-1] < 0.5 * losses[0]
  assert int(state.step) == 30


@pytest.mark.parametrize("name", ["convnet", "resnet"])
def test_train_step_compiled_at_level_2_keeps_the_default_levels_results(name):
  """The train step is compiled at XLA's backend level 2 for a quicker start
  (steps.TRAIN_STEP_COMPILER_OPTIONS): three steps give the default level's loss and parameters,
  the ConvNet's to the bit (its seeded runs did not change), the ResNet's within float rounding."""
  images, labels = bright_square_images(64)
  model = models.create_model(name, num_classes=10)
  state = create_train_state(model, Config(learning_rate=1e-3), (28, 28, 1), total_steps=10)
  at_default_level = jax.jit(train_step.__wrapped__)
  results = []
  for step in (train_step, at_default_level):
    current = jax.device_put(jax.device_get(state))  # the step donates its state
    for _ in range(3):
      current, metrics = step(current, images, labels)
    results.append((jax.device_get(current.params), float(metrics["loss"])))
  (params, loss), (default_params, default_loss) = results
  if name == "convnet":
    assert loss == default_loss
    assert jax.tree.all(jax.tree.map(np.array_equal, params, default_params))
  else:
    assert loss == pytest.approx(default_loss, rel=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5), params, default_params)


def test_checkpoint_restores_params_and_optimizer_state_exactly(tmp_path):
  images, labels = generated_images(96)
  model = models.create_model("convnet", num_classes=10, **TINY)
  config = Config(model_kwargs=TINY)
  state = create_train_state(model, config, (28, 28, 1), total_steps=10)
  for i in range(3):
    state, _ = train_step(state, images[i * 32:(i + 1) * 32], labels[i * 32:(i + 1) * 32])
  info = data.DatasetInfo("mnist", 10, tuple("0123456789"), (28, 28, 1), {"train": 60000, "test": 10000})
  with checkpoint.open_manager(tmp_path) as manager:
    checkpoint.save(manager, state, checkpoint.make_card(model, config, info, 3, 0.1, {}), keep=3)
    checkpoint.wait(manager)
  fresh = create_train_state(model, Config(model_kwargs=TINY, seed=1), (28, 28, 1), total_steps=10)
  restored, card, skipped = checkpoint.restore_latest(tmp_path, fresh)
  assert card["step"] == 3 and not skipped
  assert trees_equal(restored.params, state.params)
  assert trees_equal(restored.opt_state, state.opt_state)
  assert int(restored.step) == 3 and np.array_equal(restored.rng, state.rng)
  # The restored state trains on exactly like the original.
  a, _ = train_step(state, images[:32], labels[:32])
  b, _ = train_step(restored, images[:32], labels[:32])
  assert trees_equal(a.params, b.params)


def test_model_card_round_trip(tmp_path, mnist_data_dir):
  config = small_config(mnist_data_dir, epochs=1)
  state = training.train_and_evaluate(config, tmp_path)
  model, variables, card = training.load_checkpoint(tmp_path)
  assert model == models.create_model("convnet", num_classes=10, **TINY)
  assert trees_equal(variables["params"], state.params)
  assert card["model"] == {"name": "convnet", "kwargs": {**TINY, "batch_norm": False, "dropout": 0.0,
                                                         "convs_per_block": 1}}
  assert card["num_classes"] == 10 and card["input_shape"] == [28, 28, 1]
  assert card["dataset"]["name"] == "mnist" and card["dataset"]["class_names"] == list("0123456789")
  assert card["step"] == 10 and card["epoch"] == 1
  assert training.config.from_dict(card["config"]) == config
  assert card["metrics"]["test"]["num_examples"] == 500
  assert set(card["versions"]) == {"flaxzoo", "jax", "jaxlib", "flax", "optax", "orbax-checkpoint"}
  # predict on an array with the loaded model
  images, labels = data.load_split("mnist", "test", mnist_data_dir)
  probs = training.predict_arrays(model, variables, images[:500])
  assert probs.shape == (500, 10) and np.allclose(probs.sum(1), 1, atol=1e-5)
  assert np.mean(probs.argmax(1) == labels[:500]) == pytest.approx(card["metrics"]["test"]["accuracy"])


def test_resumed_run_continues_and_matches_an_uninterrupted_one(tmp_path, mnist_data_dir):
  config = small_config(mnist_data_dir, checkpoint_every_steps=6)
  straight = training.train_and_evaluate(config, tmp_path / "straight")
  assert int(straight.step) == 20
  assert checkpoint.saved_steps(tmp_path / "straight") == [12, 18, 20]  # keeps the last 3

  # A run that died after its checkpoint at step 12: later step folders never committed.
  resumed_dir = tmp_path / "resumed"
  shutil.copytree(tmp_path / "straight", resumed_dir)
  for step in (18, 20):
    shutil.rmtree(resumed_dir / str(step))
  resumed = training.train_and_evaluate(config, resumed_dir)

  assert int(resumed.step) == 20
  assert trees_equal(resumed.params, straight.params)
  assert trees_equal(resumed.opt_state, straight.opt_state)
  records = read_metrics(resumed_dir)
  assert without_timing(records) == without_timing(read_metrics(tmp_path / "straight"))
  train_steps = [r["step"] for r in records if r["split"] == "train"]
  assert train_steps == sorted(set(train_steps)) and train_steps[-1] == 20
  assert [(r["step"], r["epoch"]) for r in records if r["split"] == "test"] == [(10, 1), (20, 2)]


def test_more_epochs_continue_a_finished_run(tmp_path, mnist_data_dir, capsys):
  training.train_and_evaluate(small_config(mnist_data_dir, epochs=1), tmp_path)
  again = training.train_and_evaluate(small_config(mnist_data_dir, epochs=1), tmp_path)
  assert int(again.step) == 10 and "already trained" in capsys.readouterr().out
  longer = training.train_and_evaluate(small_config(mnist_data_dir, epochs=2), tmp_path)
  assert int(longer.step) == 20
  assert [r["step"] for r in read_metrics(tmp_path) if r["split"] == "test"] == [10, 20]
  capsys.readouterr()
  training.train_and_evaluate(small_config(mnist_data_dir, epochs=1), tmp_path)  # asks for fewer
  out = capsys.readouterr().out
  assert "already trained: 2 epochs, step 20" in out and "pass --epochs above 2" in out


@pytest.mark.parametrize("overrides,message", [
    ({"epochs": 0}, "epochs must be at least 1"),
    ({"batch_size": -8}, "batch_size must be at least 1"),
    ({"learning_rate": -0.1}, "learning_rate must be a finite number greater than 0"),
])
def test_bad_values_are_rejected(overrides, message):
  with pytest.raises(ConfigError, match=message):
    validate(override(Config(), overrides))


def test_unknown_or_mistyped_override_is_rejected():
  with pytest.raises(ConfigError, match="unknown config field 'epoch'. Did you mean epochs"):
    override(Config(), {"epoch": 3})
  with pytest.raises(ConfigError, match="'batch_size' must be int"):
    override(Config(), {"batch_size": "64"})
  assert override(Config(), {"learning_rate": 1}).learning_rate == 1.0


def test_named_config_fast_and_overrides():
  from flaxzoo.training.config import default_workdir
  from flaxzoo.training.configs import named_config
  fast = named_config("fast")
  assert (fast.model, fast.epochs, fast.batch_size, fast.learning_rate, fast.label_smoothing) == (
      "convnet", 1, 64, 2e-2, 0.1)
  assert fast.config_file.endswith("configs/fast.toml")
  assert named_config("fast", epochs=5, model="lenet5").epochs == 5  # flags beside --config win
  assert default_workdir(fast, "fast") == "checkpoints/mnist-convnet-fast"  # not the main run's


@pytest.mark.parametrize("name", ["convnet", "resnet"])  # resnet: BatchNorm's running statistics
def test_logits_in_passes_match_one_pass(name):
  from flaxzoo.models import init_variables
  from flaxzoo.training.evaluation import logits_step
  model = models.create_model(name, num_classes=10)
  variables = init_variables(model, jax.random.PRNGKey(0), (28, 28, 1))
  images = np.random.default_rng(0).integers(0, 256, (50, 28, 28, 1), dtype=np.uint8)
  one_pass = np.asarray(logits_step(model, variables, images, passes=1))
  for passes in (2, 3, 7) if name == "convnet" else (3,):  # 3, 7 don't divide 50: a shorter last chunk
    in_passes = np.asarray(logits_step(model, variables, images, passes=passes))
    assert in_passes.shape == one_pass.shape
    # written out, not a loop, whose body XLA:CPU would run on one thread
    assert "while" not in logits_step.lower(model, variables, images, passes=passes).as_text()
    np.testing.assert_allclose(in_passes, one_pass, rtol=1e-5, atol=1e-6)


def test_passes_keep_an_eval_batch_temporaries_small():
  from flaxzoo.models import init_variables
  from flaxzoo.training import evaluation
  from flaxzoo.training.evaluation import EVAL_TEMP_BYTES, MAX_PASSES, compiled_in_passes, eval_step, passes_for

  def temp_bytes(model, variables, batch, passes):
    compiled = eval_step.lower(model, variables, *batch, passes=passes).compile()
    return compiled.memory_analysis().temp_size_in_bytes

  rng = np.random.default_rng(0)
  batch = (rng.integers(0, 256, (1000, 28, 28, 1), dtype=np.uint8),
           rng.integers(0, 10, 1000).astype(np.int32), np.ones(1000, np.float32))
  convnet = models.create_model("convnet", num_classes=10)
  variables = init_variables(convnet, jax.random.PRNGKey(0), (28, 28, 1))
  passes = passes_for(eval_step, convnet, variables, *batch)
  assert temp_bytes(convnet, variables, batch, 1) > EVAL_TEMP_BYTES  # ~36 MB in one pass
  assert passes > 1 and temp_bytes(convnet, variables, batch, passes) <= EVAL_TEMP_BYTES
  huge = (np.zeros((20000, 28, 28, 1), np.uint8), np.zeros(20000, np.int32), np.ones(20000, np.float32))
  assert passes_for(eval_step, convnet, variables, *huge) == MAX_PASSES  # ~700 MB: the cap
  mlp = models.create_model("mlp", num_classes=10)
  mlp_variables = init_variables(mlp, jax.random.PRNGKey(0), (28, 28, 1))
  assert passes_for(eval_step, mlp, mlp_variables, *batch) == 1  # ~5 MB: one pass
  one = jax.device_get(eval_step(convnet, variables, *batch, passes=1))
  many = jax.device_get(eval_step(convnet, variables, *batch, passes=passes))
  for key in ("confusion", "correct", "count"):
    np.testing.assert_array_equal(one[key], many[key])
  np.testing.assert_allclose(one["loss_sum"], many["loss_sum"], rtol=1e-5)  # up to rounding
  # The programs evaluate runs: the analysed one-pass program itself when one pass is enough (no
  # second compilation), else the one in `passes`; each gives what the jitted call gives.
  compilations = evaluation._compiled.cache_info().misses
  mlp_sums = jax.device_get(compiled_in_passes(eval_step, mlp, mlp_variables, *batch)(mlp_variables, *batch))
  assert evaluation._compiled.cache_info().misses == compilations
  expected = jax.device_get(eval_step(mlp, mlp_variables, *batch, passes=1))
  convnet_sums = jax.device_get(compiled_in_passes(eval_step, convnet, variables, *batch)(variables, *batch))
  assert evaluation._compiled.cache_info().misses == compilations + 1
  for got, want in ((mlp_sums, expected), (convnet_sums, many)):
    for key in want:
      np.testing.assert_array_equal(got[key], want[key])
