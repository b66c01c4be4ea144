"""PyTorch twins of zoo models, for side-by-side benchmarks only (torch is an optional extra).

A twin is the same architecture with the same weights: `torch_twin(model, params)` copies the Flax
parameters into it (kernels HWIO -> OIHW, dense (in, out) -> (out, in)), so both start from the
same initialisation and compute the same function (tests/test_bench.py checks the logits agree).
Inputs are NCHW float tensors, PyTorch's default layout.
"""

import numpy as np

TWINNED_MODELS = ("convnet", "lenet5", "mlp")


def import_torch():
  """torch, or one actionable error when the optional extra is not installed."""
  try:
    import torch
  except ImportError as e:
    raise ImportError("PyTorch is not installed; the side-by-side benchmark needs it: "
                      "pip install -e '.[bench]' (or run flaxzoo bench --frameworks jax)") from e
  return torch


def torch_twin(model, params):
  """A torch.nn.Module computing what the Flax `model` computes with `params`."""
  torch = import_torch()
  nn, F = torch.nn, torch.nn.functional
  name = model.registered_name
  if name not in TWINNED_MODELS:
    raise ValueError(f"no PyTorch twin for model {name!r}; the side-by-side benchmark supports "
                     f"{', '.join(TWINNED_MODELS)} (run flaxzoo bench --frameworks jax for others)")

  def conv(p, padding):
    kernel = np.asarray(p["kernel"])
    layer = nn.Conv2d(kernel.shape[2], kernel.shape[3], kernel.shape[:2], padding=padding)
    layer.weight.data = torch.from_numpy(kernel.transpose(3, 2, 0, 1).copy())
    layer.bias.data = torch.from_numpy(np.asarray(p["bias"]).copy())
    return layer

  def dense(p):
    kernel = np.asarray(p["kernel"])
    layer = nn.Linear(*kernel.shape)
    layer.weight.data = torch.from_numpy(kernel.T.copy())
    layer.bias.data = torch.from_numpy(np.asarray(p["bias"]).copy())
    return layer

  def flatten_nhwc(x):  # Flax flattens (H, W, C); so must the twin for the weights to line up
    return x.permute(0, 2, 3, 1).flatten(1)

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
