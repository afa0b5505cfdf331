"""The PyTorch side of ``benchmarks/compare_pytorch.py``: a long-lived worker in PyTorch's own environment.

Run by ``compare_pytorch.py`` with the PyTorch interpreter (``--torch-python``);
never imported by tfrobust. It reads one JSON command per line on stdin and
answers one line starting with ``@@`` on stdout:

* ``{"cmd": "setup", ...case...}`` builds the network and the step of a case
  (model, defense, dtype, batch size, attack settings), runs the warm-up steps;
* ``{"cmd": "run"}`` times ``steps`` training steps: wall and process CPU time;
* ``{"cmd": "profile"}`` runs one step under ``torch.profiler`` and returns the
  self CPU time per operator, and the time of the step's phases;
* ``{"cmd": "quit"}``.

The step follows the authors' scripts as users run them: the attack with the
network in eval mode, the update in train mode; PGD from a uniform start on
cross-entropy (AT), TRADES' attack on the summed KL divergence from
``x + 0.001 N(0, 1)`` that evaluates the clean batch at every iteration as its
reference does, TRADES' loss ``CE + beta KL`` (batch mean); AWP through a proxy
copy of the network loaded from the model's state, one SGD step (lr 0.01) on the
negated base loss in train mode, the layer-wise normalised difference of the
weight matrices added with ``gamma`` before the update and subtracted after it.
bfloat16: the forward passes run under ``torch.autocast("cpu", torch.bfloat16)``.
"""

import contextlib
import copy
import importlib.util
import json
import os
import sys
import time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

HERE = os.path.dirname(os.path.abspath(__file__))
FASHION_MEAN, FASHION_STD = (0.2860,), (0.3530,)


