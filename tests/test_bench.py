"""`flaxzoo bench`: the PyTorch twins compute what the zoo models compute, and a tiny benchmark runs
end to end through the CLI (no speed is asserted: these machines are noisy)."""

import csv
import inspect
import json
import subprocess
import sys

import jax
import numpy as np
import pytest

from flaxzoo import models
from flaxzoo.benchmarks import bench
from flaxzoo.benchmarks.torch_twins import TWINNED_MODELS, torch_twin
from flaxzoo.models import init_variables
from flaxzoo.training.steps import to_model_input

torch = pytest.importorskip("torch", reason="the benchmark extra: pip install -e '.[bench]'")


@pytest.mark.parametrize("name", TWINNED_MODELS)
def test_torch_twin_computes_the_same_logits(name):
  model = models.create_model(name, num_classes=10)
  images, _ = bench.synthetic_batch(4)
  variables = init_variables(model, jax.random.PRNGKey(3), images.shape[1:])
  # Random weights and BatchNorm statistics everywhere: initial ones would hide a misplaced layer
  # (ResNet's zero-initialised BatchNorm scales switch off half its convolutions). NumPy draws
  # them: eager jax.random would compile a program per leaf shape.
  rng = np.random.default_rng(4)
  variables = jax.tree.map(lambda leaf: leaf + 0.1 * rng.uniform(size=leaf.shape).astype(leaf.dtype),
                           variables)
  expected = np.asarray(model.apply(variables, to_model_input(images)))
  twin = torch_twin(model, jax.device_get(variables["params"]),
                    jax.device_get(variables.get("batch_stats"))).eval()
  with torch.inference_mode():
    got = twin(torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255).numpy()
  np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5)


def test_torch_twin_of_an_untwinned_model_names_the_supported_ones():
  model = models.create_model("vit_tiny")
  with pytest.raises(ValueError, match="convnet, lenet5, mlp, resnet.*--frameworks jax"):
    torch_twin(model, {})


def test_frameworks_must_include_jax():
  with pytest.raises(ValueError, match="must include jax"):
    bench.run_benchmark(frameworks=("torch_eager",))


def test_bench_writes_no_file_unless_given_csv():
  from flaxzoo.benchmarks import report
  from flaxzoo.training import cli
  assert cli.build_parser().parse_args(["bench"]).csv is None
  assert inspect.signature(report.benchmark).parameters["csv_path"].default is None


@pytest.mark.slow
def test_bench_cli_smoke(tmp_path):
  """A tiny setting, all three frameworks: the JSON line holds every figure, the CSV a row, and
  nothing else is written."""
  out_csv = tmp_path / "bench.csv"
  done = subprocess.run(
      [sys.executable, "-m", "flaxzoo.training", "bench", "--model", "mlp", "--batch-size", "16",
       "--eval-batch-size", "32", "--steps", "2", "--repeats", "2", "--latency-calls", "20",
       "--no-memory", "--json", "--csv", str(out_csv)],
      capture_output=True, text=True, timeout=600, cwd=tmp_path)
  assert done.returncode == 0, done.stderr[-3000:]
  result = json.loads(done.stdout.strip().splitlines()[-1])
  for key in ("train_ratio_vs_torch_eager", "train_ratio_vs_torch_compile",
              "eval_ratio_vs_torch_compile", "device", "matmul_peak_gflops",
              "jax_latency_p99_ms", "torch_compile_first_train_step_s",
              "torch_eager_train_pct_of_matmul_peak", "jax_eval_pct_of_matmul_peak",
              "latency_p99_ratio_vs_torch_compile"):
    assert key in result, key
  assert result["train_ratio_vs_torch_eager"] > 0
  rows = list(csv.DictReader(out_csv.open()))
  assert len(rows) == 1 and rows[0]["model"] == "mlp"
  assert float(rows[0]["train_ratio_vs_torch_compile"]) == pytest.approx(
      result["train_ratio_vs_torch_compile"], rel=1e-3)
  assert [p.name for p in tmp_path.iterdir()] == ["bench.csv"]


def test_csv_written_before_a_column_was_added_keeps_its_rows(tmp_path):
  from flaxzoo.benchmarks import report
  path = tmp_path / "bench.csv"
  old_columns = report.CSV_COLUMNS[:-3]
  path.write_text(",".join(old_columns) + "\n" + ",".join(
      "convnet" if c == "model" else "1.5" if c == "jax_train_img_s" else "" for c in old_columns)
      + "\n")
  report.append_csv(path, {"model": "mlp", "jax_train_img_s": 2.0, "jax_fast_cached_seconds_to_99": 9.0})
  rows = list(csv.DictReader(path.open()))
  assert list(rows[0]) == report.CSV_COLUMNS
  assert [(r["model"], r["jax_train_img_s"], r["jax_fast_cached_seconds_to_99"]) for r in rows] == [
      ("convnet", "1.5", ""), ("mlp", "2.0", "9.0")]


@pytest.mark.slow
def test_peak_rss_of_a_training_process_grows_with_its_batch():
  """Each probe is a fresh process measuring itself (VmHWM): a batch of 4,096 (~13 MB of input,
  ~25 MB of activations and their gradients) must show, a batch of 8 not."""
  small = bench.peak_rss_mb("jax", "mlp", batch_size=8, steps=2)
  large = bench.peak_rss_mb("jax", "mlp", batch_size=4096, steps=2)
  assert small["imports_rss_mb"] > 50  # jax alone takes more than 50 MB
  added = {name: rss["peak_rss_mb"] - rss["imports_rss_mb"] for name, rss in (("small", small), ("large", large))}
  assert added["large"] > added["small"] + 20, (small, large)


