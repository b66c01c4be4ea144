"""`flaxzoo export`: a checkpoint as a serving artifact that runs without the model's Python code.

Formats: serialized StableHLO (`jax.export`), TF SavedModel (`jax2tf`), TFLite (TF's converter, from
the same function), ONNX (`jax2onnx`). Each exports one function: uint8 images as the checkpoint's
dataset stores them (batch × H × W × C, the batch dimension symbolic), the model's own input
conversion, the model in eval mode (BatchNorm statistics, no dropout), softmax probabilities out.

Nothing is kept unchecked: the artifact is loaded back in its own runtime and run on real test
images at batch 1 and 64; only if it matches Flax within the format's tolerance does it move, with
its card (`card.json`), into the output folder. TensorFlow, jax2onnx and onnxruntime are imported
here only, in the exporting process.
"""

import importlib.metadata
import importlib.util
import json
import shutil
import tempfile
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from flaxzoo import __version__
from flaxzoo.training import checkpoint
from flaxzoo.training.errors import ExportError
from flaxzoo.training.steps import to_model_input

FORMATS = ("stablehlo", "savedmodel", "tflite", "onnx")
ARTIFACT = {"stablehlo": "model.stablehlo", "savedmodel": "saved_model", "tflite": "model.tflite",
            "onnx": "model.onnx"}
# Max |probability difference| from Flax that a kept artifact may have, per format.
TOLERANCE = {"stablehlo": 1e-5, "savedmodel": 1e-5, "tflite": 1e-5, "onnx": 1e-5}
CHECK_BATCHES = (1, 64)
# What each format needs beyond flaxzoo's own dependencies: (modules, how to install them).
NEEDS = {"savedmodel": (("tensorflow",), "tensorflow-cpu (a flaxzoo dependency)"),
         "tflite": (("tensorflow",), "tensorflow-cpu (a flaxzoo dependency)"),
         "onnx": (("jax2onnx", "onnxruntime", "onnx"), "the export extra: bash scripts/setup.sh export")}


def serving_function(model, variables):
  """uint8 images (N, H, W, C) -> class probabilities (N, num_classes), float32."""
  def serve(images):
    logits = model.apply(variables, to_model_input(images), train=False)
    return jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
  return serve


def check_dependencies(fmt: str) -> None:
  modules, install = NEEDS.get(fmt, ((), ""))
  missing = [m for m in modules if importlib.util.find_spec(m) is None]
  if missing:
    raise ExportError(f"--format {fmt} needs {', '.join(missing)}, which is not installed; install "
                      f"{install}")


def _version(package: str) -> str | None:
  try:
    return importlib.metadata.version(package)
  except importlib.metadata.PackageNotFoundError:
    return None


# Writers: (serve, input_shape, folder) -> the format's own version facts; each writes ARTIFACT.

def write_stablehlo(serve, input_shape, folder: Path) -> dict:
  from jax import export as jax_export
  batch = jax_export.symbolic_shape("batch")[0]
  spec = jax.ShapeDtypeStruct((batch, *input_shape), jnp.uint8)
  exported = jax_export.export(jax.jit(serve))(spec)
  (folder / ARTIFACT["stablehlo"]).write_bytes(exported.serialize())
  return {"jax": jax.__version__, "calling_convention_version": exported.calling_convention_version,
          "platforms": list(exported.platforms)}


def _tf_function(serve, input_shape):
  import tensorflow as tf
  from jax.experimental import jax2tf
  polymorphic = f"(batch, {', '.join(map(str, input_shape))})"
  converted = jax2tf.convert(serve, polymorphic_shapes=[polymorphic], with_gradient=False)
  return tf.function(converted, autograph=False,
                     input_signature=[tf.TensorSpec([None, *input_shape], tf.uint8, name="images")])


def write_savedmodel(serve, input_shape, folder: Path) -> dict:
  import tensorflow as tf
  module = tf.Module()
  module.serve = _tf_function(serve, input_shape)
  tf.saved_model.save(module, str(folder / ARTIFACT["savedmodel"]),
                      signatures={"serving_default": module.serve})
  return {"tensorflow": tf.__version__, "signature": "serving_default", "method": "serve"}


def write_tflite(serve, input_shape, folder: Path) -> dict:
  import tensorflow as tf
  function = _tf_function(serve, input_shape)
  converter = tf.lite.TFLiteConverter.from_concrete_functions([function.get_concrete_function()],
                                                              function)
  (folder / ARTIFACT["tflite"]).write_bytes(converter.convert())
  return {"tensorflow": tf.__version__}


