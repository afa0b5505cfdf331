"""tfrobust's AutoAttack side by side with the reference PyTorch AutoAttack, on the same weights and examples.

The reference (fra31/auto-attack) is not a dependency of tfrobust and is not
shipped with it: bring its repository yourself (``git clone
https://github.com/fra31/auto-attack``) and make a separate virtual
environment with PyTorch (``python -m venv ref && ref/bin/pip install torch
numpy``). This script

1. trains tfrobust's ``small_cnn`` (Conv32-Pool-Conv64-Pool-Dense256-Dense10)
   on Fashion-MNIST for ``--epochs`` clean epochs (or loads ``--model``, a
   ``.keras`` file of that architecture);
2. converts its weights by hand to the same network in PyTorch (convolution
   kernels HWIO -> OIHW; the first dense layer's rows permuted from Keras'
   (h, w, c) flattening order to PyTorch's (c, h, w)) and checks that both
   give the same logits on the examples;
3. runs, for each ``--versions`` entry, the reference's
   ``AutoAttack(version=..., device="cpu", seed=0).run_standard_evaluation``
   in the PyTorch environment (a subprocess) and
   ``tfrobust.autoattack.run_autoattack(version=...)`` here, on the first
   ``--examples`` test images, timing only the attack loop (model building,
   data loading and, for tfrobust, one warm-up call that traces the
   compiled functions are not timed);
4. prints (and with ``--output`` writes into a Markdown file, between
   comment markers) examples per second, robust accuracy and the number of
   examples on which the two disagree.

With ``--arch NAME --model FILE.keras --state-dict FILE.pt`` the network is a published
architecture instead (one ``tfrobust import-model`` reads and ``tfrobust export-model`` writes):
the PyTorch side is ``scripts/write_zoo_fixtures.py``'s class of that name (with its fixed
normalisation) loading the state dict with ``strict=True``, and the examples are ``--data``'s
test images (a ``.npz``) or uniform random 32x32x3 images labelled with the network's own
predictions; the section written is a second one, for this round trip.

Both sides get ``--threads`` CPU threads (TensorFlow intra- and inter-op,
``torch.set_num_threads``).

Usage::

    python benchmarks/bench_autoattack_reference.py --reference ~/src/auto-attack \\
        --torch-python ref/bin/python --examples 64 --versions standard,rand --output docs/benchmarks.md
    python benchmarks/bench_autoattack_reference.py --reference ~/src/auto-attack --torch-python ref/bin/python \\
        --arch dm_wide_resnet-10-2 --model net.keras --state-dict net.pt --data d.npz --eps 0.0313725 ...
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402

# Runs in the PyTorch environment: the same network, the reference AutoAttack, timings and verdicts.
TORCH_RUNNER = r'''
import json, sys, time
import numpy as np
import torch
import torch.nn as nn

args = json.loads(sys.argv[1])
sys.path.insert(0, args["reference"])
from autoattack import AutoAttack

torch.set_num_threads(args["threads"])
data = np.load(args["data"])


class SmallCNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(1, 32, 3)
        self.c2 = nn.Conv2d(32, 64, 3)
        self.d1 = nn.Linear(1600, 256)
        self.d2 = nn.Linear(256, 10)

    def forward(self, x):
        x = torch.max_pool2d(torch.relu(self.c1(x)), 2)
        x = torch.max_pool2d(torch.relu(self.c2(x)), 2)
        x = torch.relu(self.d1(x.flatten(1)))
        return self.d2(x)


if args.get("arch"):  # a published architecture, from its exported state dict
    sys.path.insert(0, args["scripts"])
    from write_zoo_fixtures import torch_network

    model = torch_network(args["arch"])
    if args["state_dict"].endswith(".safetensors"):
        from safetensors.torch import load_file

        state = load_file(args["state_dict"])
    else:
        state = torch.load(args["state_dict"], weights_only=True)
    model.load_state_dict(state, strict=True)
else:
    w = np.load(args["weights"])
    model = SmallCNN()
    with torch.no_grad():
        for name in ("c1", "c2", "d1", "d2"):
            getattr(model, name).weight.copy_(torch.from_numpy(w[name + "_w"]))
            getattr(model, name).bias.copy_(torch.from_numpy(w[name + "_b"]))
model.eval()
x = torch.from_numpy(data["x"])  # NCHW
y = torch.from_numpy(data["y"]).long()
with torch.no_grad():
    logits = model(x).numpy()
out = {"logits": logits.tolist(), "runs": {}}
for version in args["versions"]:
    adversary = AutoAttack(model, norm="Linf", eps=args["eps"], version=version, device="cpu", seed=0,
                           verbose=True, log_path=args["log"])
    start = time.time()
    x_adv = adversary.run_standard_evaluation(x, y, bs=args["batch_size"])
    seconds = time.time() - start
    with torch.no_grad():
        robust = (model(x_adv).argmax(1) == y).numpy()
    out["runs"][version] = {"seconds": seconds, "robust": robust.tolist()}
print("RESULT " + json.dumps(out))
'''


def small_cnn(model_path, epochs, seed):
    import keras

    from tfrobust.data import load_arrays
    from tfrobust.models import build_model

    if model_path:
        return keras.saving.load_model(model_path)
    model = build_model("small_cnn", (28, 28, 1), 10, seed=seed)
    x, y = load_arrays("fashion_mnist", "train", limit=20000)
    model.compile(optimizer=keras.optimizers.Adam(1e-3),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    model.fit(x.astype("float32") / 255.0, y, epochs=epochs, batch_size=128, verbose=0)
    return model


def published_network(args):
    """The ``--model`` network of ``--arch`` and the images to attack: ``--data``'s test images, or uniform
    random images labelled with the network's own predictions (every one of them clean-correct)."""
    import keras

    from tfrobust.data import load_test_arrays

    model = keras.saving.load_model(args.model)
    if args.data:
        return (model,) + tuple(load_test_arrays(args.data, None, args.examples))
    x = np.random.default_rng(args.seed).uniform(0.0, 1.0, (args.examples, 32, 32, 3)).astype(np.float32)
    return model, x, model.predict(x, verbose=0).argmax(1).astype(np.int64)


