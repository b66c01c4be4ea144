"""PyTorch twins of zoo models, for side-by-side benchmarks only (torch is an optional extra).

A twin is the same architecture with the same weights: `torch_twin(model, params, batch_stats)`
copies the Flax parameters into it (kernels HWIO -> OIHW, dense (in, out) -> (out, in), BatchNorm's
scale, bias and running statistics), so both start from the same initialisation and compute the
same function (tests/test_bench.py checks the logits agree). Inputs are NCHW float tensors,
PyTorch's default layout.
"""

import numpy as np

TWINNED_MODELS = ("convnet", "lenet5", "mlp", "resnet")


def import_torch():
  """torch, or one actionable error when the optional extra is not installed."""
  try:
    import torch
  except ImportError as e:
    raise ImportError("PyTorch is not installed; the side-by-side benchmark needs it: "
                      "pip install -e '.[bench]' (or run flaxzoo bench --frameworks jax)") from e
  return torch


def torch_twin(model, params, batch_stats=None):
  """A torch.nn.Module computing what the Flax `model` computes with `params` (and `batch_stats`,
  for a model with BatchNorm)."""
  torch = import_torch()
  nn, F = torch.nn, torch.nn.functional
  name = model.registered_name
  if name not in TWINNED_MODELS:
    raise ValueError(f"no PyTorch twin for model {name!r}; the side-by-side benchmark supports "
                     f"{', '.join(TWINNED_MODELS)} (run flaxzoo bench --frameworks jax for others)")

  def tensor(array):
    return torch.from_numpy(np.array(array, np.float32))

  def conv(p, padding, stride=1):
    kernel = np.asarray(p["kernel"])
    layer = nn.Conv2d(kernel.shape[2], kernel.shape[3], kernel.shape[:2], stride=stride,
                      padding=padding, bias="bias" in p)
    layer.weight.data = tensor(kernel.transpose(3, 2, 0, 1))
    if "bias" in p:
      layer.bias.data = tensor(p["bias"])
    return layer

  def batch_norm(p, stats):
    layer = nn.BatchNorm2d(len(p["scale"]), eps=1e-5, momentum=0.1)  # linen's momentum 0.9
    layer.weight.data, layer.bias.data = tensor(p["scale"]), tensor(p["bias"])
    layer.running_mean.data, layer.running_var.data = tensor(stats["mean"]), tensor(stats["var"])
    return layer

  def same_padding(x, kernel: int, stride: int):
    """linen's SAME: the padding a stride needs goes after the image first (a 3x3 kernel at
    stride 2 on 28 pixels: 0 before, 1 after), where PyTorch's `padding` is symmetric."""
    size = x.shape[-1]
    total = max((-(-size // stride) - 1) * stride + kernel - size, 0)
    return F.pad(x, (total // 2, total - total // 2, total // 2, total - total // 2))

  class ResidualBlock(nn.Module):
    def __init__(self, p, stats, stride):
      super().__init__()
      self.stride = stride
      self.conv_0, self.norm_0 = conv(p["Conv_0"], 0, self.stride), batch_norm(p["BatchNorm_0"], stats["BatchNorm_0"])
      self.conv_1, self.norm_1 = conv(p["Conv_1"], 1), batch_norm(p["BatchNorm_1"], stats["BatchNorm_1"])
      self.project = nn.Sequential(conv(p["Conv_2"], 0, self.stride), batch_norm(
          p["BatchNorm_2"], stats["BatchNorm_2"])) if "Conv_2" in p else None

    def forward(self, x):
      y = F.relu(self.norm_0(self.conv_0(same_padding(x, 3, self.stride))))
      y = self.norm_1(self.conv_1(y))
      return F.relu((self.project(x) if self.project is not None else x) + y)

  class ResNet(nn.Module):
    def __init__(self):
      super().__init__()
      self.stem = nn.Sequential(conv(params["Conv_0"], 1),
                                batch_norm(params["BatchNorm_0"], batch_stats["BatchNorm_0"]), nn.ReLU())
      per_stage = (model.depth - 2) // 6  # as models/resnet.py: stages after the first start at stride 2
      self.blocks = nn.Sequential(*(
          ResidualBlock(params[f"ResidualBlock_{i}"], batch_stats[f"ResidualBlock_{i}"],
                        2 if i >= per_stage and i % per_stage == 0 else 1)
          for i in range(per_stage * len(model.widths))))
      self.head = dense(params["head"])

    def forward(self, x):
      return self.head(self.blocks(self.stem(x)).mean(dim=(2, 3)))

  def dense(p):
    kernel = np.asarray(p["kernel"])
    layer = nn.Linear(*kernel.shape)
    layer.weight.data = torch.from_numpy(kernel.T.copy())
    layer.bias.data = torch.from_numpy(np.asarray(p["bias"]).copy())
    return layer

  def flatten_nhwc(x):  # Flax flattens (H, W, C); so must the twin for the weights to line up
    return x.permute(0, 2, 3, 1).flatten(1)

  if name == "resnet":
    return ResNet()

  class Twin(nn.Module):
    def __init__(self):
      super().__init__()
      if name == "convnet":
        self.convs = nn.ModuleList(conv(params[f"Conv_{i}"], "same") for i in range(len(model.widths)))
        self.denses = nn.ModuleList([dense(params["Dense_0"])])
      elif name == "lenet5":
        self.convs = nn.ModuleList([conv(params["Conv_0"], "same"), conv(params["Conv_1"], "valid")])
        self.denses = nn.ModuleList([dense(params["Dense_0"]), dense(params["Dense_1"])])
      else:  # mlp
        self.convs = nn.ModuleList()
        self.denses = nn.ModuleList(dense(params[f"Dense_{i}"]) for i in range(len(model.hidden)))
      self.head = dense(params["head"])

    def forward(self, x):
      for layer in self.convs:
        x = F.max_pool2d(F.relu(layer(x)), 2)
      x = flatten_nhwc(x)
      for layer in self.denses:
        x = F.relu(layer(x))
      return self.head(x)

  return Twin()
