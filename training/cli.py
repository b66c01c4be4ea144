"""The `flaxzoo` command line: `models`, `train`, `finetune`, `eval`, `predict`, `analyze`, `export`, `launch`,
`bench`. Each does what the Python API does. Commands import what they use: `flaxzoo --help` and `flaxzoo models` load
no orbax, optax or TensorFlow."""

import argparse
import json
import logging
import os
import sys
from pathlib import Path

from flaxzoo.training.config import AUGMENTATIONS, TEST_TIME_AUGMENTATIONS
from flaxzoo.training.config import FIELDS_WITH_FLAGS as TRAIN_FLAGS


def _print_error(message: str) -> int:
  print(f"flaxzoo: error: {message}", file=sys.stderr)
  return 2


def cmd_models(args) -> int:
  from flaxzoo import models
  from flaxzoo.training import configs
  rows = []
  for name in models.list_models(args.pattern):
    model = models.create_model(name)
    rows.append({"name": name, "params": models.param_count(model),
                 "flops_per_image": models.flops_per_image(model),
                 "description": models.model_description(name),
                 "kwargs": models.model_kwargs(model), "train_defaults": configs.model_recipe(name)})
  if args.json:
    print(json.dumps(rows))
  else:
    print(f"{'model':<10} {'params':>9} {'MFLOPs/img':>10}  description (28x28x1 input)")
    for row in rows:
      print(f"{row['name']:<10} {row['params']:>9,} {row['flops_per_image'] / 1e6:>10.2f}  "
            f"{row['description']}")
  return 0




def _train_overrides(args) -> dict:
  """Config overrides from the flags given (and --set KEY=VALUE), for train and finetune."""
  from flaxzoo.training.config import ConfigError
  overrides = {k: getattr(args, k) for k in TRAIN_FLAGS if getattr(args, k, None) is not None}
  for item in args.set or []:
    key, sep, text = item.partition("=")
    if not sep:
      raise ConfigError(f"--set takes KEY=VALUE, got {item!r}")
    try:
      overrides[key] = json.loads(text)
    except json.JSONDecodeError:
      overrides[key] = text  # a bare string such as a path
  return overrides


def cmd_train(args) -> int:
  from flaxzoo import data
  from flaxzoo.training import checkpoint, configs, train
  from flaxzoo.training import config as config_lib
  overrides = _train_overrides(args)
  if "dataset" in overrides:
    overrides["dataset"] = data.canonical_name(overrides["dataset"])  # folder:PATH, absolute
  if args.config:
    config = configs.named_config(args.config, **overrides)
  else:
    config = configs.default_config(**{"model": "convnet", **overrides})
  config_name = args.config and Path(args.config).name.removesuffix(".toml")
  workdir = args.workdir or config_lib.default_workdir(config, config_name)
  if checkpoint.saved_steps(workdir):
    # Continue the saved run: its config is the base, the flags given now change it.
    saved = config_lib.from_dict(checkpoint.read_card(workdir)["config"])
    config = config_lib.override(saved, overrides)
  train.train_and_evaluate(config, workdir, args.devices)
  return 0


def read_class_map(path) -> dict:
  """--class-map FILE: a JSON object {new class name: checkpoint class name} (read as data only)."""
  from flaxzoo.training.config import ConfigError
  try:
    with open(path) as f:
      class_map = json.load(f)
  except OSError as e:
    raise ConfigError(f"cannot read --class-map {path} ({e.strerror})") from e
  except json.JSONDecodeError as e:
    raise ConfigError(f"--class-map {path} is not JSON ({e.msg} at line {e.lineno}); write an object "
                      f"such as {{\"seven\": \"7\"}}") from e
  if not (isinstance(class_map, dict) and all(isinstance(v, str) for v in class_map.values())):
    raise ConfigError(f"--class-map {path} must hold one JSON object of class names, "
                      f"{{\"new name\": \"checkpoint name\"}}")
  return class_map


def cmd_finetune(args) -> int:
  from flaxzoo.training.finetuning import finetune
  overrides = _train_overrides(args)
  if args.class_map:
    overrides["class_map"] = read_class_map(args.class_map)
  dataset = overrides.pop("dataset")
  finetune(args.source, dataset, args.workdir, step=args.step, devices=args.devices, **overrides)
  return 0