def _fold_normalization(model, kernel, bias):
    """Folds a per-channel ``(x - m) / s`` layer in front of the first (valid-padded) convolution into it.

    ``m`` and ``s`` are read off the layer's outputs at 0 and 1, so any Keras
    normalisation layer works: ``conv((x - m) / s) = conv'(x)`` with
    ``w' = w / s`` and ``b' = b - sum(w' * m)``.
    """
    from tfrobust.models import NORMALIZATION_LAYER

    names = [layer.name for layer in model.layers]
    if NORMALIZATION_LAYER not in names:
        return kernel, bias
    layer = model.get_layer(NORMALIZATION_LAYER)
    channels = kernel.shape[2]
    at0 = np.asarray(layer(np.zeros((1, 1, 1, channels), "float32"))).reshape(-1).astype(np.float64)
    at1 = np.asarray(layer(np.ones((1, 1, 1, channels), "float32"))).reshape(-1).astype(np.float64)
    s = 1.0 / (at1 - at0)
    m = -at0 * s
    folded = kernel.astype(np.float64) / s.reshape(1, 1, -1, 1)
    bias = bias.astype(np.float64) - np.einsum("hwco,c->o", folded, m)
    return folded.astype(np.float32), bias.astype(np.float32)


def torch_weights(model) -> dict:
    """The small CNN's weights in PyTorch layout."""
    import keras

    convs = [layer for layer in model.layers if isinstance(layer, keras.layers.Conv2D)]
    denses = [layer for layer in model.layers if isinstance(layer, keras.layers.Dense)]
    if len(convs) != 2 or len(denses) != 2:
        raise SystemExit("the model must be tfrobust's small_cnn (2 convolutions, 2 dense layers)")
    out = {}
    for name, layer in zip(("c1", "c2"), convs):
        kernel, bias = layer.get_weights()
        if name == "c1":
            kernel, bias = _fold_normalization(model, kernel, bias)
        out[name + "_w"] = np.transpose(kernel, (3, 2, 0, 1)).copy()  # HWIO -> OIHW
        out[name + "_b"] = bias
    kernel, bias = denses[0].get_weights()  # rows in Keras' (h, w, c) order, 5 x 5 x 64
    out["d1_w"] = kernel.reshape(5, 5, 64, -1).transpose(2, 0, 1, 3).reshape(1600, -1).T.copy()
    out["d1_b"] = bias
    kernel, bias = denses[1].get_weights()
    out["d2_w"] = kernel.T.copy()
    out["d2_b"] = bias
    return out


