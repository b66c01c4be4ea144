"""Looking inside a trained model with JAX's transformations, in eval mode (BatchNorm's running
statistics, no dropout):

- per-example gradients: `jax.vmap` of `jax.grad` over a batch, jitted; each example's loss and
  gradient norm (the hardest and likely mislabelled examples have the largest);
- the Hessian of the loss on a fixed subset, never formed: Hessian-vector products as
  forward-over-reverse (`jax.jvp` of `jax.grad`), its top eigenvalues by Lanczos and its trace by
  Hutchinson's estimator (the checkpoint's sharpness);
- saliency: |d logit / d input| of the predicted class, per pixel.
"""

import functools
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree

from flaxzoo import data
from flaxzoo.training.steps import cross_entropy, to_model_input

GRAD_BATCH = 100  # examples per vmapped call: their gradients (one model each) live at once


def _loss_of(model, variables):
  """loss(params, images, labels) -> (mean cross-entropy, logits), eval mode."""
  def loss(params, images, labels):
    logits = model.apply({**variables, "params": params}, to_model_input(images), train=False)
    return cross_entropy(logits, labels).mean(), logits
  return loss


def _example_grad(model, variables, image, label):
  """(gradient tree, loss, logits) of one example, for vmapping."""
  (value, logits), grads = jax.value_and_grad(_loss_of(model, variables), has_aux=True)(
      variables["params"], image[None], label[None])
  return grads, value, logits[0]


@functools.partial(jax.jit, static_argnums=0)
def per_example_grads(model, variables, images, labels):
  """The gradient of each example's loss with respect to the parameters (a tree with a leading
  batch axis), with each example's loss and logits."""
  return jax.vmap(functools.partial(_example_grad, model, variables))(images, labels)


@functools.partial(jax.jit, static_argnums=0)
def _grad_norm_batch(model, variables, images, labels):
  def one(image, label):  # the norm inside the vmapped function: XLA need not keep the gradients
    grads, value, logits = _example_grad(model, variables, image, label)
    return value, jnp.sqrt(sum(jnp.sum(g ** 2) for g in jax.tree.leaves(grads))), logits
  losses, norms, logits = jax.vmap(one)(images, labels)
  return losses, norms, jax.nn.softmax(logits)


def per_example_grad_norms(model, variables, images, labels, batch_size: int = GRAD_BATCH) -> dict:
  """Per example: `loss`, `grad_norm` (L2 over every parameter), `predicted` class and its
  `probability`, as numpy arrays over all of `images` (uint8 or [0, 1] float, NHWC)."""
  parts = []
  for batch_images, batch_labels, mask in data.eval_batches((images, labels), batch_size):
    losses, norms, probabilities = jax.device_get(
        _grad_norm_batch(model, variables, batch_images, batch_labels))
    keep = mask > 0
    parts.append((losses[keep], norms[keep], probabilities[keep]))
  losses, norms, probabilities = (np.concatenate(p) for p in zip(*parts))
  predicted = probabilities.argmax(1)
  return {"loss": losses, "grad_norm": norms, "predicted": predicted,
          "probability": probabilities[np.arange(len(predicted)), predicted]}


@functools.partial(jax.jit, static_argnums=0)
def _hvp(model, variables, images, labels, vector):
  flat, unravel = ravel_pytree(variables["params"])
  loss = _loss_of(model, variables)
  flat_grad = jax.grad(lambda theta: loss(unravel(theta), images, labels)[0])
  return jax.jvp(flat_grad, (flat,), (vector.astype(flat.dtype),))[1]


def hvp_function(model, variables, images, labels):
  """`(hvp, num_params)`: v -> H v for the Hessian of the mean loss over `images` with respect to
  the flattened parameters, as forward-over-reverse (jvp of grad), jitted. The data are the
  program's arguments, not constants in it (XLA would fold the forward pass at compile time)."""
  images, labels = jnp.asarray(images), jnp.asarray(labels)
  num_params = sum(leaf.size for leaf in jax.tree.leaves(variables["params"]))
  return functools.partial(_hvp, model, variables, images, labels), num_params


