"""Zoo models as Flax NNX modules, through Flax's own `flax.nnx.bridge` (linen -> NNX).

    model = create_nnx_model("resnet", num_classes=10)   # fresh weights
    logits = model(images, train=False)                  # images: float32 in [0, 1], N x H x W x C
    logits = model(images, train=True, mutable=True)     # training: BatchNorm statistics update

`flaxzoo.training.load_nnx_model(WORKDIR)` gives the same with a checkpoint's weights. flax.nnx
loads only when one of these is called.
"""

from flaxzoo.models.profile import init_variables


def to_nnx(module, input_shape=(28, 28, 1), variables: dict | None = None, rngs=None):
  """`module` (a linen zoo model) as an initialised `nnx.bridge.ToNNX` module; with `variables`
  (linen's {'params': ..., 'batch_stats': ...}) it holds exactly those values."""
  from flax import nnx
  from flax.nnx.bridge import variables as bridge_variables

  rngs = rngs if rngs is not None else nnx.Rngs(params=0, dropout=1)  # dropout: ViT's stream
  model = nnx.bridge.ToNNX(module, rngs=rngs)
  if variables is None:  # one quickly compiled init: the bridge's own lazy_init runs op by op
    variables = init_variables(module, rngs.params(), input_shape)
  # The bridge's own linen -> NNX mapping: params become nnx.Param, batch_stats nnx.BatchStat.
  for name, value in bridge_variables.linen_vars_to_nnx_attrs(dict(variables)).items():
    setattr(model, name, nnx.data(value))
  return model


def create_nnx_model(name: str, num_classes: int = 10, input_shape=(28, 28, 1), rngs=None,
                     **model_kwargs):
  """The registered zoo model `name` as an NNX module with fresh weights (`rngs`: an nnx.Rngs with
  `params` and `dropout` streams; default seeds 0 and 1)."""
  from flaxzoo.models.registry import create_model
  return to_nnx(create_model(name, num_classes=num_classes, **model_kwargs), input_shape, rngs=rngs)