def _subject(args, clean, logits_gap) -> tuple:
    """The section's marker, title and the command and network it describes."""
    command = (f"`python benchmarks/bench_autoattack_reference.py --reference <auto-attack checkout> --torch-python "
               f"<torch venv>/bin/python --examples {args.examples} --versions {args.versions} --eps {args.eps:g} "
               f"--batch-size {args.batch_size} --threads {args.threads}")
    reference = f"(reference: fra31/auto-attack a392200, PyTorch {args.torch_version}, CPU)"
    if not args.arch:
        return ("bench_autoattack_reference", "tfrobust and the reference AutoAttack, side by side",
                f"{command} --epochs {args.epochs}` {reference}. small_cnn trained {args.epochs} clean epoch(s) on "
                f"20,000 Fashion-MNIST training images; first {args.examples} test images; clean accuracy {clean:.2%}; "
                f"largest logit difference between the two frameworks {logits_gap:.1e}.")
    images = (f"the first {args.examples} test images of {os.path.basename(args.data)}" if args.data else
              f"{args.examples} uniform random images labelled with the network's own predictions")
    return ("bench_autoattack_reference_zoo", "The same on an exported published architecture",
            f"{command} --arch {args.arch} --model {os.path.basename(args.model)} --state-dict "
            f"{os.path.basename(args.state_dict)}{' --data ' + os.path.basename(args.data) if args.data else ''}` "
            f"{reference}. The PyTorch side is scripts/write_zoo_fixtures.py's {args.arch} with the state dict loaded "
            f"strictly; {images}; clean accuracy {clean:.2%}; largest logit difference between the two frameworks "
            f"{logits_gap:.1e}.")


def section(rows, args, clean, logits_gap, cores_note) -> str:
    marker, title, subject = _subject(args, clean, logits_gap)
    lines = [
        f"<!-- {marker}: begin -->",
        f"### {title}",
        "",
        f"Command: {subject} {cores_note}",
        "",
        "| version | examples | tfrobust s | reference s | tfrobust ex/s | reference ex/s | speed-up | "
        "robust acc. tfrobust | robust acc. reference | verdicts that differ |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['version']} | {r['n']} | {r['tf_s']:.1f} | {r['ref_s']:.1f} | {r['n'] / r['tf_s']:.2f} | "
            f"{r['n'] / r['ref_s']:.2f} | {r['ref_s'] / r['tf_s']:.2f}x | {r['tf_acc']:.2%} | {r['ref_acc']:.2%} | "
            f"{r['differ']} |")
    lines.append(f"<!-- {marker}: end -->")
    return "\n".join(lines)


