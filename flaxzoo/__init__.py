"""flaxzoo: a Flax model zoo you can train, stop, resume, fine-tune and load.

`flaxzoo.models` (linen modules behind a timm-style registry), `flaxzoo.training` (the loop,
checkpoints, evaluation, the CLI), `flaxzoo.data` (tfds datasets and image folders),
`flaxzoo.benchmarks`. Importing any of them changes nothing process-wide; `flaxzoo.runtime.configure()`
applies the measured XLA:CPU, allocator and compilation-cache settings.
"""

__version__ = "0.2.0"