def write_onnx(serve, input_shape, folder: Path) -> dict:
  import logging

  from jax2onnx import to_onnx
  logging.getLogger("onnx_ir").setLevel(logging.ERROR)  # notes about constant shapes, per graph
  batch = jax.export.symbolic_shape("batch")[0]
  proto = to_onnx(serve, [jax.ShapeDtypeStruct((batch, *input_shape), jnp.uint8)],
                  model_name="flaxzoo", input_names=["images"], output_names=["probabilities"])
  (folder / ARTIFACT["onnx"]).write_bytes(proto.SerializeToString())
  return {"jax2onnx": _version("jax2onnx"), "onnx": _version("onnx"),
          "opset": max(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx"))}


WRITERS = {"stablehlo": write_stablehlo, "savedmodel": write_savedmodel, "tflite": write_tflite,
           "onnx": write_onnx}


# Loaders: folder -> a callable taking uint8 images and returning probabilities, in the format's
# own runtime.

def load_stablehlo(folder: Path):
  from jax import export as jax_export
  exported = jax_export.deserialize(bytearray((Path(folder) / ARTIFACT["stablehlo"]).read_bytes()))
  return lambda images: np.asarray(exported.call(jnp.asarray(images, jnp.uint8)))


def load_savedmodel(folder: Path):
  import tensorflow as tf
  loaded = tf.saved_model.load(str(Path(folder) / ARTIFACT["savedmodel"]))
  return lambda images: loaded.serve(tf.constant(images, tf.uint8)).numpy()


def load_tflite(folder: Path):
  import warnings

  import tensorflow as tf
  with warnings.catch_warnings():  # tf.lite.Interpreter's own deprecation notice
    warnings.simplefilter("ignore")
    interpreter = tf.lite.Interpreter(model_path=str(Path(folder) / ARTIFACT["tflite"]))
  index_in = interpreter.get_input_details()[0]["index"]
  index_out = interpreter.get_output_details()[0]["index"]

  def run(images):
    interpreter.resize_tensor_input(index_in, images.shape)
    interpreter.allocate_tensors()
    interpreter.set_tensor(index_in, np.ascontiguousarray(images, np.uint8))
    interpreter.invoke()
    return interpreter.get_tensor(index_out).copy()
  return run


def load_onnx(folder: Path):
  import onnxruntime
  options = onnxruntime.SessionOptions()
  options.log_severity_level = 3  # its shape-merge notes are not errors
  session = onnxruntime.InferenceSession(str(Path(folder) / ARTIFACT["onnx"]), options,
                                         providers=["CPUExecutionProvider"])
  return lambda images: session.run(None, {"images": np.asarray(images, np.uint8)})[0]


LOADERS = {"stablehlo": load_stablehlo, "savedmodel": load_savedmodel, "tflite": load_tflite,
           "onnx": load_onnx}


def read_export_card(folder) -> dict:
  path = Path(folder) / "card.json"
  try:
    card = json.loads(path.read_text())
  except OSError as e:
    raise ExportError(f"{folder} is not a flaxzoo export ({path}: {e.strerror}); pass the folder "
                      f"that `flaxzoo export` wrote") from e
  except json.JSONDecodeError as e:
    raise ExportError(f"{path} is not valid JSON ({e.msg}); export again with --force") from e
  if card.get("format") not in FORMATS:
    raise ExportError(f"{path} names no export format; export again with --force")
  return card


def load_exported(path):
  """`(predict, card)` for an export folder (or its artifact file): `predict(uint8 images)` gives
  class probabilities from the format's own runtime, without the model's Python code."""
  folder = Path(path)
  if folder.is_file() or (folder.name in ARTIFACT.values() and (folder.parent / "card.json").exists()):
    folder = folder.parent
  card = read_export_card(folder)
  check_dependencies(card["format"])
  return LOADERS[card["format"]](folder), card


def check_images(card: dict, data_dir=None, manual_dir=None) -> np.ndarray:
  """The first 64 test images of the checkpoint's own dataset, as the model takes them."""
  from flaxzoo.training.inference import checkpoint_split
  images, _ = checkpoint_split(card, "test", data_dir, manual_dir)
  if len(images) < max(CHECK_BATCHES):
    raise ExportError(f"the check needs {max(CHECK_BATCHES)} test images; "
                      f"{card['dataset']['name']} gives {len(images)}")
  return images[:max(CHECK_BATCHES)]


def check_artifact(fmt: str, folder: Path, serve, images) -> dict:
  """Runs the artifact in its runtime at each check batch size against Flax; raises ExportError
  (with the numbers) when it differs by more than the format's tolerance."""
  run = LOADERS[fmt](folder)
  expected = np.asarray(jax.jit(serve)(images))
  differences = {}
  for batch in CHECK_BATCHES:
    got = np.asarray(run(images[:batch]))
    if got.shape != expected[:batch].shape:
      raise ExportError(f"the {fmt} export returned shape {got.shape} for a batch of {batch}, "
                        f"Flax {expected[:batch].shape}; nothing was written")
    differences[str(batch)] = float(np.max(np.abs(got - expected[:batch])))
  worst = max(differences.values())
  check = {"runtime": fmt, "batches": list(CHECK_BATCHES), "images": "first test images",
           "max_abs_difference": differences, "tolerance": TOLERANCE[fmt], "passed": worst <= TOLERANCE[fmt]}
  if not check["passed"]:
    raise ExportError(f"the {fmt} export differs from Flax by up to {worst:.3g} (tolerance "
                      f"{TOLERANCE[fmt]:g}; per batch size {differences}); nothing was written")
  return check


def default_out(workdir, fmt: str) -> Path:
  return Path(workdir) / "export" / fmt


def export_checkpoint(workdir, fmt: str, out=None, step: int | None = None, force: bool = False,
                      data_dir=None, manual_dir=None) -> dict:
  """Exports the checkpoint in `workdir` as `fmt` into the folder `out` (default
  WORKDIR/export/FMT/): the artifact and card.json. Returns the card. The artifact is checked
  against Flax before anything is written; an existing `out` is replaced only with `force`."""
  if fmt not in FORMATS:
    raise ExportError(f"unknown --format {fmt!r}; formats: {', '.join(FORMATS)}")
  out = Path(out) if out else default_out(workdir, fmt)
  if out.exists() and not out.is_dir():
    raise ExportError(f"--out {out} is a file; export writes a folder (the artifact and card.json)")
  if out.exists() and not force:
    raise ExportError(f"{out} already exists; pass --force to replace it, or --out another folder")
  check_dependencies(fmt)
  model, variables, source = checkpoint.load_checkpoint(workdir, step)
  images = check_images(source, data_dir, manual_dir)
  new_parents = [p for p in (out.parent, *out.parent.parents) if not p.exists()]
  out.parent.mkdir(parents=True, exist_ok=True)
  try:
    return _export_into(fmt, out, model, variables, source, images, workdir)
  except BaseException:
    for parent in new_parents:  # a failed export leaves no folder behind
      if parent.exists() and not any(parent.iterdir()):
        parent.rmdir()
    raise


def _export_into(fmt, out: Path, model, variables, source, images, workdir) -> dict:
  serve = serving_function(model, variables)
  with tempfile.TemporaryDirectory(prefix=f".{out.name}-", dir=out.parent) as staging:
    staging = Path(staging) / "export"
    staging.mkdir()
    try:
      format_facts = WRITERS[fmt](serve, tuple(source["input_shape"]), staging)
    except ExportError:
      raise
    except Exception as e:  # a converter that cannot take this model: say which and why
      first_line = (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
      raise ExportError(f"{source['model']['name']} cannot be exported as {fmt}: {first_line}") from e
    card = {"format": fmt, "artifact": ARTIFACT[fmt], "format_versions": format_facts,
            "input": {"dtype": "uint8", "shape": ["batch", *source["input_shape"]],
                      "conversion": "pixels / 255 (the model's own input conversion)"},
            "output": {"dtype": "float32", "shape": ["batch", source["num_classes"]],
                       "meaning": "class probabilities (softmax), in class_names order"},
            "class_names": source["dataset"]["class_names"], "model": source["model"],
            "source": {"workdir": str(Path(workdir).absolute()), "step": source["step"],
                       "dataset": source["dataset"]["name"]},
            "versions": {"flaxzoo": __version__, "jax": jax.__version__},
            "check": check_artifact(fmt, staging, serve, images)}
    (staging / "card.json").write_text(json.dumps(card, indent=1) + "\n")
    if out.exists():  # --force: the old export goes only once the new one is complete
      shutil.rmtree(out)
    staging.rename(out)
  return card


def print_summary(card: dict, out) -> None:
  check = card["check"]
  print(f"Exported {card['model']['name']} (step {card['source']['step']}) as {card['format']} to "
        f"{out}: max |difference| from Flax {check['max_abs_difference']} at batch sizes "
        f"{check['batches']} (tolerance {check['tolerance']:g})")