def cmd_predict(args) -> int:
  from flaxzoo.training.inference import predict_files
  if args.top_k < 1:
    return _print_error(f"--top-k must be at least 1, got {args.top_k}")
  if (args.workdir is None) == (args.model_file is None):
    return _print_error("give --workdir (a checkpoint) or --model-file (a stablehlo export), not both")
  if args.model_file and (args.saliency or args.step is not None):
    return _print_error("--saliency and --step need the checkpoint: use --workdir instead of --model-file")
  predictions, errors, card = predict_files(args.workdir, args.images, args.top_k, args.step,
                                            saliency=args.saliency, model_file=args.model_file)
  for error in errors:
    print(f"flaxzoo: error: {error['error']}", file=sys.stderr)
  if args.json:
    step = card["source"]["step"] if args.model_file else card["step"]
    source = {"model_file": str(args.model_file)} if args.model_file else {"workdir": str(args.workdir)}
    print(json.dumps({**source, "step": step, "predictions": predictions, "errors": errors}))
  else:
    for prediction in predictions:
      ranked = ", ".join(f"{p['class']} {p['probability']:.1%}" for p in prediction["top_k"])
      saliency = f" (saliency: {prediction['saliency']})" if "saliency" in prediction else ""
      print(f"{prediction['file']}: {ranked}{saliency}")
  return 2 if errors else 0


def cmd_export(args) -> int:
  from flaxzoo.training.export import default_out, export_checkpoint, print_summary
  card = export_checkpoint(args.workdir, args.format, args.out, args.step, args.force,
                           args.data_dir, args.manual_dir)
  out = args.out or default_out(args.workdir, args.format)
  print_summary(card, out)
  if args.json:
    print(json.dumps({"out": str(out), **card}))
  return 0


def cmd_eval(args) -> int:
  from flaxzoo.training.inference import evaluate_checkpoint
  result = evaluate_checkpoint(args.workdir, args.split, args.step, args.data_dir, args.manual_dir,
                               dataset=args.dataset, devices=args.devices,
                               streaming=args.streaming or "auto", workers=args.workers,
                               tta=args.tta)
  views = " (flip test-time augmentation)" if result.get("tta") == "flip" else ""
  print(f"{args.workdir} step {result['step']}: {result['dataset']} {args.split} accuracy{views} "
        f"{result['accuracy']:.2%}, macro-F1 {result['macro_f1']:.4f}, loss {result['loss']:.4f} "
        f"on {result['num_examples']} examples")
  per_class = ", ".join(f"{name} {'-' if acc is None else f'{acc:.1%}'}"
                        for name, acc in result["per_class_accuracy"].items())
  print(f"per-class accuracy: {per_class}")
  if result["files"]:
    print(f"wrote {' and '.join(result['files'])}")
  if args.json:
    print(json.dumps(result))
  return 0


def cmd_analyze(args) -> int:
  from flaxzoo.training import checkpoint_analysis as analysis
  report = analysis.analyze_checkpoint(
      args.workdir, args.split, args.top, args.hessian_examples, args.hessian_top, args.lanczos_steps,
      args.probes, args.seed, args.step, args.data_dir, args.manual_dir)
  for line in analysis.summary_lines(report):
    print(line)
  print(f"wrote {', '.join(report['files'])}")
  if args.json:
    print(json.dumps(report))
  return 0


def cmd_launch(args) -> int:
  from flaxzoo.training.launch import launch
  argv = args.command_args[1:] if args.command_args[:1] == ["--"] else args.command_args
  return launch(args.num_processes, argv, args.devices_per_process, args.port)


BENCH_FRAMEWORKS = ("jax", "torch_eager", "torch_compile")


def bench_settings_error(args, frameworks) -> str | None:
  """The first bad `bench` setting, as the one line to print (None if all are good)."""
  import importlib.util
  unknown = [f for f in frameworks if f not in BENCH_FRAMEWORKS]
  if unknown or not frameworks:
    return (f"unknown --frameworks {', '.join(unknown) or repr(args.frameworks)}; choose among "
            f"{', '.join(BENCH_FRAMEWORKS)}")
  for flag in ("batch_size", "eval_batch_size", "steps", "repeats", "latency_calls"):
    if getattr(args, flag) < 1:
      return f"--{flag.replace('_', '-')} must be at least 1, got {getattr(args, flag)}"
  if any(f.startswith("torch") for f in frameworks) and importlib.util.find_spec("torch") is None:
    return ("PyTorch is not installed: install the bench extra (pip install -e '.[bench]'), or "
            "pass --frameworks jax")
  return None