@pytest.mark.slow
def test_op_profile_times_the_same_ops_in_both_frameworks():
  """benchmarks/op_profile.py: every op of the ConvNet's step gets a JAX and a PyTorch time (the
  two sides compute the same op: the FLOPs are shared), and the whole step is the last row."""
  from flaxzoo.benchmarks import op_profile
  rows = op_profile.profile(batch=2, repeats=1, calls=1)
  ops = [row["op"] for row in rows]
  assert ops[-1] == "train step (whole)" and "conv1 forward, layers.conv" in ops
  assert {"conv2 forward", "conv2 input grad", "conv2 kernel grad", "dense1 forward"} <= set(ops)
  for row in rows:
    assert row["jax_ms"] > 0 and row["torch_eager_ms"] > 0 and row["gflop"] > 0, row


def test_ablations_earlier_eval_forms_compute_the_convnets_logits():
  """benchmarks/ablation.py's "before" eval rows (the first convolution as training's product;
  passes as a lax.map) give today's ConvNet logits within float rounding, from its parameters."""
  from flaxzoo.benchmarks import ablation
  from flaxzoo.training.evaluation import logits_step
  model = models.create_model("convnet", num_classes=10)
  images, _ = bench.synthetic_batch(50)
  variables = init_variables(model, jax.random.PRNGKey(0), images.shape[1:])
  now = np.asarray(logits_step(model, variables, images))
  as_product = ablation.ProductEvalConvNet().apply(variables, to_model_input(images))
  np.testing.assert_allclose(as_product, now, rtol=1e-5, atol=1e-6)
  mapped = jax.jit(ablation.mapped_logits, static_argnums=(0, 3))(model, variables, images, 3)
  np.testing.assert_allclose(mapped, now, rtol=1e-5, atol=1e-6)


def test_ablations_even_split_convnet_has_the_convnets_gradients():
  """benchmarks/ablation.py's "ties split evenly" train row: today's ConvNet with the earlier
  pooling gradients, the same parameters and gradients within float rounding (images without ties)."""
  import jax.numpy as jnp

  from flaxzoo.benchmarks import ablation
  model = models.create_model("convnet", num_classes=10)
  images, labels = bench.synthetic_batch(32)
  variables = init_variables(model, jax.random.PRNGKey(0), images.shape[1:])
  x = to_model_input(images)
  loss = lambda module: jax.jit(jax.grad(  # noqa: E731
      lambda v: jnp.mean(module.apply(v, x)[jnp.arange(32), labels])))(variables)
  now, before = loss(model), loss(ablation.EvenSplitConvNet())
  assert jax.tree.structure(now) == jax.tree.structure(before)
  for a, b in zip(jax.tree.leaves(now), jax.tree.leaves(before)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6 * float(np.abs(b).max()))


def test_batch_norm_benchmark_builds_each_model_both_ways():
  """benchmarks/batch_norm.py's swap: inside it the ResNet traces nn.BatchNorm's reductions (no
  custom VJP), outside it layers.BatchNorm's; the swap is undone afterwards."""
  import flax.linen as nn
  import jax.numpy as jnp

  from flaxzoo.benchmarks.batch_norm import batch_norm_everywhere
  from flaxzoo.models import layers

  def train_jaxpr():
    model = models.create_model("resnet", num_classes=10)
    x = jnp.zeros((2, 28, 28, 1))
    variables = models.abstract_variables(model)  # shapes are all a jaxpr needs
    forward = lambda v: model.apply(v, x, train=True, mutable=["batch_stats"])
    return str(jax.make_jaxpr(forward)(variables))

  before = nn.BatchNorm, layers.BatchNorm
  with batch_norm_everywhere(nn.BatchNorm):
    assert "custom_vjp" not in train_jaxpr()
  assert (nn.BatchNorm, layers.BatchNorm) == before
  assert "custom_vjp" in train_jaxpr()


def test_interleaved_rates_warm_each_turn_and_time_its_calls():
  """Each turn: one untimed warm-up call, then `calls_per_turn` timed ones; runners alternate."""
  calls = []

  class Runner:
    def __init__(self, name):
      self.name = name

  runners = [Runner("a"), Runner("b")]
  rates = bench.interleaved_rates(runners, lambda r: calls.append(("work", r.name)), 10, repeats=2,
                                  warmup=lambda r: calls.append(("warmup", r.name)), calls_per_turn=3)
  turn = lambda name: [("warmup", name)] + [("work", name)] * 3  # noqa: E731
  assert calls == (turn("a") + turn("b")) * 2
  assert set(rates) == {"a", "b"} and all(rate > 0 for rate in rates.values())


def test_dropout_benchmark_builds_vit_tiny_with_linens_dropout_inside_its_swap():
  """benchmarks/dropout.py's swap: inside it ViT-tiny draws with jax.random.bernoulli (no 8-bit
  draws cut from words), outside it with layers.keep_mask; the swap is undone afterwards."""
  import jax.numpy as jnp

  from flaxzoo.benchmarks.dropout import linen_dropout
  from flaxzoo.models import layers

  def train_jaxpr():
    model = models.create_model("vit_tiny", num_classes=10, depth=1)
    variables = models.abstract_variables(model)
    forward = lambda v: model.apply(v, jnp.zeros((2, 28, 28, 1)), train=True,  # noqa: E731
                                    rngs={"dropout": jax.random.key(0)})
    return str(jax.make_jaxpr(forward)(variables))

  before = layers.Dropout, layers.dot_product_attention
  with linen_dropout():
    assert "u8[" not in train_jaxpr()
  assert (layers.Dropout, layers.dot_product_attention) == before
  assert "u8[" in train_jaxpr()