def write_section(path, text):
    marker = text.split(":")[0][len("<!-- "):]  # the section's own markers, as section() wrote them
    begin, end = f"<!-- {marker}: begin -->", f"<!-- {marker}: end -->"
    old = open(path).read() if os.path.exists(path) else ""
    if begin in old and end in old:
        new = old[:old.index(begin)] + text + old[old.index(end) + len(end):]
    else:
        new = old.rstrip("\n") + "\n\n" + text + "\n"
    with open(path, "w") as f:
        f.write(new)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--reference", required=True, help="a checkout of fra31/auto-attack (the folder holding autoattack/)")
    p.add_argument("--torch-python", required=True, help="python of an environment with torch and numpy")
    p.add_argument("--model", help=".keras file of a small_cnn (default: train one), or with --arch of that "
                   "published architecture (e.g. from tfrobust import-model)")
    p.add_argument("--arch", help="the --model is this published architecture (tfrobust import-model's --arch, one "
                   "scripts/write_zoo_fixtures.py builds in PyTorch); needs --state-dict")
    p.add_argument("--state-dict", help="with --arch: the network's state dict (.pt or .safetensors, e.g. from "
                   "tfrobust export-model), loaded into the PyTorch class with strict=True")
    p.add_argument("--data", help="with --arch: a .npz whose first --examples test images are attacked (default: "
                   "uniform random 32x32x3 images labelled with the network's own predictions)")
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--examples", type=int, default=64)
    p.add_argument("--versions", default="standard,rand")
    p.add_argument("--eps", type=float, default=0.1)
    p.add_argument("--batch-size", type=int, default=250)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output", help="Markdown file to write the results into")
    p.add_argument("--workdir", help="keep the exchanged files and the reference's log here (default: a temporary "
                   "directory)")
    args = p.parse_args(argv)
    if bool(args.arch) != bool(args.state_dict) or (args.arch and not args.model):
        p.error("--arch, --state-dict and --model go together")

    import tensorflow as tf

    tf.config.threading.set_intra_op_parallelism_threads(args.threads)
    tf.config.threading.set_inter_op_parallelism_threads(args.threads)
    from tfrobust import autoattack as aa
    from tfrobust.data import load_test_arrays

    versions = [v.strip() for v in args.versions.split(",") if v.strip()]
    if args.arch:
        model, x, y = published_network(args)
    else:
        model = small_cnn(args.model, args.epochs, args.seed)
        x, y = load_test_arrays("fashion_mnist", None, args.examples)
    logits = model.predict(x, verbose=0)
    clean = float(np.mean(logits.argmax(1) == y))
    with tempfile.TemporaryDirectory() as tmp:
        if args.workdir:
            tmp = args.workdir
            os.makedirs(tmp, exist_ok=True)
        if not args.arch:
            np.savez(os.path.join(tmp, "w.npz"), **torch_weights(model))
        np.savez(os.path.join(tmp, "d.npz"), x=np.transpose(x, (0, 3, 1, 2)).copy(), y=y.astype(np.int64))
        runner = os.path.join(tmp, "runner.py")
        with open(runner, "w") as f:
            f.write(TORCH_RUNNER)
        spec = {"reference": os.path.abspath(args.reference), "weights": os.path.join(tmp, "w.npz"),
                "data": os.path.join(tmp, "d.npz"), "versions": versions, "eps": args.eps,
                "batch_size": args.batch_size, "threads": args.threads, "log": os.path.join(tmp, "reference.log"),
                "arch": args.arch, "state_dict": args.state_dict and os.path.abspath(args.state_dict),
                "scripts": os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "scripts")}
        print(f"reference AutoAttack ({', '.join(versions)}) on {args.examples} examples ...", flush=True)
        proc = subprocess.run([args.torch_python, runner, json.dumps(spec)], capture_output=True, text=True,
                              cwd=tmp)
        if proc.returncode != 0:
            raise SystemExit(f"the reference run failed:\n{proc.stderr[-3000:]}")
        ref = json.loads(next(line for line in proc.stdout.splitlines() if line.startswith("RESULT "))[7:])
        args.torch_version = subprocess.run([args.torch_python, "-c", "import torch; print(torch.__version__)"],
                                            capture_output=True, text=True).stdout.strip()
    gap = float(np.abs(np.asarray(ref["logits"]) - logits).max())
    print(f"clean accuracy {clean:.2%}; largest logit difference PyTorch vs TensorFlow {gap:.1e}")
    if gap > 1e-3:
        raise SystemExit(f"the PyTorch copy does not reproduce the network's logits (largest difference {gap:.1e}); "
                         "the converter knows tfrobust's small_cnn (with or without its normalisation layer) only, "
                         "and with --arch the PyTorch class normalises as scripts/write_zoo_fixtures.py's does")
    rows = []
    cpu_start, wall_start = time.process_time(), time.time()
    for version in versions:
        aa.run_autoattack(model, x[:2], y[:2], args.eps, version=version, seed=0, verbose=False)  # traces
        start = time.time()
        res = aa.run_autoattack(model, x, y, args.eps, version=version, batch_size=args.batch_size, seed=0,
                                verbose=False)
        seconds = time.time() - start
        ref_robust = np.asarray(ref["runs"][version]["robust"], bool)
        rows.append({"version": version, "n": len(x), "tf_s": seconds, "ref_s": ref["runs"][version]["seconds"],
                     "tf_acc": float(res["robust_mask"].mean()), "ref_acc": float(ref_robust.mean()),
                     "differ": int(np.sum(res["robust_mask"] != ref_robust))})
        r = rows[-1]
        print(f"{version}: tfrobust {r['tf_s']:.1f} s ({r['n'] / r['tf_s']:.2f} ex/s, robust {r['tf_acc']:.2%}), "
              f"reference {r['ref_s']:.1f} s ({r['n'] / r['ref_s']:.2f} ex/s, robust {r['ref_acc']:.2%}), "
              f"{r['differ']} verdicts differ", flush=True)
    used = (time.process_time() - cpu_start) / max(time.time() - wall_start, 1e-9)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    note = (f"While tfrobust was timed its process used {used:.2f} CPU cores on average; 1-minute load average "
            f"at the end {load:.1f} on {os.cpu_count()} cores.")
    text = section(rows, args, clean, gap, note)
    print(text)
    if args.output:
        write_section(args.output, text)


if __name__ == "__main__":
    main()