def reference_networks():
    """The reference network classes of scripts/write_zoo_fixtures.py."""
    path = os.path.join(os.path.dirname(HERE), "scripts", "write_zoo_fixtures.py")
    spec = importlib.util.spec_from_file_location("write_zoo_fixtures", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module._torch_networks()


class SmallCNN(nn.Module):
    """tfrobust's small_cnn: Conv32-Pool-Conv64-Pool-Dense256-Dense, normalisation first."""

    def __init__(self, mean, std, classes=10):
        super().__init__()
        self.c1, self.c2 = nn.Conv2d(1, 32, 3), nn.Conv2d(32, 64, 3)
        self.d1, self.d2 = nn.Linear(1600, 256), nn.Linear(256, classes)
        self.register_buffer("mean", torch.tensor(mean).view(-1, 1, 1))
        self.register_buffer("std", torch.tensor(std).view(-1, 1, 1))

    def forward(self, x):
        x = F.max_pool2d(F.relu(self.c1((x - self.mean) / self.std)), 2)
        x = F.max_pool2d(F.relu(self.c2(x)), 2)
        return self.d2(F.relu(self.d1(x.flatten(1))))


def build_network(model):
    if model == "small_cnn":
        return SmallCNN(FASHION_MEAN, FASHION_STD)
    name = {"preact_resnet18": "preact_resnet-18", "wide_resnet_swish_28_10": "dm_wide_resnet-28-10"}[model]
    return reference_networks()[name]()


class Step:
    """One training step of a case, as the reference scripts run it."""

    def __init__(self, case):
        self.case = case
        torch.manual_seed(case["seed"])
        self.net = build_network(case["model"])
        self.opt = torch.optim.SGD(self.net.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
        self.awp = "+awp" in case["defense"]
        self.trades = case["defense"].startswith("trades")
        self.gamma = 0.005 if self.trades else 0.01
        if self.awp:
            self.proxy = copy.deepcopy(self.net)
            self.proxy_opt = torch.optim.SGD(self.proxy.parameters(), lr=0.01)
        self.bf16 = case["dtype"] == "bfloat16"
        data = np.load(case["data"])
        self.batches = [(torch.from_numpy(np.ascontiguousarray(data["x"][i].transpose(0, 3, 1, 2))),
                         torch.from_numpy(data["y"][i].astype(np.int64))) for i in range(len(data["x"]))]
        self.i = 0
        self.times = {}

    def autocast(self):
        return torch.autocast("cpu", dtype=torch.bfloat16) if self.bf16 else contextlib.nullcontext()

    @contextlib.contextmanager
    def phase(self, name):
        start = time.perf_counter()
        yield
        self.times[name] = self.times.get(name, 0.0) + time.perf_counter() - start

    def attack(self, x, y):
        eps, step, k = self.case["eps"], self.case["step_size"], self.case["attack_steps"]
        self.net.eval()
        if self.trades:
            x_adv = x + 0.001 * torch.randn_like(x)
        else:
            x_adv = torch.clamp(x + torch.empty_like(x).uniform_(-eps, eps), 0.0, 1.0)
        for _ in range(k):
            x_adv.requires_grad_()
            with torch.enable_grad(), self.autocast():
                if self.trades:
                    loss = F.kl_div(F.log_softmax(self.net(x_adv).float(), dim=1),
                                    F.softmax(self.net(x).float(), dim=1), reduction="sum")
                else:
                    loss = F.cross_entropy(self.net(x_adv).float(), y)
            grad = torch.autograd.grad(loss, [x_adv])[0]
            x_adv = x_adv.detach() + step * torch.sign(grad.detach())
            x_adv = torch.clamp(torch.min(torch.max(x_adv, x - eps), x + eps), 0.0, 1.0)
        self.net.train()
        return x_adv.detach()

    def base_loss(self, net, x, x_adv, y):
        with self.autocast():
            if not self.trades:
                return F.cross_entropy(net(x_adv).float(), y)
            logits = net(x).float()
            robust = F.kl_div(F.log_softmax(net(x_adv).float(), dim=1), F.softmax(logits, dim=1), reduction="batchmean")
            return F.cross_entropy(logits, y) + 6.0 * robust

    def awp_diff(self, x, x_adv, y):
        self.proxy.load_state_dict(self.net.state_dict())
        self.proxy.train()
        with self.autocast():
            if self.trades:  # the reference evaluates the clean batch twice here
                natural = F.cross_entropy(self.proxy(x).float(), y)
                robust = F.kl_div(F.log_softmax(self.proxy(x_adv).float(), dim=1),
                                  F.softmax(self.proxy(x).float(), dim=1), reduction="batchmean")
                loss = -(natural + 6.0 * robust)
            else:
                loss = -F.cross_entropy(self.proxy(x_adv).float(), y)
        self.proxy_opt.zero_grad()
        loss.backward()
        self.proxy_opt.step()
        diff = {}
        new = self.proxy.state_dict()
        for name, old in self.net.state_dict().items():
            if old.dim() > 1 and "weight" in name:
                d = new[name] - old
                diff[name] = old.norm() / (d.norm() + 1e-20) * d
        return diff

    def add(self, diff, coeff):
        with torch.no_grad():
            for name, param in self.net.named_parameters():
                if name in diff:
                    param.add_(coeff * diff[name])

    def __call__(self):
        x, y = self.batches[self.i % len(self.batches)]
        self.i += 1
        with self.phase("attack"):
            x_adv = self.attack(x, y)
        diff = None
        if self.awp:
            with self.phase("awp_proxy"):
                diff = self.awp_diff(x, x_adv, y)
                self.add(diff, self.gamma)
        with self.phase("forward"):
            loss = self.base_loss(self.net, x, x_adv, y)
        with self.phase("backward"):
            self.opt.zero_grad()
            loss.backward()
        with self.phase("optimizer"):
            self.opt.step()
            if diff is not None:
                self.add(diff, -self.gamma)
        return float(loss.detach())


def profile(step):
    """Self CPU time per operator (ms) over one step, and the phases' wall times of that step."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    step.times = {}
    with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
        step()
    ops = {e.key: e.self_cpu_time_total / 1000.0 for e in prof.key_averages()}
    return {"ops": ops, "phases": {k: 1000.0 * v for k, v in step.times.items()}}


def reply(obj):
    sys.stdout.write("@@ " + json.dumps(obj) + "\n")
    sys.stdout.flush()


def main():
    step = None
    for line in sys.stdin:
        cmd = json.loads(line)
        if cmd["cmd"] == "setup":
            torch.set_num_threads(cmd["threads"])
            with contextlib.suppress(RuntimeError):  # allowed once per process, before any parallel work
                torch.set_num_interop_threads(cmd["threads"])
            step = Step(cmd)
            for _ in range(cmd["warmup_steps"]):
                step()
            reply({"ok": True, "version": torch.__version__, "threads": torch.get_num_threads(),
                   "config": torch.__config__.parallel_info().splitlines()[:6]})
        elif cmd["cmd"] == "run":
            step.times = {}
            c0, t0 = time.process_time(), time.perf_counter()
            for _ in range(cmd["steps"]):
                loss = step()
            reply({"wall": time.perf_counter() - t0, "cpu": time.process_time() - c0, "loss": loss,
                   "phases": step.times})
        elif cmd["cmd"] == "profile":
            reply(profile(step))
        else:
            reply({"ok": True})
            return


if __name__ == "__main__":
    main()
