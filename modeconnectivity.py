"""Mode connectivity in neural-network loss landscapes, in one readable file.

Garipov et al. (2018): two networks trained from different seeds, w1 and w2, are joined by a curve
phi(t) of low loss, while the straight line between them crosses a ridge. This file trains both, a
Bezier curve (or polygonal chain) between them, walks along curve and line, ensembles along the curve
and draws the loss in the plane of w1, w2 and the bend theta. Its section banners match tutorial.md.

    python modeconnectivity.py --dataset synthetic --quick     # offline first look, about 20 s here
    python modeconnectivity.py --dataset cifar10               # downloads CIFAR-10 into --data-dir
    python modeconnectivity.py --dataset folder --data-dir data/cifar10-jpeg   # any ImageFolder copy

A run writes results.json, three PNG figures and the checkpoints --resume reuses to --out.
Measured with torch 2.14.1 on 2 CPU cores (README.md): the CIFAR-10 (JPEG copy) run took 30 min, with
endpoints at 83.6 / 84.1 % test accuracy and a test-error barrier of 71.6 points (line) vs 2.7 (curve).
"""
import argparse
import hashlib
import json
import math
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.func import functional_call
from torch.utils.flop_counter import FlopCounterMode

# ┌──────────────────────────────────────────────────────────────────────────────────────────────┐
# │ 1. Data                                                                                      │
# └──────────────────────────────────────────────────────────────────────────────────────────────┘
DATASETS = ("cifar10", "mnist", "fashionmnist", "folder", "synthetic")


def write_atomic(path, write):
    """write(tmp) to a temporary file, then rename it to path: an interrupted run never leaves half a file."""
    tmp = Path(f"{path}.tmp{os.getpid()}")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


class Data(NamedTuple):
    train_x: torch.Tensor  # (N, C, H, W) float32, normalised per channel, on the device
    train_y: torch.Tensor  # (N,) int64 class indices
    test_x: torch.Tensor
    test_y: torch.Tensor
    classes: list


def augment(x, pad, gen):
    """Random crop (zero padding of `pad` pixels) and horizontal flip of a batch (B, C, H, W), in one gather."""
    B, C, H, W = x.shape
    padded = F.pad(x, (pad, pad, pad, pad)).permute(0, 2, 3, 1)  # (B, H+2p, W+2p, C): gather whole pixels
    dy, dx = torch.randint(0, 2 * pad + 1, (2, B, 1), generator=gen, device=x.device)
    rows = dy + torch.arange(H, device=x.device)  # (B, H) rows of the padded image to keep
    cols = dx + torch.arange(W, device=x.device)  # (B, W)
    flip = torch.rand(B, 1, generator=gen, device=x.device) < 0.5
    cols = torch.where(flip, cols.flip(1), cols)  # reading columns backwards mirrors the image
    b = torch.arange(B, device=x.device)[:, None, None]
    return padded[b, rows[:, :, None], cols[:, None, :]].permute(0, 3, 1, 2)  # (B, C, H, W), channels_last


