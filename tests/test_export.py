"""`flaxzoo export`: every format written, checked against Flax, and loaded back in its own runtime
in a fresh process; `predict --model-file` without the model's code; bad input changes nothing."""

import json
import subprocess
import sys

import numpy as np
import pytest
from conftest import assert_one_clear_error, run_main, tree_snapshot, write_checkpoint
from PIL import Image

from flaxzoo import training
from flaxzoo.training import export
from flaxzoo.training.errors import ExportError
from flaxzoo.training.inference import checkpoint_split, predict_arrays


@pytest.fixture(scope="module")
def tiny_resnet_run(tmp_path_factory, mnist_data_dir):
  """A small ResNet (BatchNorm) trained for one short epoch on real MNIST."""
  workdir = tmp_path_factory.mktemp("export") / "resnet"
  config = training.Config(model="resnet", model_kwargs={"widths": [4, 8, 8]}, data_dir=mnist_data_dir,
                           epochs=1, batch_size=64, train_examples=640, test_examples=200)
  training.train_and_evaluate(config, workdir)
  return workdir


LOAD_IN_FRESH_PROCESS = """
import json, sys
import numpy as np
from flaxzoo.training import load_exported
images = np.load(sys.argv[1])
out = {}
for folder in sys.argv[2:]:
  predict, card = load_exported(folder)
  out[card["format"]] = np.asarray(predict(images)).tolist()
print(json.dumps(out))
"""


@pytest.mark.slow  # real MNIST runs (requested by name below, so not marked by conftest)
@pytest.mark.parametrize("run", ["tiny_mnist_run", "tiny_resnet_run"])
def test_every_format_exports_checks_and_loads_in_a_fresh_process(run, request, tmp_path):
  workdir = request.getfixturevalue(run)
  folders = []
  for fmt in export.FORMATS:
    card = export.export_checkpoint(workdir, fmt, tmp_path / fmt)
    check = card["check"]
    assert check["passed"] and check["batches"] == [1, 64]
    assert max(check["max_abs_difference"].values()) <= export.TOLERANCE[fmt]
    assert (tmp_path / fmt / export.ARTIFACT[fmt]).exists()
    assert json.loads((tmp_path / fmt / "card.json").read_text()) == card
    assert card["input"]["shape"] == ["batch", 28, 28, 1] and card["input"]["dtype"] == "uint8"
    assert card["class_names"] == list("0123456789") and card["format_versions"]
    folders.append(tmp_path / fmt)

  model, variables, source = training.load_checkpoint(workdir)
  images = checkpoint_split(source, "test")[0][:33]  # a batch size the check did not use
  np.save(tmp_path / "images.npy", images)
  done = subprocess.run([sys.executable, "-c", LOAD_IN_FRESH_PROCESS, tmp_path / "images.npy", *folders],
                        capture_output=True, text=True, cwd=tmp_path, timeout=600)
  assert done.returncode == 0, done.stderr[-2000:]
  results = json.loads(done.stdout.strip().splitlines()[-1])
  expected = predict_arrays(model, variables, images)
  assert set(results) == set(export.FORMATS)
  for fmt, probabilities in results.items():
    np.testing.assert_allclose(np.asarray(probabilities), expected, atol=export.TOLERANCE[fmt], rtol=0)


def test_predict_with_a_stablehlo_model_file(tiny_mnist_run, tmp_path, capsys):
  out = tmp_path / "served"
  assert run_main(capsys, "export", "--workdir", tiny_mnist_run, "--format", "stablehlo", "--out", out)[0] == 0
  images = checkpoint_split(training.read_card(tiny_mnist_run), "test")[0][:3]
  paths = []
  for i, image in enumerate(images):
    paths.append(tmp_path / f"{i}.png")
    Image.fromarray(image[..., 0]).save(paths[-1])
  status, by_file, _ = run_main(capsys, "predict", "--model-file", out / "model.stablehlo", *paths, "--json")
  assert status == 0
  status, by_checkpoint, _ = run_main(capsys, "predict", "--workdir", tiny_mnist_run, *paths, "--json")
  assert status == 0
  by_file, by_checkpoint = json.loads(by_file), json.loads(by_checkpoint)
  for a, b in zip(by_file["predictions"], by_checkpoint["predictions"]):
    assert [c["class"] for c in a["top_k"]] == [c["class"] for c in b["top_k"]]
    assert a["top_k"][0]["probability"] == pytest.approx(b["top_k"][0]["probability"], abs=1e-5)


def test_an_export_that_fails_its_check_writes_nothing(tiny_mnist_run, tmp_path, monkeypatch):
  monkeypatch.setitem(export.TOLERANCE, "stablehlo", -1.0)  # no difference can pass
  with pytest.raises(ExportError, match=r"differs from Flax by up to .*nothing was written"):
    export.export_checkpoint(tiny_mnist_run, "stablehlo", tmp_path / "out" / "stablehlo")
  assert not (tmp_path / "out").exists()


def test_an_existing_export_is_replaced_only_with_force(tiny_mnist_run, tmp_path, capsys):
  out = tmp_path / "stablehlo"
  out.mkdir()
  (out / "keep.txt").write_text("mine")
  before = tree_snapshot(tmp_path)
  result = run_main(capsys, "export", "--workdir", tiny_mnist_run, "--format", "stablehlo", "--out", out)
  assert_one_clear_error(result, "already exists", "--force")
  assert tree_snapshot(tmp_path) == before
  assert run_main(capsys, "export", "--workdir", tiny_mnist_run, "--format", "stablehlo", "--out", out,
                  "--force")[0] == 0
  assert sorted(p.name for p in out.iterdir()) == ["card.json", "model.stablehlo"]


@pytest.mark.parametrize("args, fragment", [
    (["--format", "coreml"], "unknown --format 'coreml'; formats: stablehlo, savedmodel, tflite, onnx"),
    (["--format", "onnx"], "has no checkpoint"),
])
def test_bad_export_requests_are_one_line_and_write_nothing(tmp_path, capsys, args, fragment):
  (tmp_path / "empty").mkdir()
  before = tree_snapshot(tmp_path)
  assert_one_clear_error(run_main(capsys, "export", "--workdir", tmp_path / "empty", *args), fragment)
  assert tree_snapshot(tmp_path) == before


def test_a_missing_optional_dependency_names_the_extra(tmp_path, capsys, monkeypatch):
  write_checkpoint(tmp_path / "run")
  real_find_spec = export.importlib.util.find_spec
  monkeypatch.setattr(export.importlib.util, "find_spec",
                      lambda name, *a: None if name == "jax2onnx" else real_find_spec(name, *a))
  before = tree_snapshot(tmp_path)
  result = run_main(capsys, "export", "--workdir", tmp_path / "run", "--format", "onnx")
  assert_one_clear_error(result, "needs jax2onnx", "bash scripts/setup.sh export")
  assert tree_snapshot(tmp_path) == before


def test_predict_needs_exactly_one_source(tmp_path, capsys):
  assert_one_clear_error(run_main(capsys, "predict", "x.png"), "--workdir", "--model-file")
  assert_one_clear_error(run_main(capsys, "predict", "--model-file", tmp_path, "x.png"),
                         "is not a flaxzoo export")
