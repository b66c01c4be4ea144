"""flaxzoo.training.analysis against plain JAX: per-example gradients against batch-1 jax.grad, the
Lanczos eigenvalues and Hutchinson trace against the dense Hessian of a tiny model; `flaxzoo
analyze` and `predict --saliency` on a real checkpoint and real MNIST (slow tier)."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import generated_images, run_main, write_checkpoint
from jax.flatten_util import ravel_pytree
from PIL import Image

from flaxzoo import models
from flaxzoo.models import init_variables
from flaxzoo.training import analysis
from flaxzoo.training.steps import cross_entropy, to_model_input

TINY_SHAPE = (4, 4, 1)


@pytest.fixture(scope="module")
def tiny():
  """An MLP of 163 parameters on 4x4 images, 3 classes, and 64 examples: a Hessian small enough to
  form densely."""
  model = models.create_model("mlp", num_classes=3, hidden=(8,))
  variables = init_variables(model, jax.random.PRNGKey(0), TINY_SHAPE)
  images, labels = generated_images(64, TINY_SHAPE)
  return model, variables, images, labels % 3


def dense_hessian(model, variables, images, labels):
  flat, unravel = ravel_pytree(variables["params"])

  def loss(theta):
    logits = model.apply({"params": unravel(theta)}, to_model_input(images), train=False)
    return cross_entropy(logits, labels).mean()
  return np.asarray(jax.jit(jax.hessian(loss))(flat), np.float64)


def test_per_example_gradients_equal_batch_1_grads():
  model = models.create_model("convnet", num_classes=10, widths=(4, 8), hidden=16)
  variables = init_variables(model, jax.random.PRNGKey(0), (28, 28, 1))
  images, labels = generated_images(5)
  grads, losses, _ = analysis.per_example_grads(model, variables, images, labels)

  def loss(params, image, label):
    logits = model.apply({"params": params}, to_model_input(image[None]), train=False)
    return cross_entropy(logits, label[None])[0]
  result = analysis.per_example_grad_norms(model, variables, images, labels, batch_size=3)  # a padded batch
  grad_one = jax.jit(jax.value_and_grad(loss))
  for i in range(len(images)):
    value, one = grad_one(variables["params"], images[i], labels[i])
    for a, b in zip(jax.tree.leaves(one), jax.tree.leaves(jax.tree.map(lambda g, i=i: g[i], grads))):
      np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)  # two programs: float32 rounding
    norm = np.sqrt(sum(float(jnp.sum(g ** 2)) for g in jax.tree.leaves(one)))
    assert result["grad_norm"][i] == pytest.approx(norm, rel=1e-5)
    assert result["loss"][i] == pytest.approx(float(value), rel=1e-5) == pytest.approx(float(losses[i]), rel=1e-5)
  assert result["grad_norm"].shape == (5,) and np.all(result["probability"] > 0)


def test_lanczos_finds_the_dense_hessians_top_eigenvalues(tiny):
  exact = np.linalg.eigvalsh(dense_hessian(*tiny))[::-1]
  found = analysis.hessian_eigenvalues(*tiny, k=3, steps=60, seed=0)
  assert found["num_params"] == 163 and found["hvps"] == 60
  np.testing.assert_allclose(found["eigenvalues"], exact[:3], rtol=1e-4)
  assert max(found["residuals"]) < 1e-3 * exact[0]
  assert analysis.hessian_eigenvalues(*tiny, k=3, steps=60, seed=0) == found  # deterministic


def test_hutchinson_trace_is_within_its_error_bars(tiny):
  exact = np.trace(dense_hessian(*tiny))
  estimate = analysis.hessian_trace(*tiny, probes=200, seed=0)
  assert abs(estimate["trace"] - exact) < 4 * estimate["std_error"], (estimate, exact)
  assert estimate["std_error"] < 0.25 * abs(exact)  # the bars say something
  assert analysis.hessian_trace(*tiny, probes=200, seed=0) == estimate


def test_saliency_is_the_gradient_of_the_top_logit(tiny):
  model, variables, images, _ = tiny
  heat = np.asarray(analysis.saliency(model, variables, images[:3]))
  assert heat.shape == (3, 4, 4) and np.all(heat >= 0)
  x = to_model_input(images[:1])
  top = int(jnp.argmax(model.apply(variables, x)[0]))
  grad = jax.grad(lambda x: model.apply(variables, x)[0, top])(x)
  np.testing.assert_allclose(heat[0], np.abs(np.asarray(grad[0, ..., 0])), rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("flags, fragment", [
    (["--top", "0"], "--top must be at least 1, got 0"),
    (["--probes", "0"], "--probes must be at least 1"),
])
def test_bad_analyze_flags_are_one_line(tmp_path, capsys, flags, fragment):
  status, _, err = run_main(capsys, "analyze", "--workdir", tmp_path, *flags)
  assert status == 2 and err.count("flaxzoo: error:") == 1 and fragment in err
  assert not any(tmp_path.iterdir())


def test_analyze_without_a_checkpoint(tmp_path, capsys):
  status, _, err = run_main(capsys, "analyze", "--workdir", tmp_path / "none")
  assert status == 2 and "does not exist; train one first" in err and not (tmp_path / "none").exists()


@pytest.fixture(scope="module")
def mnist_checkpoint(tiny_mnist_run, mnist_data_dir):
  """A tiny ConvNet trained one short epoch on real MNIST (conftest's `tiny_mnist_run`)."""
  return tiny_mnist_run


def test_analyze_writes_the_report_and_pictures(mnist_checkpoint, mnist_data_dir, capsys):
  status, out, err = run_main(capsys, "analyze", "--workdir", mnist_checkpoint, "--data-dir", mnist_data_dir,
                              "--top", 5, "--hessian-examples", 200, "--lanczos-steps", 10, "--probes", 5,
                              "--json")
  assert status == 0, err
  report = json.loads(out.splitlines()[-1])
  assert report["num_examples"] == 500 and report["split"] == "test"
  assert "largest gradient norms: #" in out and "Hessian of the training loss on 200 examples" in out
  norms = [e["grad_norm"] for e in report["top_by_grad_norm"]]
  assert len(norms) == 5 and norms == sorted(norms, reverse=True)
  assert set(report["per_example"]["per_class_mean_grad_norm"]) == {str(i) for i in range(10)}
  hessian = report["hessian"]
  assert len(hessian["top_eigenvalues"]) == 5 and hessian["top_eigenvalues"][0] > 0 and hessian["hvps"] == 15
  saved = json.loads((mnist_checkpoint / "analysis-test.json").read_text())
  assert saved["top_by_loss"] == report["top_by_loss"]
  for name in ("analysis-test-grad-norm.png", "analysis-test-loss.png"):
    with Image.open(mnist_checkpoint / name) as png:
      assert png.format == "PNG" and png.width > 300


@pytest.mark.parametrize("flags, fragment", [
    (["--split", "validation"], "has no split 'validation'"),
    (["--hessian-examples", "5000"], "--hessian-examples 5000 is more than the 1280 training examples"),
])
def test_analyze_refuses_what_the_data_cannot_give(mnist_checkpoint, mnist_data_dir, capsys, flags, fragment):
  before = sorted(p.name for p in mnist_checkpoint.iterdir())
  status, _, err = run_main(capsys, "analyze", "--workdir", mnist_checkpoint, "--data-dir", mnist_data_dir, *flags)
  assert status == 2 and err.count("flaxzoo: error:") == 1 and fragment in err, err
  assert sorted(p.name for p in mnist_checkpoint.iterdir()) == before


def test_predict_saliency_writes_a_map_beside_each_image(tmp_path, capsys):
  workdir = tmp_path / "w"
  write_checkpoint(workdir, steps=2, widths=[4, 8], hidden=16)
  image = tmp_path / "digit.png"
  Image.fromarray(generated_images(1)[0][0, ..., 0]).save(image)
  status, out, err = run_main(capsys, "predict", "--workdir", workdir, image, "--saliency", "--json")
  assert status == 0, err
  prediction = json.loads(out.splitlines()[-1])["predictions"][0]
  assert prediction["saliency"] == str(tmp_path / "digit.saliency.png")
  with Image.open(prediction["saliency"]) as png:
    pixels = np.asarray(png)
  assert pixels.shape == (28, 28) and pixels.max() == 255