def make_synthetic(n_train, n_test, size=32, channels=3, num_classes=10, seed=0):
    """Class-structured uint8 images: each class owns 4 smooth random prototypes; an image is one of them,
    shifted, mirrored, with random contrast and noise. Deterministic given the seed."""
    gen = torch.Generator().manual_seed(seed)
    coarse = torch.randn(num_classes * 4, channels, 4, 4, generator=gen)
    protos = F.interpolate(coarse, size=(size, size), mode="bicubic", align_corners=False)

    def sample(n):
        y = torch.randint(num_classes, (n,), generator=gen)
        x = protos[y * 4 + torch.randint(4, (n,), generator=gen)]
        x = augment(x, max(1, size // 8), gen) * (0.5 + torch.rand(n, 1, 1, 1, generator=gen))
        x = x + 0.8 * torch.randn(x.shape, generator=gen)
        return (x * 40 + 128).clamp(0, 255).to(torch.uint8), y

    return (*sample(n_train), *sample(n_test), [f"class{k}" for k in range(num_classes)])


def read_folder(root):
    """Decode an ImageFolder layout root/{train,test}/<class>/<image> into uint8 tensors."""
    import numpy as np
    from PIL import Image  # Pillow comes with torchvision

    root, out = Path(root), []
    for half in ("train", "test"):
        if not (root / half).is_dir():
            raise ValueError(f"--data-dir {root}: no {half}/ folder; expected {root}/{half}/<class>/<image>")
    classes, test_classes = (sorted(p.name for p in (root / h).iterdir() if p.is_dir()) for h in ("train", "test"))
    if classes != test_classes:
        raise ValueError(f"--data-dir {root}: train/ has classes {classes} but test/ has {test_classes}")
    for half in ("train", "test"):
        files = [(f, k) for k, name in enumerate(classes) for f in sorted((root / half / name).iterdir())]
        try:
            images = [torch.from_numpy(np.array(Image.open(f).convert("RGB"))).permute(2, 0, 1) for f, _ in files]
        except OSError as err:
            raise ValueError(f"--data-dir {root}: a file in {half}/ is not a readable image ({err})") from None
        if not images or len({img.shape for img in images}) > 1 or images[0].shape[1] != images[0].shape[2]:
            raise ValueError(f"--data-dir {root}: {half}/ holds no images, or not square images of one size")
        order = torch.randperm(len(files), generator=torch.Generator().manual_seed(0))  # mix the classes, so
        out += [torch.stack(images)[order], torch.tensor([k for _, k in files])[order]]  # first-N subsets hold all
    return (*out, classes)


def read_torchvision(name, data_dir):
    """Download (if needed) and decode a torchvision data set into uint8 tensors (N, C, H, W)."""
    import torchvision.datasets as tvd
    cls = {"cifar10": tvd.CIFAR10, "mnist": tvd.MNIST, "fashionmnist": tvd.FashionMNIST}[name]
    try:
        train, test = (cls(str(data_dir), train=flag, download=True) for flag in (True, False))
    except Exception as err:  # no network, a proxy, a broken file: all end here with one clear line
        raise ValueError(f"--dataset {name}: could not find or download it under --data-dir {data_dir} ({err}); "
                         f"put the files there or try --dataset synthetic") from None
    nchw = lambda x: (x.permute(0, 3, 1, 2) if x.dim() == 4 else x[:, None]).contiguous()  # from NHWC or NHW
    return (*[t for ds in (train, test) for t in (nchw(torch.as_tensor(ds.data)), torch.as_tensor(ds.targets))],
            list(train.classes))


def load_data(name, data_dir, device, train_size=None, test_size=None, seed=0, image_size=32):
    """Decode a data set once (cached as uint8 in data_dir), normalise it once, keep it on `device`.
    train_size/test_size keep the first images (synthetic: how many to generate, default 10000/2000)."""
    if name not in DATASETS:
        raise ValueError(f"--dataset {name}: unknown; choose from {', '.join(DATASETS)}")
    if name == "synthetic":
        tx, ty, vx, vy, classes = make_synthetic(train_size or 10000, test_size or 2000, image_size, seed=seed)
    else:
        data_dir = Path(data_dir)
        if data_dir.exists() and not data_dir.is_dir():
            raise ValueError(f"--data-dir {data_dir}: is a file, not a folder")
        # A folder's cache is named after its file listing: added or removed images make a new one.
        listing = sorted(str(p.relative_to(data_dir)) for p in data_dir.glob("t*/*/*")) if name == "folder" else []
        cache = data_dir / f"{name}-v2-{hashlib.sha1(str(listing).encode()).hexdigest()[:10]}-uint8.pt"
        try:
            tx, ty, vx, vy, classes = torch.load(cache, weights_only=True)
        except Exception:  # no cache yet, or a damaged one: decode again
            tx, ty, vx, vy, classes = read_folder(data_dir) if name == "folder" else read_torchvision(name, data_dir)
            write_atomic(cache, lambda tmp: torch.save((tx, ty, vx, vy, classes), tmp))
    tx, ty, vx, vy = tx[:train_size], ty[:train_size], vx[:test_size], vy[:test_size]
    if len(tx) == 0 or len(vx) == 0:
        raise ValueError(f"--dataset {name}: empty data set ({len(tx)} training, {len(vx)} test images)")
    mean = tx.float().mean((0, 2, 3), keepdim=True).to(device)  # per-channel statistics of the training images
    std = tx.float().std((0, 2, 3), keepdim=True).clamp_min(1e-3).to(device)
    # channels_last (N, H, W, C in memory): the layout the CPU convolutions ran fastest with (README)
    prepare = lambda x: ((x.to(device).float() - mean) / std).contiguous(memory_format=torch.channels_last)
    return Data(prepare(tx), ty.to(device), prepare(vx), vy.to(device), list(classes))


# ┌──────────────────────────────────────────────────────────────────────────────────────────────┐
# │ 2. Model                                                                                     │
# └──────────────────────────────────────────────────────────────────────────────────────────────┘
class ConvNet(nn.Module):
    """Three 3x3 conv layers (ReLU, 2x2 max-pool) with width, 2*width, 4*width channels, then two
    linear layers with dropout. No BatchNorm, so any weight dict can be evaluated as it is."""

    def __init__(self, in_channels=3, num_classes=10, image_size=32, width=32, dropout=0.2):
        super().__init__()
        if image_size < 8:
            raise ValueError(f"image size {image_size}: ConvNet pools three times and needs at least 8 pixels")
        self.conv1 = nn.Conv2d(in_channels, width, 3, padding=1)
        self.conv2 = nn.Conv2d(width, 2 * width, 3, padding=1)
        self.conv3 = nn.Conv2d(2 * width, 4 * width, 3, padding=1)
        side = image_size // 8  # three 2x2 max-pools
        self.fc1 = nn.Linear(4 * width * side * side, 8 * width)
        self.fc2 = nn.Linear(8 * width, num_classes)
        self.dropout = dropout

    def forward(self, x):  # x: (B, C, H, W)
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)  # (B, width, H/2, W/2)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)  # (B, 2*width, H/4, W/4)
        x = F.max_pool2d(F.relu(self.conv3(x)), 2)  # (B, 4*width, H/8, W/8)
        x = F.dropout(x.flatten(1), self.dropout, self.training)
        x = F.dropout(F.relu(self.fc1(x)), self.dropout, self.training)
        return self.fc2(x)  # (B, num_classes) logits


# ┌──────────────────────────────────────────────────────────────────────────────────────────────┐
# │ 3. Training the endpoints                                                                    │
# └──────────────────────────────────────────────────────────────────────────────────────────────┘
def one_cycle_lr(step, total_steps, peak_lr, warmup=0.2):
    """One-cycle schedule: linear from 0 to peak_lr over the first `warmup` of the steps, then down to 0."""
    frac = (step + 1) / max(1, total_steps)
    return peak_lr * (frac / warmup if frac < warmup else (1 - frac) / (1 - warmup))


def sgd_epochs(params, forward, x, y, epochs, batch_size, lr, weight_decay, augment_pad, seed, log, name):
    """SGD (momentum 0.9, one-cycle lr) on params of the objective CE(logits, y) + penalty, where
    forward(x_batch) -> (logits, penalty). Returns one dict per epoch (loss, acc, images/s, ...)."""
    gen = torch.Generator(device=x.device).manual_seed(seed)
    opt = torch.optim.SGD(params, lr=lr, momentum=0.9, nesterov=True, weight_decay=weight_decay)
    steps = max(1, len(x) // batch_size)  # the last partial batch is dropped, as in most recipes
    history, start = [], time.perf_counter()
    for epoch in range(epochs):
        t0, data_s, loss_sum, correct = time.perf_counter(), 0.0, 0.0, 0
        perm = torch.randperm(len(x), generator=gen, device=x.device)
        for i in range(steps):
            d0, idx = time.perf_counter(), perm[i * batch_size:(i + 1) * batch_size]
            xb, yb = x[idx], y[idx]
            if augment_pad:
                xb = augment(xb, augment_pad, gen)
            data_s += time.perf_counter() - d0
            for group in opt.param_groups:
                group["lr"] = one_cycle_lr(epoch * steps + i, epochs * steps, lr)
            logits, penalty = forward(xb)
            loss = F.cross_entropy(logits, yb)
            if not math.isfinite(loss.item()):  # stop before a NaN reaches the weights or a checkpoint
                raise ValueError(f"{name}: loss {loss.item()} at epoch {epoch + 1}, step {i + 1}: training diverged "
                                 f"with --lr {lr}; try a smaller --lr")
            opt.zero_grad(set_to_none=True)
            (loss + penalty).backward()
            opt.step()
            loss_sum += loss.item() * len(yb)
            correct += (logits.argmax(1) == yb).sum().item()
        seconds, seen = time.perf_counter() - t0, steps * min(batch_size, len(x))
        history.append({"epoch": epoch + 1, "loss": loss_sum / seen, "acc": correct / seen, "seconds": seconds,
                        "images_per_s": seen / seconds, "data_fraction": data_s / seconds})
        left = (time.perf_counter() - start) / (epoch + 1) * (epochs - epoch - 1)
        log(f"{name} epoch {epoch + 1}/{epochs}: train loss {loss_sum / seen:.4f}, acc {correct / seen:.4f}, "
            f"{seen / seconds:.0f} images/s, {left:.0f} s left")
    return history


def train_endpoint(model, x, y, epochs, batch_size, lr, weight_decay, augment_pad, seed, log=print):
    """Train one endpoint w: minimise CE + wd/2 ||w||^2 (the decay is applied by SGD). Returns the history."""
    model.train()
    return sgd_epochs(list(model.parameters()), lambda xb: (model(xb), 0.0), x, y, epochs, batch_size, lr,
                      weight_decay, augment_pad, seed, log, f"endpoint seed {seed}")


# ┌──────────────────────────────────────────────────────────────────────────────────────────────┐
# │ 4. Curves                                                                                    │
# └──────────────────────────────────────────────────────────────────────────────────────────────┘
def check_curve_args(t, n):
    """ValueError unless 0 <= t <= 1 and n >= 2."""
    if not 0.0 <= t <= 1.0:
        raise ValueError(f"t = {t}: must lie in [0, 1]")
    if n < 2:
        raise ValueError(f"n = {n} control points: a curve needs at least 2")


def bezier_coeffs(t, n):
    """Bezier weights of n control points: c_k(t) = C(n-1, k) t^k (1-t)^(n-1-k)."""
    check_curve_args(t, n)
    return [math.comb(n - 1, k) * t ** k * (1 - t) ** (n - 1 - k) for k in range(n)]


def polychain_coeffs(t, n):
    """Polygonal-chain weights of n control points: c_k(t) = max(0, 1 - |t (n-1) - k|)."""
    check_curve_args(t, n)
    return [max(0.0, 1.0 - abs(t * (n - 1) - k)) for k in range(n)]


def curve_point(points, coeffs):
    """phi = sum_k c_k P_k, tensor by tensor, for control points P_k given as dicts name -> tensor."""
    if len(points) < 2 or len(points) != len(coeffs):
        raise ValueError(f"{len(points)} control points and {len(coeffs)} coefficients: need at least 2, as many of each")
    for p in points[1:]:
        if p.keys() != points[0].keys() or any(p[k].shape != v.shape for k, v in points[0].items()):
            raise ValueError("control points differ in their tensor names or shapes; they must describe one network")
    # empty_like(...).copy_ keeps the first point's memory layout: a sum of 1-channel conv weights would
    # otherwise fall back to another stride order, which made convolutions here up to 1.5x slower.
    return {name: torch.empty_like(p0).copy_(sum(c * p[name] for c, p in zip(coeffs, points) if c != 0))
            for name, p0 in points[0].items()}


COEFFS = {"bezier": bezier_coeffs, "polychain": polychain_coeffs}


# ┌──────────────────────────────────────────────────────────────────────────────────────────────┐
# │ 5. Training the curve                                                                        │
# └──────────────────────────────────────────────────────────────────────────────────────────────┘
def train_curve(model, w1, w2, x, y, coeffs=bezier_coeffs, bends=1, epochs=10, batch_size=128, lr=0.05,
                weight_decay=5e-4, augment_pad=4, seed=0, log=print):
    """Minimise E_{t~U(0,1)} [ L(phi(t)) + wd/2 ||phi(t)||^2 ] over the middle control points only (they
    start on the straight line). Returns (points, history), points = [w1, middle..., w2] as dicts."""
    n, w1, w2 = bends + 2, {k: v.detach() for k, v in w1.items()}, {k: v.detach() for k, v in w2.items()}
    middle = [{k: nn.Parameter(w1[k] + i / (n - 1) * (w2[k] - w1[k])) for k in w1} for i in range(1, n - 1)]
    points = [w1, *middle, w2]
    t_gen = torch.Generator().manual_seed(seed + 12345)

    def forward(xb):
        t = torch.rand((), generator=t_gen).item()
        phi = curve_point(points, coeffs(t, n))
        # ||phi||^2 as the sum of squared per-tensor norms; _foreach_norm computes all of them in one call
        # (a Python sum of w.square().sum() gives the same value; README, "Performance", compares the two).
        penalty = weight_decay / 2 * torch.stack(torch._foreach_norm(list(phi.values()))).square().sum()
        return functional_call(model, phi, (xb,)), penalty

    model.train()
    params = [p for point in middle for p in point.values()]
    history = sgd_epochs(params, forward, x, y, epochs, batch_size, lr, 0.0, augment_pad, seed, log, "curve")
    return [{k: v.detach() for k, v in p.items()} for p in points], history


# ┌──────────────────────────────────────────────────────────────────────────────────────────────┐
# │ 6. Walking along the curve                                                                   │
# └──────────────────────────────────────────────────────────────────────────────────────────────┘
@torch.inference_mode()
def evaluate(model, params, x, y, batch_size=256):
    """Mean cross-entropy (nats), accuracy and log-probabilities (N, classes) of weights `params`."""
    model.eval()
    log_probs = torch.cat([F.log_softmax(functional_call(model, params, (x[i:i + batch_size],)), 1)
                           for i in range(0, len(x), batch_size)])  # (N, classes)
    return F.nll_loss(log_probs, y).item(), (log_probs.argmax(1) == y).float().mean().item(), log_probs


def barrier(values, ts):
    """Barrier height: max_t [ v(t) - ((1-t) v(0) + t v(1)) ], for values v at ts (ts[0]=0, ts[-1]=1)."""
    return max(v - ((1 - t) * values[0] + t * values[-1]) for v, t in zip(values, ts))


def sweep(model, points, coeffs, ts, data, eval_train, batch_size=256):
    """Loss and accuracy at each t on the curve and on the straight line w1 -> w2.
    Returns (metrics, test_log_probs): metrics[path][key] lists, test_log_probs[path] is (T, N, C)."""
    n_train = min(eval_train, len(data.train_x))
    paths = {"curve": (points, coeffs), "line": ([points[0], points[-1]], bezier_coeffs)}
    metrics, test_log_probs = {}, {}
    for path, (pts, fn) in paths.items():
        m, lps = {"train_loss": [], "train_acc": [], "test_loss": [], "test_acc": []}, []
        for t in ts:
            phi = curve_point(pts, fn(t, len(pts)))
            for split, xs, ys in (("train", data.train_x[:n_train], data.train_y[:n_train]),
                                  ("test", data.test_x, data.test_y)):
                loss, acc, lp = evaluate(model, phi, xs, ys, batch_size)
                m[f"{split}_loss"].append(loss)
                m[f"{split}_acc"].append(acc)
            lps.append(lp)  # the test split's, for the ensembles
        metrics[path], test_log_probs[path] = m, torch.stack(lps)
    return metrics, test_log_probs


# ┌──────────────────────────────────────────────────────────────────────────────────────────────┐
# │ 7. Ensembling                                                                                │
# └──────────────────────────────────────────────────────────────────────────────────────────────┘
def ensemble_metrics(log_probs, y, bins=15):
    """Accuracy, NLL = -mean log(1/K sum_k p_k(y)) and ECE of the mean of K members' probabilities.
    log_probs: (K, N, C). ECE = sum over confidence bins of (bin's share) x |accuracy - confidence|."""
    mean_log_p = torch.logsumexp(log_probs, 0) - math.log(log_probs.shape[0])  # (N, C)
    nll = -mean_log_p.gather(1, y[:, None]).mean().item()
    conf, pred = mean_log_p.exp().max(1)
    correct = (pred == y).float()
    b = (conf * bins).ceil().long().clamp(1, bins) - 1  # bins (0, 1/15], (1/15, 2/15], ...
    gap = torch.zeros(bins, device=y.device).index_add_(0, b, correct - conf)
    return {"acc": correct.mean().item(), "nll": nll, "ece": (gap.abs().sum() / len(y)).item()}


def ensembles(test_log_probs, y, bins=15):
    """Endpoints, the {w1, w2} pair, the ensemble of all curve points, and the {w1, phi(t)} pair along
    t on the curve and on the line, all from the sweep's test log-probabilities."""
    curve = test_log_probs["curve"]
    pair = lambda lp: [ensemble_metrics(torch.stack([lp[0], lp_t]), y, bins)["acc"] for lp_t in lp]
    return {"w1": ensemble_metrics(curve[:1], y, bins), "w2": ensemble_metrics(curve[-1:], y, bins),
            "w1+w2": ensemble_metrics(curve[[0, -1]], y, bins), "curve": {**ensemble_metrics(curve, y, bins), "size": len(curve)},
            "pair_along_t": {path: pair(lp) for path, lp in test_log_probs.items()}}


# ┌──────────────────────────────────────────────────────────────────────────────────────────────┐
# │ 8. Landscape                                                                                 │
# └──────────────────────────────────────────────────────────────────────────────────────────────┘
def dot(p, q):
    """Inner product of two weight dicts, as if each were one long vector."""
    return sum((p[k] * q[k]).sum() for k in p).item()


def plane_axes(w1, w2, theta, plane="squeezed"):
    """Origin o and directions e1, e2 of the plane through w1, w2, theta; (a, b) means o + a e1 + b e2.
    squeezed: o = theta, e1 = w1 - theta, e2 = w2 - theta, so w1 -> (1,0), w2 -> (0,1), theta -> (0,0).
    orthonormal: o = w1, e1 = w2 - w1, e2 = Gram-Schmidt part of theta - w1 scaled to ||w2 - w1||."""
    if plane == "squeezed":
        return theta, curve_point([w1, theta], [1, -1]), curve_point([w2, theta], [1, -1])
    if plane != "orthonormal":
        raise ValueError(f"--plane {plane}: unknown; choose squeezed or orthonormal")
    u, d = curve_point([w2, w1], [1, -1]), curve_point([theta, w1], [1, -1])
    v = curve_point([d, u], [1, -dot(d, u) / dot(u, u)])
    scale = math.sqrt(dot(u, u) / max(dot(v, v), 1e-30))
    return w1, u, {k: scale * x for k, x in v.items()}


def plane_coords(w, origin, e1, e2):
    """(a, b) minimising ||w - (origin + a e1 + b e2)||: exact in the plane, a projection off it."""
    d = curve_point([w, origin], [1, -1])
    g11, g12, g22, r1, r2 = dot(e1, e1), dot(e1, e2), dot(e2, e2), dot(d, e1), dot(d, e2)
    det = g11 * g22 - g12 * g12
    return (g22 * r1 - g12 * r2) / det, (g11 * r2 - g12 * r1) / det


def landscape(model, origin, e1, e2, coords, x, y, batch_size=256):
    """Test loss at origin + a e1 + b e2 for every (a, b) in coords x coords; returns rows b, columns a."""
    return [[evaluate(model, curve_point([origin, e1, e2], [1, a, b]), x, y, batch_size)[0] for a in coords]
            for b in coords]


# ┌──────────────────────────────────────────────────────────────────────────────────────────────┐
# │ 9. Plots                                                                                     │
# └──────────────────────────────────────────────────────────────────────────────────────────────┘
# Each figure is a matplotlib Figure drawn straight to a PNG file (Agg renderer): no pyplot, no window.
def plot_landscape(losses, coords, curve_xy, line_xy, marks, plane, title, path):
    """Filled contour of the loss grid (log levels), the curve, the line and marks {name: (a, b)}."""
    import numpy as np
    from matplotlib.colors import LogNorm
    from matplotlib.figure import Figure
    z = np.maximum(np.array(losses), 1e-6)  # log levels need positive values
    ax = (fig := Figure(figsize=(6, 5))).subplots()
    cs = ax.contourf(coords, coords, z, levels=np.geomspace(z.min(), z.max(), 24), norm=LogNorm(z.min(), z.max()),
                     cmap="viridis_r")
    fig.colorbar(cs, ax=ax, label="test loss (nats, log scale)", format="%.2g")
    ax.plot(*zip(*line_xy), "--", color="white", lw=1.5, label="straight line")
    ax.plot(*zip(*curve_xy), "-", color="tab:red", lw=2, label="trained curve")
    for name, xy in marks.items():
        ax.plot(*xy, "o", color="black", ms=6)
        ax.annotate(name, xy, xytext=(6, 6), textcoords="offset points", fontsize=11, weight="bold")
    ax.set(xlabel="a" if plane == "squeezed" else "along w2 - w1 (units of ||w2 - w1||)",
           ylabel="b" if plane == "squeezed" else "towards theta (same units)", title=title)
    ax.legend(loc="upper right", fontsize=8)
    write_atomic(path, lambda tmp: fig.savefig(tmp, format="png", dpi=130, bbox_inches="tight"))


def plot_sweep(ts, metrics, title, path):
    """Test error and train loss along t, trained curve against straight line."""
    from matplotlib.figure import Figure
    axes = (fig := Figure(figsize=(10, 3.8))).subplots(1, 2)
    for name, style in (("curve", "o-"), ("line", "s--")):
        axes[0].plot(ts, [100 * (1 - a) for a in metrics[name]["test_acc"]], style, label=name)
        axes[1].plot(ts, metrics[name]["train_loss"], style, label=name)
    axes[0].set(xlabel="t", ylabel="test error (%)", title=title)
    axes[1].set(xlabel="t", ylabel="train loss (nats)", yscale="log", title="train loss along t")
    for ax in axes:
        ax.legend(), ax.grid(alpha=0.3)
    write_atomic(path, lambda tmp: fig.savefig(tmp, format="png", dpi=130, bbox_inches="tight"))


def plot_ensembles(ts, ens, title, path):
    """Accuracy, NLL and ECE of endpoints and ensembles, and the {w1, phi(t)} pair's accuracy along t."""
    from matplotlib.figure import Figure
    axes = (fig := Figure(figsize=(17, 3.6))).subplots(1, 4, gridspec_kw={"wspace": 0.3})
    names = ["w1", "w2", "w1+w2", "curve"]
    for ax, key, label in zip(axes, ("acc", "nll", "ece"), (f"{title}: test accuracy", "test NLL (nats)", "ECE")):
        vals = [ens[n][key] for n in names]
        bars = ax.bar(names, vals, color=["tab:gray", "tab:gray", "tab:blue", "tab:red"])
        ax.bar_label(bars, fmt="%.4f", fontsize=8)
        if key == "acc":  # accuracies differ by a point or two: do not start the axis at 0
            ax.set_ylim(min(vals) - 2 * (max(vals) - min(vals)) - 0.01, max(vals) + (max(vals) - min(vals)) + 0.005)
        ax.set(title=label), ax.grid(axis="y", alpha=0.3)
    ax = axes[3]
    ax.plot(ts, ens["pair_along_t"]["curve"], "o-", color="tab:red", label="{w1, phi(t)} on the curve")
    ax.plot(ts, ens["pair_along_t"]["line"], "s--", color="tab:gray", label="{w1, (1-t)w1 + t w2} on the line")
    ax.axhline(ens["w1+w2"]["acc"], color="tab:blue", lw=1, label="{w1, w2}")
    ax.set(xlabel="t", ylabel="test accuracy", title="two-model ensemble along t"), ax.grid(alpha=0.3), ax.legend(fontsize=7)
    write_atomic(path, lambda tmp: fig.savefig(tmp, format="png", dpi=130, bbox_inches="tight"))


# ┌──────────────────────────────────────────────────────────────────────────────────────────────┐
# │ 10. Command line                                                                             │
# └──────────────────────────────────────────────────────────────────────────────────────────────┘
def load_stage(path, meta, device="cpu"):
    """The result saved at `path`; ValueError naming the file if it is unreadable or of another configuration."""
    try:
        saved = torch.load(path, map_location=device, weights_only=True)
        old = saved["meta"]
    except Exception as err:
        raise ValueError(f"{path}: unreadable checkpoint ({type(err).__name__}); delete it or use another --out") from None
    if old != meta:
        diff = ", ".join(f"{k}={old.get(k)!r} (now {v!r})" for k, v in meta.items() if old.get(k) != v)
        raise ValueError(f"{path}: checkpoint of another configuration ({diff}); delete it or use another --out")
    return saved["result"]


def run_stage(path, meta, resume, compute, log=print, device="cpu"):
    """Reuse the stage saved at `path` when resuming, else compute it and save it atomically."""
    if resume and path.exists():
        log(f"resume: reusing {path}")
        return load_stage(path, meta, device)
    result = compute()
    write_atomic(path, lambda tmp: torch.save({"meta": meta, "result": result}, tmp))
    return result


def matmul_gflops(device, size=1024, seconds=1.0):
    """Float32 matrix-multiply rate of this machine (GFLOP/s), the reference for FLOP efficiency."""
    a, n, start = torch.randn(size, size, device=device), 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        n, _ = n + 1, (a @ a).sum().item()  # .item() waits for an asynchronous device
    return 2 * size ** 3 * n / (time.perf_counter() - start) / 1e9


def number(kind, low, strict=False):
    """argparse type: an int or float >= low (> low if strict); the error names the value and the rule."""
    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            value = math.nan
        if not (math.isfinite(value) and (value > low if strict else value >= low)):
            raise argparse.ArgumentTypeError(f"{text!r} is not allowed; expected {'an integer' if kind is int else 'a number'}"
                                             f" {'>' if strict else '>='} {low}")
        return value
    return parse


QUICK = {"epochs": 4, "curve_epochs": 4, "train_subset": 4000, "test_subset": 1000, "eval_train": 2000,
         "points": 11, "grid": 11, "eval_test": 500, "width": 16}


def build_parser():
    p = argparse.ArgumentParser(prog="modeconnectivity.py", description="Train two networks, join them by a low-loss curve, and "
               "compare the curve with the straight line between them.")
    p.error = lambda message: p.exit(2, f"{p.prog}: error: {message}\n")  # one line, without the usage block
    a, pos_int = p.add_argument, number(int, 1)
    a("--dataset", default="cifar10", choices=DATASETS, help="data set (default: cifar10)")
    a("--data-dir", default="data", help="where data sets are downloaded and cached; for 'folder', the folder "
      "holding train/<class>/ and test/<class>/ (default: data)")
    a("--out", help="output folder (default: runs/<dataset>-<curve>)")
    a("--label", help="data set name in plot titles (default: from --dataset)")
    a("--curve", default="bezier", choices=sorted(COEFFS), help="curve family (default: bezier)")
    a("--bends", type=pos_int, default=1, help="middle control points of the curve (default: 1)")
    a("--width", type=pos_int, default=32, help="ConvNet channels: width, 2*width, 4*width (default: 32)")
    a("--epochs", type=pos_int, default=30, help="epochs per endpoint (default: 30)")
    a("--curve-epochs", type=pos_int, default=30, help="epochs of curve training (default: 30)")
    a("--batch-size", type=pos_int, default=128, help="training batch size (default: 128)")
    a("--lr", type=number(float, 0, strict=True), default=0.05, help="peak learning rate, endpoints and curve (default: 0.05)")
    a("--wd", type=number(float, 0), default=5e-4, help="weight decay, as wd/2 ||w||^2 in the loss (default: 5e-4)")
    a("--no-augment", action="store_true", help="no random crop and flip (they are on for 3-channel images)")
    a("--seed", type=int, default=0, help="seed of the first endpoint; the second uses seed+1 (default: 0)")
    a("--train-subset", type=pos_int, help="use the first N training images (default: all; synthetic: 10000)")
    a("--test-subset", type=pos_int, help="use the first N test images (default: all; synthetic: 2000)")
    a("--points", type=number(int, 2), default=21, help="evenly spaced t in [0, 1] for the sweep (default: 21)")
    a("--eval-train", type=pos_int, default=10000, help="training images for train loss along t (default: 10000)")
    a("--eval-test", type=pos_int, default=2000, help="test images per landscape grid point (default: 2000)")
    a("--eval-batch", type=pos_int, default=256, help="evaluation batch size (default: 256, fastest measured)")
    a("--grid", type=number(int, 2), default=21, help="landscape grid lines per axis (default: 21)")
    a("--plane", default="squeezed", choices=["squeezed", "orthonormal"], help="landscape plane (default: squeezed)")
    a("--device", default="auto", choices=["auto", "cpu", "cuda", "mps"], help="device (default: auto)")
    a("--quick", action="store_true", help="a first look in under a minute: "
      + ", ".join(f"{k}={v}" for k, v in QUICK.items()) + " (options you give yourself win)")
    a("--resume", action="store_true", help="reuse the stages already finished in --out")
    return p


def parse_args(argv):
    """Parse and check the options; every problem ends as ValueError naming the option and the value."""
    parser = build_parser()
    args = parser.parse_args(argv)
    for key, value in QUICK.items() if args.quick else ():  # quick values replace defaults, not your options
        if getattr(args, key) == parser.get_default(key):
            setattr(args, key, value)
    available = {"cpu": True, "cuda": torch.cuda.is_available(), "mps": torch.backends.mps.is_available()}
    if args.device == "auto":
        args.device = next(d for d in ("cuda", "mps", "cpu") if available[d])
    elif not available[args.device]:
        raise ValueError(f"--device {args.device}: not available on this machine; use --device cpu or auto")
    args.out = args.out or f"runs/{args.dataset}-{args.curve}"
    try:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        tempfile.TemporaryFile(dir=args.out).close()  # can we write there?
    except OSError as err:
        raise ValueError(f"--out {args.out}: cannot write there ({err.strerror})") from None
    return args


def run(args, log=print):
    """Run every stage in order; write checkpoints, figures and results.json to args.out; return the results."""
    out, device, cfg, timings = Path(args.out), torch.device(args.device), vars(args).copy(), {}
    label = args.label or {"cifar10": "CIFAR-10", "mnist": "MNIST", "fashionmnist": "Fashion-MNIST",
                           "synthetic": "synthetic data", "folder": Path(args.data_dir).name}[args.dataset]
    options = [["dataset", "data_dir", "train_subset", "test_subset", "seed", "width", "epochs", "batch_size", "lr",
                "wd", "no_augment"], ["curve", "bends", "curve_epochs"], ["points", "eval_train"],
               ["grid", "plane", "eval_test"]]
    metas = {name: {k: cfg[k] for k in sum(options[:i + 1], [])}  # a stage depends on its and earlier options
             for i, name in enumerate(("endpoints", "curve", "sweep", "landscape"))}
    for name in [n for n in metas if (out / f"{n}.pt").exists()]:  # refuse a broken or foreign checkpoint
        load_stage(out / f"{name}.pt", metas[name], device)       # now, not after hours of training

    def stage(name, compute):  # compute() -> dict with "images": how many went through the network
        def timed():
            t0 = time.perf_counter()
            return {**compute(), "seconds": time.perf_counter() - t0}
        result = run_stage(out / f"{name}.pt", metas[name], args.resume, timed, log, device)
        timings[name] = {"seconds": result["seconds"], "images_per_s": result["images"] / result["seconds"]}
        return result

    t0 = time.perf_counter()
    data = load_data(args.dataset, args.data_dir, device, args.train_subset, args.test_subset, args.seed)
    n_train, n_test, seconds = len(data.train_x), len(data.test_x), time.perf_counter() - t0
    timings["data"] = {"seconds": seconds, "images_per_s": (n_train + n_test) / seconds}
    channels, size, n_points, coeffs = data.train_x.shape[1], data.train_x.shape[2], args.bends + 2, COEFFS[args.curve]
    log(f"data: {label}, {n_train} training and {n_test} test images of {channels}x{size}x{size}, on {device}")
    pad = 0 if args.no_augment or channels != 3 else 4
    seen = lambda histories: sum(h["images_per_s"] * h["seconds"] for h in histories)

    def new_model(seed):
        torch.manual_seed(seed)  # initial weights and dropout masks depend on the seed alone
        return ConvNet(channels, len(data.classes), size, args.width).to(device, memory_format=torch.channels_last)

    def train_endpoints():
        states, histories = [], []
        for seed in (args.seed, args.seed + 1):  # one training function, two seeds
            model = new_model(seed)
            histories += train_endpoint(model, data.train_x, data.train_y, args.epochs, args.batch_size, args.lr,
                                        args.wd, pad, seed, log)
            states.append(model.state_dict())
        return {"states": states, "history": histories, "images": seen(histories)}

    ends = stage("endpoints", train_endpoints)
    w1, w2 = ({k: v.to(device) for k, v in s.items()} for s in ends["states"])
    model = new_model(args.seed + 2)  # its own weights are never used: functional_call replaces them all

    def train_curve_stage():
        points, history = train_curve(model, w1, w2, data.train_x, data.train_y, coeffs, args.bends,
                                      args.curve_epochs, args.batch_size, args.lr, args.wd, pad, args.seed + 2, log)
        return {"points": points, "history": history, "images": seen(history)}

    points = [{k: v.to(device) for k, v in p.items()} for p in stage("curve", train_curve_stage)["points"]]
    ts = [i / (args.points - 1) for i in range(args.points)]
    sw = stage("sweep", lambda: dict(zip(("metrics", "log_probs"), sweep(model, points, coeffs, ts, data, args.eval_train,
                                                                         args.eval_batch)),
                                     images=args.points * 2 * (min(args.eval_train, n_train) + n_test)))
    metrics, ens = sw["metrics"], ensembles(sw["log_probs"], data.test_y)

    theta = points[1] if args.bends == 1 else curve_point(points, coeffs(0.5, n_points))
    origin, e1, e2 = plane_axes(points[0], points[-1], theta, args.plane)
    lo, hi = -0.5, 1.5  # both axes: w1, w2 and theta sit at 0 and 1, with half a unit of margin
    coords = [lo + i * (hi - lo) / (args.grid - 1) for i in range(args.grid)]
    x_l, y_l = data.test_x[:args.eval_test], data.test_y[:args.eval_test]
    grid = stage("landscape", lambda: {"test_loss": landscape(model, origin, e1, e2, coords, x_l, y_l, args.eval_batch),
                                       "images": args.grid ** 2 * len(x_l)})["test_loss"]
    fine = [i / 60 for i in range(61)]
    curve_xy = [plane_coords(curve_point(points, coeffs(t, n_points)), origin, e1, e2) for t in fine]
    line_xy = [plane_coords(curve_point([points[0], points[-1]], [1 - t, t]), origin, e1, e2) for t in fine]
    marks = {"w1": curve_xy[0], "w2": curve_xy[-1],
             "theta" if args.bends == 1 else "phi(0.5)": plane_coords(theta, origin, e1, e2)}

    t0 = time.perf_counter()
    where = "" if args.bends == 1 else "\nplane through w1, w2, phi(0.5); the curve is projected onto it"
    plot_landscape(grid, coords, curve_xy, line_xy, marks, args.plane, f"{label}: test loss, {args.plane} plane{where}",
                   out / "landscape.png")
    plot_sweep(ts, metrics, f"{label}: {args.curve} curve vs straight line", out / "sweep.png")
    plot_ensembles(ts, ens, label, out / "ensembles.png")
    timings["plots"] = {"seconds": time.perf_counter() - t0, "images_per_s": None}

    # Yardsticks measured in this process: plain inference of one fixed model over the test images (median
    # of 3 passes), the FLOPs of one image's forward pass (from the layer shapes) and the matmul peak.
    def plain_rate():
        t0 = time.perf_counter()
        evaluate(model, w1, data.test_x, data.test_y, args.eval_batch)
        return n_test / (time.perf_counter() - t0)
    with FlopCounterMode(display=False) as counter:
        evaluate(model, w1, data.test_x[:1], data.test_y[:1])
    flops, peak, train_ips, plain_ips = counter.get_total_flops(), matmul_gflops(device), \
        timings["endpoints"]["images_per_s"], sorted(plain_rate() for _ in range(3))[1]
    results = {
        "config": cfg,
        "versions": {"python": platform.python_version(), "torch": torch.__version__, "device": str(device),
                     "threads": torch.get_num_threads()},
        "endpoints": [{"seed": args.seed + i, **{k: v[end] for k, v in metrics["curve"].items()}}
                      for i, end in enumerate((0, -1))],
        "sweep": {"t": ts, **metrics},
        "barrier": {p: {"train_loss": barrier(metrics[p]["train_loss"], ts),
                        "test_error": barrier([1 - a for a in metrics[p]["test_acc"]], ts)} for p in metrics},
        "ensemble": ens,
        "landscape": {"plane": args.plane, "range": [lo, hi], "grid": args.grid, "test_loss": grid,
                      "coords": coords, "curve_xy": curve_xy, "line_xy": line_xy, "marks": marks},
        "timings": timings,
        "efficiency": {"forward_flops_per_image": flops, "matmul_gflops": peak,  # 1024x1024 float32 matmul rate
                       "endpoint_training_vs_matmul": 3 * flops * train_ips / (peak * 1e9),
                       "curve_vs_endpoint_training": timings["curve"]["images_per_s"] / train_ips,
                       "plain_inference_images_per_s": plain_ips,
                       "sweep_vs_plain_inference": timings["sweep"]["images_per_s"] / plain_ips,
                       "landscape_vs_plain_inference": timings["landscape"]["images_per_s"] / plain_ips,
                       "data_fraction_of_training": max(h["data_fraction"] for h in ends["history"])},
    }
    write_atomic(out / "results.json", lambda tmp: tmp.write_text(json.dumps(results, indent=1)))
    b, e = results["barrier"], results["endpoints"]
    log(f"done: endpoints test acc {e[0]['test_acc']:.4f} / {e[1]['test_acc']:.4f}; test-error barrier: line "
        f"{b['line']['test_error']:.4f}, curve {b['curve']['test_error']:.4f}; curve ensemble acc "
        f"{ens['curve']['acc']:.4f}; wrote {out}/results.json")
    return results


def main(argv=None):
    """Command line: bad input ends with one line on stderr and exit code 2; Ctrl-C with code 130."""
    try:
        return run(parse_args(argv), log=lambda msg: print(msg, flush=True))
    except (ValueError, OSError) as err:  # bad input, or a disk that is full or read-only
        print(f"modeconnectivity.py: error: {err}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("modeconnectivity.py: interrupted; finished stages are saved, rerun with --resume", file=sys.stderr)
        sys.exit(130)


if __name__ == "__main__":
    main()
