"""Cross-check of the single-step methods against PyTorch code that follows the authors' training loops.

On identical weights (a small MLP), a fixed batch and fixed noise, this compares
tfrobust's training attacks (FGSM-RS, N-FGSM, FGSM), GradAlign's and ELLE's
penalties and the gradients of each objective w.r.t. the weights with a
PyTorch computation written after locuslab/fast_adversarial (FGSM-RS),
pdejorge/N-FGSM, tml-epfl/understanding-fast-adv-training (GradAlign) and
LIONS-EPFL/ELLE: the random draws of the references are replaced by the same
fixed noise arrays, nothing else. PyTorch runs in its own environment::

    python benchmarks/cross_check_single_step.py --torch-python /path/to/torch/env/bin/python

It prints one line per quantity with the largest absolute and relative
difference and exits 1 if any exceeds the float32 tolerance (``--atol``,
``--rtol``). The torch side is this file run with ``--torch-side IN OUT``.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile

import numpy as np

EPS = 8 / 255
SHAPE = (6, 6, 3)
HIDDEN, CLASSES, BATCH = 32, 10, 16
GRADALIGN_WEIGHT, ELLE_WEIGHT = 0.2, 1000.0


def fixed_inputs(seed=0) -> dict:
    """Weights, batch and noise, all float32 (the images away from 0 and 1 only by chance)."""
    rng = np.random.default_rng(seed)
    d = int(np.prod(SHAPE))
    f32 = lambda a: np.asarray(a, np.float32)  # noqa: E731
    return {
        "w1": f32(rng.standard_normal((d, HIDDEN)) * np.sqrt(2 / d)), "b1": f32(rng.standard_normal(HIDDEN) * 0.1),
        "w2": f32(rng.standard_normal((HIDDEN, CLASSES)) * np.sqrt(1 / HIDDEN)), "b2": f32(np.zeros(CLASSES)),
        "x": f32(rng.uniform(0, 1, (BATCH,) + SHAPE)), "y": rng.integers(0, CLASSES, BATCH).astype(np.int64),
        "u_start": f32(rng.uniform(-1, 1, (BATCH,) + SHAPE)), "u_align": f32(rng.uniform(-1, 1, (BATCH,) + SHAPE)),
        "u_a": f32(rng.uniform(-1, 1, (BATCH,) + SHAPE)), "u_b": f32(rng.uniform(-1, 1, (BATCH,) + SHAPE)),
        "alpha": f32(rng.uniform(0, 1, BATCH)),
    }


# -- tfrobust -------------------------------------------------------------------------------------


def tfrobust_side(inputs: dict) -> dict:
    import tensorflow as tf

    from tfrobust import attacks
    from tfrobust.defenses import Defense
    from tfrobust.defenses.input_space import GradAlign, LocalLinearity

    variables = [tf.Variable(inputs[k]) for k in ("w1", "b1", "w2", "b2")]
    w1, b1, w2, b2 = variables

    def model_fn(t):
        h = tf.nn.relu(tf.matmul(tf.reshape(t, [tf.shape(t)[0], -1]), w1) + b1)
        return tf.matmul(h, w2) + b2

    x, y = tf.constant(inputs["x"]), tf.constant(inputs["y"].astype(np.int32))
    start = lambda r: tf.clip_by_value(x + r * EPS * inputs["u_start"], 0.0, 1.0)  # noqa: E731 - random_start's formula
    out = {
        "fgsm_rs_x_adv": attacks.single_step(model_fn, x, y, EPS, 1.25 * EPS, start(1.0), True),
        "n_fgsm_x_adv": attacks.single_step(model_fn, x, y, EPS, EPS, start(2.0), False),
        "fgsm_x_adv": attacks.single_step(model_fn, x, y, EPS, EPS, x, True),
    }
    align = GradAlign(Defense("fgsm+gradalign"), "gradalign")
    elle = LocalLinearity(Defense("fgsm_rs+elle"), "elle")
    objectives = {
        "fgsm_rs": lambda: tf.reduce_mean(attacks.cross_entropy(model_fn(out["fgsm_rs_x_adv"]), y)),
        "n_fgsm": lambda: tf.reduce_mean(attacks.cross_entropy(model_fn(out["n_fgsm_x_adv"]), y)),
        "fgsm+gradalign": lambda: tf.reduce_mean(attacks.cross_entropy(model_fn(out["fgsm_x_adv"]), y))
        + tf.reduce_mean(align.penalty(model_fn, x, y, EPS, [tf.constant(inputs["u_align"])])[0]),
        "fgsm_rs+elle": lambda: tf.reduce_mean(attacks.cross_entropy(model_fn(out["fgsm_rs_x_adv"]), y))
        + tf.reduce_mean(elle.penalty(model_fn, x, y, EPS, [tf.constant(inputs[k]) for k in ("u_a", "u_b", "alpha")])[0]),
    }
    for name, objective in objectives.items():
        with tf.GradientTape() as tape:
            loss = objective()
        out[f"{name}_loss"] = loss
        for key, grad in zip(("w1", "b1", "w2", "b2"), tape.gradient(loss, variables)):
            out[f"{name}_grad_{key}"] = grad
    return {k: np.asarray(v.numpy() if hasattr(v, "numpy") else v, np.float32) for k, v in out.items()}


# -- PyTorch, after the authors' code ---------------------------------------------------------------


def torch_side(inputs: dict) -> dict:
    import torch
    import torch.nn.functional as F

    torch.set_default_dtype(torch.float32)
    t = {k: torch.tensor(v) for k, v in inputs.items()}
    params = [t[k].clone().requires_grad_(True) for k in ("w1", "b1", "w2", "b2")]
    w1, b1, w2, b2 = params

    def model(z):  # the same MLP: Keras kernels are (in, out)
        return F.relu(z.reshape(len(z), -1) @ w1 + b1) @ w2 + b2

    x, y, eps = t["x"], t["y"], EPS
    lower, upper = -x, 1 - x

    def input_grad(point_delta, create_graph):
        delta = point_delta.clone().requires_grad_(True)
        loss = F.cross_entropy(model(x + delta), y)
        return torch.autograd.grad(loss, delta, create_graph=create_graph)[0], delta

    # FGSM-RS (fast_adversarial): uniform delta, clamped to the box, one step of alpha, clamp to eps and box.
    delta = torch.max(torch.min(eps * t["u_start"], upper), lower)
    grad, _ = input_grad(delta, False)
    delta = torch.clamp(delta + 1.25 * eps * torch.sign(grad), -eps, eps)
    fgsm_rs = x + torch.max(torch.min(delta, upper), lower)
    # N-FGSM: eta of 2 eps clamped to the box, one step of eps, clamp to the box only.
    eta = torch.max(torch.min(2 * eps * t["u_start"], upper), lower)
    grad, _ = input_grad(eta, False)
    n_fgsm = x + torch.max(torch.min(eta + eps * torch.sign(grad), upper), lower)
    # FGSM from zero (GradAlign's base): step of 1.25 eps clamped to eps, then to the box.
    grad, _ = input_grad(torch.zeros_like(x), True)
    delta = torch.clamp(1.25 * eps * torch.sign(grad.detach()), -eps, eps)
    fgsm = x + torch.max(torch.min(delta, upper), lower)
    out = {"fgsm_rs_x_adv": fgsm_rs, "n_fgsm_x_adv": n_fgsm, "fgsm_x_adv": fgsm}

    def gradalign():
        g1, _ = input_grad(torch.zeros_like(x), False)
        g1 = g1.detach()
        g2, _ = input_grad(eps * t["u_align"], True)
        keep = ((g1 ** 2).sum([1, 2, 3]) ** 0.5 != 0) * ((g2 ** 2).sum([1, 2, 3]) ** 0.5 != 0)
        g1, g2 = g1[keep], g2[keep]
        n1, n2 = (g1 ** 2).sum([1, 2, 3]) ** 0.5, (g2 ** 2).sum([1, 2, 3]) ** 0.5
        cos = torch.sum(g1 / n1[:, None, None, None] * (g2 / n2[:, None, None, None]), (1, 2, 3))
        return GRADALIGN_WEIGHT * (1.0 - cos.mean())

    def elle():
        x_ab = torch.cat([x + eps * t["u_a"], x + eps * t["u_b"]])
        a = t["alpha"][:, None, None, None]
        x_c = (1 - a) * x_ab[:BATCH] + a * x_ab[BATCH:]
        losses = F.cross_entropy(model(torch.cat((x_ab, x_c))), y.repeat([3]), reduction="none")
        al = t["alpha"]
        return ELLE_WEIGHT * F.mse_loss(losses[2 * BATCH:], (1 - al) * losses[:BATCH] + al * losses[BATCH:2 * BATCH])

    objectives = {
        "fgsm_rs": lambda: F.cross_entropy(model(fgsm_rs.detach()), y),
        "n_fgsm": lambda: F.cross_entropy(model(n_fgsm.detach()), y),
        "fgsm+gradalign": lambda: F.cross_entropy(model(fgsm.detach()), y) + gradalign(),
        "fgsm_rs+elle": lambda: F.cross_entropy(model(fgsm_rs.detach()), y) + elle(),
    }
    for name, objective in objectives.items():
        loss = objective()
        out[f"{name}_loss"] = loss
        for key, grad in zip(("w1", "b1", "w2", "b2"), torch.autograd.grad(loss, params)):
            out[f"{name}_grad_{key}"] = grad
    return {k: v.detach().numpy().astype(np.float32) for k, v in out.items()}


# -- comparison -------------------------------------------------------------------------------------


def compare(ours: dict, reference: dict, atol: float, rtol: float) -> list:
    """``(name, max abs difference, max relative difference, ok)`` per quantity."""
    rows = []
    for name in sorted(reference):
        a, b = ours[name], reference[name]
        diff = np.abs(a - b)
        scale = np.maximum(np.abs(b), 1e-12)
        rows.append((name, float(diff.max()), float((diff / scale).max()), bool(np.all(diff <= atol + rtol * np.abs(b)))))
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--torch-python", default=sys.executable, help="the Python of an environment with PyTorch")
    p.add_argument("--torch-side", nargs=2, metavar=("IN", "OUT"), help=argparse.SUPPRESS)
    p.add_argument("--atol", type=float, default=1e-6)
    p.add_argument("--rtol", type=float, default=1e-4)
    args = p.parse_args(argv)
    if args.torch_side:
        with np.load(args.torch_side[0]) as f:
            np.savez(args.torch_side[1], **torch_side(dict(f)))
        return 0
    inputs = fixed_inputs()
    ours = tfrobust_side(inputs)
    with tempfile.TemporaryDirectory() as tmp:
        src, dst = os.path.join(tmp, "in.npz"), os.path.join(tmp, "out.npz")
        np.savez(src, **inputs)
        subprocess.run([args.torch_python, os.path.abspath(__file__), "--torch-side", src, dst], check=True)
        with np.load(dst) as f:
            reference = dict(f)
    rows = compare(ours, reference, args.atol, args.rtol)
    print("| quantity | max abs difference | max relative difference | within tolerance |")
    print("|---|---|---|---|")
    for name, absolute, relative, ok in rows:
        print(f"| {name} | {absolute:.2e} | {relative:.2e} | {'yes' if ok else 'NO'} |")
    return 0 if all(r[3] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