def bench_device_counts(text: str | None) -> tuple[int, ...]:
  """--devices 1,2,4 -> (1, 2, 4); a bad list raises ConfigError."""
  from flaxzoo.training.config import ConfigError
  if not text:
    return ()
  try:
    counts = tuple(int(part) for part in text.split(","))
  except ValueError:
    counts = ()
  if not counts or min(counts) < 1:
    raise ConfigError(f"--devices takes device counts such as 1,2,4, got {text!r}")
  return counts


def emulate_cpu_devices(count: int) -> None:
  """Asks XLA for `count` CPU devices unless XLA_FLAGS already says how many (no effect on GPU or
  TPU devices); only works before JAX starts, which the CLI has not yet done."""
  flags = os.environ.get("XLA_FLAGS", "")
  if "--xla_force_host_platform_device_count=" not in flags:
    os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={count}".strip()


def cmd_bench(args) -> int:
  from flaxzoo.benchmarks import report
  frameworks = tuple(f.strip() for f in args.frameworks.split(",") if f.strip())
  error = bench_settings_error(args, frameworks)
  if error:
    return _print_error(error)
  log = (lambda *a, **k: print(*a, file=sys.stderr, **k)) if args.json else print
  result = report.benchmark(model=args.model, batch_size=args.batch_size,
                            eval_batch_size=args.eval_batch_size, steps=args.steps,
                            repeats=args.repeats, latency_calls=args.latency_calls,
                            frameworks=frameworks, memory=not args.no_memory, sweep=args.sweep,
                            real_data=args.real_data, time_to_accuracy=args.time_to_accuracy,
                            manual_dir=args.manual_dir, csv_path=args.csv,
                            devices=bench_device_counts(args.devices), log=log)
  if args.json:
    print(json.dumps(result))
  return 0


def _training_flags() -> argparse.ArgumentParser:
  """The flags `train` and `finetune` share (each adds its own around them)."""
  parent = argparse.ArgumentParser(add_help=False)
  parent.add_argument("--workdir", help="checkpoints and metrics.jsonl (default checkpoints/<dataset>-"
                      "<model>; for finetune <dataset>-<model>-from-<SRC name>)")
  parent.add_argument("--epochs", type=int, help="default: the recipe's (finetune: the source run's)")
  parent.add_argument("--batch-size", type=int)
  parent.add_argument("--learning-rate", type=float, help="peak learning rate of the one-cycle schedule")
  parent.add_argument("--seed", type=int)
  parent.add_argument("--checkpoint-every-steps", type=int, metavar="K",
                      help="also save a checkpoint every K steps (default: at epoch ends only)")
  parent.add_argument("--dtype", choices=("float32", "bfloat16"),
                      help="training compute dtype (parameters and optimizer state stay float32)")
  parent.add_argument("--optimizer", choices=("adamw", "sgd"), help="adamw (default) or sgd "
                      "(Nesterov momentum 0.9)")
  parent.add_argument("--schedule", choices=("onecycle", "cosine", "linear", "step", "constant"),
                      help="learning-rate schedule (default onecycle; the others warm up first)")
  parent.add_argument("--label-smoothing", type=float, metavar="E", help="label smoothing of the "
                      "training loss (default 0)")
  parent.add_argument("--ema-decay", type=float, metavar="D", help="keep an exponential moving "
                      "average of the weights (e.g. 0.999); eval, predict, export and fine-tune "
                      "use it (default 0: none)")
  parent.add_argument("--grad-accum", type=int, metavar="K", help="K micro-batches of "
                      "batch-size/K per optimizer step, in one jitted step (default 1)")
  parent.add_argument("--augment", metavar="NAMES", help="training augmentations, comma-separated: "
                      + ", ".join(AUGMENTATIONS) + " (default: the recipe's; none)")
  parent.add_argument("--tta", choices=TEST_TIME_AUGMENTATIONS, help="test-time augmentation of "
                      "eval and predict: flip averages each image's and its mirror's probabilities "
                      "(default none)")
  parent.add_argument("--log-every-steps", type=int, metavar="K", help="a train record in "
                      "metrics.jsonl and TensorBoard every K steps (default 100; and at epoch ends)")
  parent.add_argument("--profile-steps", metavar="A:B", help="write a jax.profiler trace of train "
                      "steps A..B into WORKDIR/profile/ (TensorBoard's profile plugin, Perfetto)")
  parent.add_argument("--max-image-pixels", type=int, metavar="N", help="open image files of up "
                      "to N pixels (PIL's decompression-bomb limit, default 89,478,485)")
  parent.add_argument("--manual-dir", help="folder holding the dataset's original raw files")
  parent.add_argument("--data-dir", help="tfds data dir for prepared data (default tfds's own)")
  _streaming_flags(parent)
  parent.add_argument("--set", action="append", metavar="KEY=VALUE",
                      help="override any config field, e.g. --set model_kwargs='{\"widths\": [8, 16]}'")
  _device_flag(parent)
  processes = parent.add_argument_group("several processes (hosts): give all three, on every one "
                                        "(none on a cluster JAX detects: SLURM, Open MPI, TPU pods)")
  processes.add_argument("--coordinator", metavar="HOST:PORT", help="process 0's address")
  processes.add_argument("--num-processes", type=int, metavar="P")
  processes.add_argument("--process-id", type=int, metavar="I", help="0..P-1, one per process")
  processes.add_argument("--process-timeout", type=int, default=60, metavar="S", help="seconds to "
                         "wait for the others at start, and before a silent process counts as dead "
                         "(60)")
  return parent