def hessian_eigenvalues(model, variables, images, labels, k: int = 5, steps: int = 30,
                        seed: int = 0) -> dict:
  """The `k` largest eigenvalues of the loss Hessian on `images`, by `steps` Lanczos iterations
  (full reorthogonalisation, seeded start) on Hessian-vector products.

  Returns `eigenvalues` (largest first), `residuals` (|beta_m * last Ritz vector component|, the
  bound ||H y - theta y|| on each: how far from converged) and `hvps` (products used)."""
  hvp, n = hvp_function(model, variables, images, labels)
  steps = min(steps, n)
  rng = np.random.default_rng(seed)
  q = rng.standard_normal(n)
  q /= np.linalg.norm(q)
  basis, alphas, betas = [q], [], []
  for _ in range(steps):
    w = np.asarray(hvp(jnp.asarray(basis[-1], jnp.float32)), np.float64)
    alphas.append(float(w @ basis[-1]))
    for v in basis:  # full reorthogonalisation, twice: float32 products lose orthogonality fast
      w -= (w @ v) * v
    for v in basis:
      w -= (w @ v) * v
    beta = float(np.linalg.norm(w))
    if len(alphas) == steps or beta < 1e-10:
      break
    betas.append(beta)
    basis.append(w / beta)
  m = len(alphas)
  tridiagonal = np.diag(alphas) + np.diag(betas[:m - 1], 1) + np.diag(betas[:m - 1], -1)
  values, vectors = np.linalg.eigh(tridiagonal)
  order = np.argsort(values)[::-1][:k]
  last_beta = beta
  return {"eigenvalues": [float(values[i]) for i in order],
          "residuals": [float(abs(last_beta * vectors[-1, i])) for i in order],
          "lanczos_steps": m, "hvps": m, "num_params": int(n)}


def hessian_trace(model, variables, images, labels, probes: int = 50, seed: int = 0) -> dict:
  """Hutchinson's estimate of the loss Hessian's trace on `images`: the mean of z^T H z over
  `probes` Rademacher vectors z (seeded), with its standard error."""
  hvp, n = hvp_function(model, variables, images, labels)
  key = jax.random.PRNGKey(seed)
  samples = []
  for i in range(probes):
    z = jax.random.rademacher(jax.random.fold_in(key, i), (n,), jnp.float32)
    samples.append(float(jnp.vdot(z, hvp(z))))
  samples = np.asarray(samples, np.float64)
  return {"trace": float(samples.mean()),
          "std_error": float(samples.std(ddof=1) / np.sqrt(probes)) if probes > 1 else float("nan"),
          "probes": probes, "hvps": probes}


@functools.partial(jax.jit, static_argnums=0)
def saliency(model, variables, images):
  """|d logit / d input| of each image's predicted class, the largest over channels: (N, H, W)."""
  inputs = to_model_input(images)

  def top_logit(x):
    logits = model.apply(variables, x[None], train=False)[0]
    return logits[jnp.argmax(logits)]
  return jnp.abs(jax.vmap(jax.grad(top_logit))(inputs)).max(axis=-1)


def hessian_report(model, variables, images, labels, examples: int = 1000, top: int = 5, steps: int = 30,
                   probes: int = 50, seed: int = 0) -> dict:
  """The loss Hessian on `examples` of (`images`, `labels`) chosen with `seed`: its `top`
  eigenvalues (Lanczos, `steps`) and trace (Hutchinson, `probes`), with the cost."""
  subset = np.sort(np.random.default_rng(seed).choice(len(images), examples, replace=False))
  start = time.perf_counter()
  args = (model, variables, images[subset], labels[subset])
  spectrum = hessian_eigenvalues(*args, k=top, steps=steps, seed=seed)
  trace = hessian_trace(*args, probes=probes, seed=seed)
  return {"split": "train", "examples": examples, "seed": seed,
          "top_eigenvalues": spectrum["eigenvalues"], "residuals": spectrum["residuals"],
          "lanczos_steps": spectrum["lanczos_steps"], "trace": trace["trace"],
          "trace_std_error": trace["std_error"], "probes": trace["probes"],
          "hvps": spectrum["hvps"] + trace["hvps"], "num_params": spectrum["num_params"],
          "seconds": time.perf_counter() - start}