def _streaming_flags(parser) -> None:
  parser.add_argument("--streaming", choices=("auto", "on", "off"), help="read the data by index "
                      "from disk in worker processes (on), or into memory (off); auto (default) "
                      "streams a split whose decoded images exceed 256 MiB. Same batches either way")
  parser.add_argument("--workers", type=int, metavar="N", help="worker processes decoding batches "
                      "when streaming (default: half the cores, at least 1; 0: threads)")


def _device_flag(parser) -> None:
  parser.add_argument("--devices", type=int, metavar="N", help="local devices to split each batch "
                      "over (default: all; on CPU XLA_FLAGS=--xla_force_host_platform_device_count=N "
                      "makes N)")


def build_parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(prog="flaxzoo", description="Flax model zoo: train, evaluate "
                                   "and checkpoint image classifiers on tfds datasets.")
  sub = parser.add_subparsers(dest="command", required=True)

  p = sub.add_parser("models", help="list registered models")
  p.add_argument("pattern", nargs="?", help="shell-style wildcard, e.g. 'conv*'")
  p.add_argument("--json", action="store_true", help="print one JSON list")
  p.set_defaults(func=cmd_models)

  training_flags = _training_flags()
  p = sub.add_parser("train", parents=[training_flags],
                     help="train a model (continues from WORKDIR's latest checkpoint)")
  p.add_argument("--config", metavar="NAME|FILE", help="a TOML config file of training.Config "
                 "fields, or the name of one in configs/: fast (>= 99%% on MNIST in one epoch) or "
                 "a model's recipe; the other flags override it")
  p.add_argument("--model", help="registered model name (default convnet)")
  p.add_argument("--dataset", help="tfds dataset name (default mnist) or folder:PATH")
  p.set_defaults(func=cmd_train)

  p = sub.add_parser("finetune", parents=[training_flags],
                     help="fine-tune a trained checkpoint on another dataset")
  p.add_argument("--from", dest="source", required=True, metavar="SRC_WORKDIR",
                 help="workdir of the trained model (its newest readable checkpoint)")
  p.add_argument("--dataset", required=True,
                 help="tfds dataset name (e.g. fashion_mnist) or folder:PATH of class subfolders")
  p.add_argument("--step", type=int, help="source checkpoint step (default: its newest)")
  p.add_argument("--freeze", help="none (default), backbone (all but the head), or comma-separated "
                 "wildcards of parameter paths, e.g. 'Conv_*'")
  p.add_argument("--head-learning-rate", type=float, metavar="LR",
                 help="peak learning rate of the classifier head (default: --learning-rate)")
  p.add_argument("--head", choices=("auto", "keep", "reinit"),
                 help="the source's classifier: auto (default) keeps the rows of the classes the "
                 "checkpoint has by name, in the new order, and re-initialises the others")
  p.add_argument("--class-map", metavar="FILE", help="JSON {new class name: checkpoint class name}: "
                 "keep those rows (with --head auto), e.g. {\"seven\": \"7\"}")
  p.set_defaults(func=cmd_finetune)

  p = sub.add_parser("predict", help="classify image files with a trained checkpoint")
  p.add_argument("--workdir", help="the trained run (or give --model-file)")
  p.add_argument("--model-file", metavar="PATH", help="a `flaxzoo export --format stablehlo` folder "
                 "(or its model.stablehlo): runs without the model's Python code")
  p.add_argument("images", nargs="+", metavar="IMAGE", help="PNG or JPEG files")
  p.add_argument("--top-k", type=int, default=3, metavar="K", help="classes shown per image (3)")
  p.add_argument("--step", type=int, help="checkpoint step (default: the latest)")
  p.add_argument("--json", action="store_true", help="print one JSON object")
  p.add_argument("--max-image-pixels", type=int, metavar="N", help="open image files of up to N "
                 "pixels (PIL's decompression-bomb limit, default 89,478,485)")
  p.add_argument("--saliency", action="store_true", help="also write IMAGE.saliency.png beside each "
                 "image: |d logit / d input| of the predicted class")
  p.set_defaults(func=cmd_predict)

  p = sub.add_parser("analyze", help="per-example gradients, the Hessian's spectrum and trace of a "
                     "checkpoint")
  p.add_argument("--workdir", required=True)
  p.add_argument("--split", default="test", help="split of the per-example analysis (test)")
  p.add_argument("--top", type=int, default=16, metavar="K", help="examples listed and drawn (16)")
  p.add_argument("--hessian-examples", type=int, default=1000, metavar="N",
                 help="training examples, chosen with --seed, of the Hessian's loss (1000)")
  p.add_argument("--hessian-top", type=int, default=5, metavar="k", help="top eigenvalues (5)")
  p.add_argument("--lanczos-steps", type=int, default=30, help="Lanczos iterations (30)")
  p.add_argument("--probes", type=int, default=50, help="Hutchinson probes of the trace (50)")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--step", type=int, help="checkpoint step (default: the latest)")
  p.add_argument("--manual-dir")
  p.add_argument("--data-dir")
  p.add_argument("--json", action="store_true", help="last line of stdout: one JSON object")
  p.set_defaults(func=cmd_analyze)

  p = sub.add_parser("export", help="a checkpoint as StableHLO, TF SavedModel, TFLite or ONNX, "
                     "checked against Flax before it is written")
  p.add_argument("--workdir", required=True)
  p.add_argument("--format", required=True, help="stablehlo, savedmodel, tflite or onnx")
  p.add_argument("--out", metavar="PATH", help="output folder (default WORKDIR/export/FORMAT)")
  p.add_argument("--step", type=int, help="checkpoint step (default: the latest)")
  p.add_argument("--force", action="store_true", help="replace an existing output folder")
  p.add_argument("--manual-dir", help="raw files of the checkpoint's dataset (the check's test images)")
  p.add_argument("--data-dir")
  p.add_argument("--json", action="store_true", help="last line of stdout: the export's card")
  p.set_defaults(func=cmd_export)

  p = sub.add_parser("eval", help="evaluate a checkpoint in a new process")
  p.add_argument("--workdir", required=True)
  p.add_argument("--dataset", metavar="folder:NEWPATH", help="the image folder it was trained on, "
                 "moved (the same classes)")
  p.add_argument("--split", default="test")
  p.add_argument("--step", type=int, help="checkpoint step (default: the latest)")
  p.add_argument("--manual-dir")
  p.add_argument("--data-dir")
  p.add_argument("--json", action="store_true", help="last line of stdout: one JSON object")
  p.add_argument("--tta", choices=TEST_TIME_AUGMENTATIONS, help="test-time augmentation (default: "
                 "the run's --tta): none or flip")
  _streaming_flags(p)
  _device_flag(p)
  p.set_defaults(func=cmd_eval)

  p = sub.add_parser("launch", help="run train or finetune as P local processes of one "
                     "multi-process run (jax.distributed on 127.0.0.1)")
  p.add_argument("--num-processes", type=int, required=True, metavar="P")
  p.add_argument("--devices-per-process", type=int, metavar="D", help="CPU devices each process "
                 "emulates (XLA_FLAGS=--xla_force_host_platform_device_count=D)")
  p.add_argument("--port", type=int, help="the coordinator's port (default: a free one)")
  p.add_argument("command_args", nargs=argparse.REMAINDER, metavar="-- train|finetune ...",
                 help="the command every process runs")
  p.set_defaults(func=cmd_launch)

  p = sub.add_parser("bench", help="JAX against PyTorch eager and torch.compile on this machine")
  p.add_argument("--model", default="convnet", help="registered model (torch twins: convnet, "
                 "lenet5, mlp, resnet; others with --frameworks jax)")
  p.add_argument("--batch-size", type=int, default=128)
  p.add_argument("--eval-batch-size", type=int, default=1024)
  p.add_argument("--steps", type=int, default=20, help="train steps per timed repeat (20)")
  p.add_argument("--repeats", type=int, default=7, help="timed repeats per framework; medians (7)")
  p.add_argument("--latency-calls", type=int, default=200, help="batch-1 calls per framework")
  p.add_argument("--frameworks", default="jax,torch_eager,torch_compile",
                 help="comma-separated, among jax, torch_eager, torch_compile")
  p.add_argument("--no-memory", action="store_true", help="skip the peak-RSS child processes")
  p.add_argument("--sweep", action="store_true",
                 help="also: img/s against batch size 32..1024, epoch time against data fraction")
  p.add_argument("--real-data", action="store_true",
                 help="also: real MNIST input path against synthetic batches, checkpoint cost")
  p.add_argument("--time-to-accuracy", action="store_true", help="also: wall time to 99.0%% MNIST "
                 "test accuracy, flaxzoo train --config fast against a plain PyTorch script")
  p.add_argument("--manual-dir", help="MNIST raw files (default $FLAXZOO_MANUAL_DIR/mnist)")
  p.add_argument("--csv", metavar="PATH", help="also append the run as one row to this CSV file")
  p.add_argument("--devices", metavar="N,N,...", help="also: the data-parallel train step on these "
                 "device counts and the one-device overhead against the plain step (on CPU, that "
                 "many devices are emulated on the same cores)")
  p.add_argument("--json", action="store_true", help="last line of stdout: one JSON object")
  p.set_defaults(func=cmd_bench)
  return parser


def main(argv=None) -> int:
  args = build_parser().parse_args(argv)
  # Process-wide settings belong to the entry point: TensorFlow's and XLA's C++ start-up chatter
  # off, then flaxzoo's measured XLA:CPU settings before anything computes.
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
  if args.command == "bench" and args.devices:
    try:
      emulate_cpu_devices(max(bench_device_counts(args.devices)))
    except ValueError as e:  # ConfigError, without importing the config module's users
      return _print_error(str(e))
  from flaxzoo import runtime
  runtime.configure()
  from flaxzoo.training.errors import USER_ERRORS, TrainingInterrupted
  if args.command in ("train", "finetune"):  # process-wide, before anything starts JAX's backend
    from flaxzoo.training import launch, parallel
    flags = (args.coordinator, args.num_processes, args.process_id)
    try:
      if parallel.wanted(*flags) and not os.environ.get(launch.SUPERVISED_ENV):
        parallel.check_process_flags(*flags)
        return launch.supervise(args.process_id, args.workdir)  # runs this command as its child
      parallel.initialize(*flags, args.process_timeout)
    except USER_ERRORS as e:
      return _print_error(str(e))
  if not os.environ.get("FLAXZOO_DEBUG") and args.command not in ("models", "launch"):
    # orbax logs routine notices as warnings, and a failure it raises as an error log with a
    # traceback from each of its threads; the one line below says what went wrong and what to do.
    import absl.logging

    from flaxzoo.training import checkpoint
    absl.logging.set_verbosity(absl.logging.FATAL)
    logging.getLogger("asyncio").setLevel(logging.CRITICAL)  # its tasks' errors, once more
    checkpoint.ignore_closed_loop_callbacks()
  if getattr(args, "max_image_pixels", None):  # process-wide, like PIL's own setting
    from PIL import Image
    Image.MAX_IMAGE_PIXELS = args.max_image_pixels
  try:
    return args.func(args)
  except USER_ERRORS as e:
    return _print_error(str(e))
  except TrainingInterrupted as e:
    import jax
    if jax.process_index() == 0:  # every process of a run stops alike: one says so
      print(f"flaxzoo: {e}", file=sys.stderr)
    return e.exit_status
  except KeyboardInterrupt:
    _print_error("interrupted")
    return 130
