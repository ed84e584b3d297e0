"""Mode connectivity in neural-network loss landscapes, in one readable file (tutorial.md explains it).

Two networks w1, w2 from different seeds are joined by a curve phi(t) of low loss; the straight line between them
crosses a ridge (Garipov et al. 2018). This file trains both and a Bezier curve or polygonal chain between them, sweeps
the curve and the lines (plain, neurons aligned), builds fast ensembles (FGE, simplexes) and maps the curve's plane.

    python modeconnectivity.py --dataset synthetic --quick   # a first look, offline; the full recipe: --dataset cifar10
"""
import argparse
import contextlib
import copy
import hashlib
import json
import math
import os
import sys
import time
import timeit
from functools import partial
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.func import functional_call

# ──── │ 1. Data │ ───────────────────────────────────────────────────────────────────────────────
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
    """Class-structured uint8 images: one of 4 smooth random prototypes per class, shifted, mirrored and noisy."""
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

def read_folder(root, log=print):
    """Decode an ImageFolder layout root/{train,test}/<class>/<image> into uint8 tensors, skipping hidden names."""
    from PIL import Image  # Pillow comes with torchvision
    root = Path(root)
    if not all((root / half).is_dir() for half in ("train", "test")):
        raise ValueError(f"--data-dir {root}: expected a folder with train/<class>/<image> and test/<class>/<image>")

    def visible(folder):  # sorted by name, hidden names such as .DS_Store or .ipynb_checkpoints left out
        return sorted(folder.glob("[!.]*"), key=lambda p: p.name)
    classes, test_classes = ([p.name for p in visible(root / half) if p.is_dir()] for half in ("train", "test"))
    if classes != test_classes:
        raise ValueError(f"--data-dir {root}: train/ has classes {classes} but test/ has {test_classes}")
    out = []
    for half in ("train", "test"):
        files = [(f, k) for k, name in enumerate(classes) for f in visible(root / half / name)]
        images = []
        start = time.perf_counter()
        for i, (f, _) in enumerate(files):
            try:
                images.append(torch.from_numpy(np.array(Image.open(f).convert("RGB"))).permute(2, 0, 1))
            except (OSError, Image.DecompressionBombError) as err:  # not an image, truncated, too large
                raise ValueError(f"--data-dir {root}: {f} is not a readable image ({err})") from None
            if (i + 1) * 10 // len(files) > i * 10 // len(files):  # ten lines per half (progress: section 6)
                progress(log, f"decoding {root / half} (once, then cached)", i + 1, len(files), start)
        sizes = {tuple(img.shape[1:]): f for (f, _), img in zip(files, images, strict=True)}  # (height, width): a file
        if len(sizes) != 1 or not 8 <= images[0].shape[1] == images[0].shape[2]:
            found = ", ".join(f"{f} is {h}x{w}" for (h, w), f in list(sizes.items())[:2]) or "no images"
            raise ValueError(f"--data-dir {root}: {half}/ needs square images of one size >= 8 px; {found}")
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
    def nchw(x):  # (N, C, H, W) from (N, H, W, C) or (N, H, W)
        return (x.permute(0, 3, 1, 2) if x.dim() == 4 else x[:, None]).contiguous()
    return (*[t for ds in (train, test) for t in (nchw(torch.as_tensor(ds.data)), torch.as_tensor(ds.targets))],
            list(train.classes))

def load_data(name, data_dir, device, train_size=None, test_size=None, seed=0, image_size=32, log=print):
    """Decode a data set once (cached as uint8 in data_dir); its first train_size/test_size images, normalised."""
    if name not in DATASETS:
        raise ValueError(f"--dataset {name}: unknown; choose from {', '.join(DATASETS)}")
    if name == "synthetic":
        tx, ty, vx, vy, classes = make_synthetic(train_size or 10000, test_size or 2000, image_size, seed=seed)
    else:
        files = Path(data_dir).glob("t*/[!.]*/[!.]*") if name == "folder" else []  # hidden names skipped (read_folder)
        listing = sorted(str(p.relative_to(data_dir)) for p in files)  # names the cache: new images, a new cache
        cache = Path(data_dir) / f"{name}-v2-{hashlib.sha1(str(listing).encode()).hexdigest()[:10]}-uint8.pt"
        try:
            tx, ty, vx, vy, classes = torch.load(cache, weights_only=True)
        except Exception:  # no cache yet, or a damaged one: decode again
            decoded = read_folder(data_dir, log) if name == "folder" else read_torchvision(name, data_dir)
            tx, ty, vx, vy, classes = decoded
            write_atomic(cache, lambda tmp: torch.save((tx, ty, vx, vy, classes), tmp))
    tx, ty, vx, vy = tx[:train_size], ty[:train_size], vx[:test_size], vy[:test_size]
    mean = tx.float().mean((0, 2, 3), keepdim=True).to(device)  # per-channel statistics of the training images
    std = tx.float().std((0, 2, 3), keepdim=True).clamp_min(1e-3).to(device)
    # channels_last (N, H, W, C in memory): the layout in which the CPU convolutions ran fastest (see curve_point)
    def prepare(x):
        return ((x.to(device).float() - mean) / std).contiguous(memory_format=torch.channels_last)
    return Data(prepare(tx), ty.to(device), prepare(vx), vy.to(device), list(classes))


# ──── │ 2. Model │ ──────────────────────────────────────────────────────────────────────────────
class ConvNet(nn.Module):
    """3x3 conv layers of width, 2*width, 4*width (BatchNorm if asked, ReLU, 2x2 max-pool), two linear with dropout."""

    def __init__(self, in_channels=3, num_classes=10, image_size=32, width=32, dropout=0.2, batchnorm=False):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, width, 3, padding=1)
        self.conv2 = nn.Conv2d(width, 2 * width, 3, padding=1)
        self.conv3 = nn.Conv2d(2 * width, 4 * width, 3, padding=1)
        norm = nn.BatchNorm2d if batchnorm else nn.Identity  # Identity ignores its argument: no weights, no effect
        self.bn1, self.bn2, self.bn3 = norm(width), norm(2 * width), norm(4 * width)
        self.fc1 = nn.Linear(4 * width * (image_size // 8) ** 2, 8 * width)  # after three 2x2 max-pools
        self.fc2 = nn.Linear(8 * width, num_classes)
        self.dropout = dropout

    def forward(self, x):  # x: (B, C, H, W)
        x = F.max_pool2d(F.relu(self.bn1(self.conv1(x))), 2)  # (B, width, H/2, W/2)
        x = F.max_pool2d(F.relu(self.bn2(self.conv2(x))), 2)  # (B, 2*width, H/4, W/4)
        x = F.max_pool2d(F.relu(self.bn3(self.conv3(x))), 2)  # (B, 4*width, H/8, W/8)
        x = F.dropout(x.flatten(1), self.dropout, self.training)
        x = F.dropout(F.relu(self.fc1(x)), self.dropout, self.training)
        return self.fc2(x)  # (B, num_classes) logits


# ──── │ 3. Training the endpoints │ ─────────────────────────────────────────────────────────────
def one_cycle_lr(step, total_steps, peak_lr, warmup=0.2):
    """One-cycle schedule: linear from 0 to peak_lr over the first `warmup` of the steps, then down to 0."""
    frac = (step + 1) / max(1, total_steps)
    return peak_lr * (frac / warmup if frac < warmup else (1 - frac) / (1 - warmup))

def autocast(device, precision):
    """Autocast for ONE forward pass (float32: off); never around a loop, which would reuse its first bf16 weights."""
    enabled = precision != torch.float32  # float32: no context at all (torch before 2.5 refuses one for "mps")
    return torch.autocast(torch.device(device).type, dtype=precision) if enabled else contextlib.nullcontext()

def sgd_epochs(params, forward, x, y, epochs, batch_size, lr_at, weight_decay, augment_pad, seed, log, name,
               precision=torch.float32):
    """SGD (Nesterov, momentum 0.9) on CE(forward(xb)[0], yb) + forward(xb)[1]; returns one dict per epoch."""
    gen = torch.Generator(device=x.device).manual_seed(seed)
    opt = torch.optim.SGD(params, lr=lr_at(0, 1), momentum=0.9, nesterov=True, weight_decay=weight_decay)
    steps = max(1, len(x) // batch_size)  # the last partial batch is dropped, as in most recipes
    history = []
    for epoch in range(epochs):
        t0 = time.perf_counter()
        loss_sum, correct = 0.0, 0  # summed over the epoch's batches
        perm = torch.randperm(len(x), generator=gen, device=x.device)
        for i, idx in enumerate(perm[:steps * batch_size].split(batch_size)):
            xb = augment(x[idx], augment_pad, gen) if augment_pad else x[idx]
            yb = y[idx]
            opt.param_groups[0]["lr"] = lr_at(epoch * steps + i, epochs * steps)
            with autocast(x.device, precision):  # opened per forward pass
                logits, penalty = forward(xb)
            loss = F.cross_entropy(logits.float(), yb)  # the loss, its gradient and the weights stay float32
            objective = loss + penalty
            if not math.isfinite(objective.item()):  # stop before a NaN reaches the weights or a checkpoint
                raise ValueError(f"{name}: objective {objective.item()} at epoch {epoch + 1}, step {i + 1}, lr "
                                 f"{opt.param_groups[0]['lr']:.3g}: diverged; try a lower --lr (--curve-lr, --fge-lr)")
            opt.zero_grad(set_to_none=True)
            objective.backward()
            opt.step()
            loss_sum += loss.item() * len(yb)
            correct += (logits.argmax(1) == yb).sum().item()
        seconds = time.perf_counter() - t0
        seen = steps * min(batch_size, len(x))  # images trained on in this epoch
        history.append({"epoch": epoch + 1, "loss": loss_sum / seen, "acc": correct / seen, "seconds": seconds,
                        "images": seen, "images_per_s": seen / seconds})
        left = seconds * (epochs - epoch - 1)  # at this epoch's pace
        log(f"{name} epoch {epoch + 1}/{epochs}: train loss {loss_sum / seen:.4f}, acc {correct / seen:.4f}, "
            f"{seen / seconds:.0f} images/s, {left:.0f} s left")
    return history

def logits_only(model, xb):
    """A forward for sgd_epochs with no extra penalty: SGD's weight_decay adds the wd/2 ||w||^2 term."""
    return model(xb), 0.0

def train_endpoint(model, x, y, epochs, batch_size, lr, weight_decay, augment_pad, seed, log=print,
                   precision=torch.float32):
    """Train one endpoint w: minimise CE + wd/2 ||w||^2 (the decay is applied by SGD). Returns the history."""
    model.train()
    return sgd_epochs(list(model.parameters()), partial(logits_only, model), x, y, epochs=epochs,
                      batch_size=batch_size, lr_at=partial(one_cycle_lr, peak_lr=lr), weight_decay=weight_decay,
                      augment_pad=augment_pad, seed=seed, log=log, name=f"endpoint seed {seed}", precision=precision)


# ──── │ 4. Curves │ ─────────────────────────────────────────────────────────────────────────────
def bezier_coeffs(t, n):
    """Bezier weights of n control points: c_k(t) = C(n-1, k) t^k (1-t)^(n-1-k)."""
    if not 0.0 <= t <= 1.0:
        raise ValueError(f"t = {t}: must lie in [0, 1]")
    return [math.comb(n - 1, k) * t ** k * (1 - t) ** (n - 1 - k) for k in range(n)]

def polychain_coeffs(t, n):
    """Polygonal-chain weights of n control points: c_k(t) = max(0, 1 - |t (n-1) - k|)."""
    if not 0.0 <= t <= 1.0:
        raise ValueError(f"t = {t}: must lie in [0, 1]")
    return [max(0.0, 1.0 - abs(t * (n - 1) - k)) for k in range(n)]

def curve_point(points, coeffs):
    """phi = sum_k c_k P_k, tensor by tensor, for control points P_k given as dicts name -> tensor."""
    if len(points) < 2 or len(points) != len(coeffs):
        raise ValueError(f"{len(points)} control points, {len(coeffs)} coefficients: need as many, at least 2")
    if any(p.keys() != points[0].keys() or any(p[k].shape != v.shape for k, v in points[0].items()) for p in points):
        raise ValueError("control points differ in their tensor names or shapes; they must describe one network")
    phi = {}
    for name, p0 in points[0].items():
        value = sum(c * p[name] for c, p in zip(coeffs, points, strict=True) if c != 0)  # sum_k c_k P_k
        # copied into P_0's memory layout (channels_last), in which the convolutions ran up to 1.5x faster
        phi[name] = torch.empty_like(p0).copy_(value)
    return phi


# ──── │ 5. Training the curve │ ─────────────────────────────────────────────────────────────────
def train_points(model, points, draw, x, y, lr, weight_decay, seed, lam=0.0, **sgd_options):
    """One loop for curves and simplexes: per batch c = draw(n, gen), SGD on L(phi) + wd/2 ||phi||^2 - lam log vol."""
    gen = torch.Generator().manual_seed(seed + 12345)
    buffers = detached(dict(model.named_buffers()))  # BatchNorm updates these copies, not the model's own

    def forward(xb):  # the logits at phi = sum_j c_j P_j, and the penalty
        phi = curve_point(points, draw(len(points), gen))
        norms = torch.stack([w.norm() for w in phi.values()])  # one norm per tensor of phi
        penalty = weight_decay / 2 * norms.square().sum()  # wd/2 ||phi||^2
        if lam:  # a simplex: - lam log vol rewards a new vertex that moves away from the others
            penalty = penalty - lam * simplex_volume(points).log()
        return functional_call(model, {**buffers, **phi}, (xb,)), penalty
    model.train()
    params = [p for point in points for p in point.values() if isinstance(p, nn.Parameter)]
    return sgd_epochs(params, forward, x, y, lr_at=partial(one_cycle_lr, peak_lr=lr), weight_decay=0.0, seed=seed,
                      **sgd_options)  # weight decay is in the penalty, at phi

def detached(params):
    """A copy of a weight dict that autograd does not track."""
    return {k: v.detach().clone() for k, v in params.items()}

def parameters_of(model, weights, statistics=False):
    """The floating-point parameters of model in weights (parameter dict or state_dict); checks names and shapes."""
    params, state = dict(model.named_parameters()), model.state_dict()
    extra = [name for name in weights if name not in state]  # e.g. BatchNorm tensors for a model without any
    if extra:
        raise ValueError(f"weights: tensor {extra[0]} is not one of the model's ({type(model).__name__})")
    for name, tensor in state.items():  # buffers may be absent, unless statistics are asked for
        needed = name in params or (statistics and name.endswith(("running_mean", "running_var")))
        found = "missing" if name not in weights else f"of shape {tuple(weights[name].shape)}"
        if (needed and name not in weights) or (name in weights and weights[name].shape != tensor.shape):
            raise ValueError(f"weights: tensor {name} is {found}; the model's is of shape {tuple(tensor.shape)}"
                             + ("; recompute_bn gives BatchNorm statistics" if "running_" in name else ""))
    return {name: weights[name] for name in params}

def train_curve(model, w1, w2, x, y, coeffs=bezier_coeffs, bends=1, epochs=10, batch_size=128, lr=0.05,
                weight_decay=5e-4, augment_pad=4, seed=0, log=print, precision=torch.float32):
    """Minimise E_{t~U(0,1)} [ L(phi(t)) + wd/2 ||phi(t)||^2 ] over the middle points; returns (points, history)."""
    w1, w2 = detached(parameters_of(model, w1)), detached(parameters_of(model, w2))
    middle = [{k: nn.Parameter(w1[k] + i / (bends + 1) * (w2[k] - w1[k])) for k in w1} for i in range(1, bends + 1)]
    points = [w1, *middle, w2]

    def draw(n, gen):  # one t ~ U(0, 1) per batch, and the coefficients c_k(t) of the n points
        return coeffs(torch.rand((), generator=gen).item(), n)
    history = train_points(model, points, draw, x, y, lr=lr, weight_decay=weight_decay, seed=seed, epochs=epochs,
                           batch_size=batch_size, augment_pad=augment_pad, log=log, name="curve", precision=precision)
    return [detached(p) for p in points], history


# ──── │ 6. Walking along the curve │ ────────────────────────────────────────────────────────────
@torch.no_grad()
def recompute_bn(model, params, x, batch_size=256, precision=torch.float32):
    """params plus BatchNorm running statistics at these weights: their average over one pass of x, dropout off."""
    if all(getattr(m, "running_mean", None) is None for m in model.modules()):  # no BatchNorm layer
        return params  # nothing to recompute, and no copy made
    probe = copy.deepcopy(model).eval()  # a copy: the model's own statistics and modes stay as they were
    norms = {name: m for name, m in probe.named_modules() if getattr(m, "running_mean", None) is not None}
    for m in norms.values():
        m.reset_running_stats()
        m.momentum = None  # cumulative average of the batch statistics
        m.train()  # batch statistics in BatchNorm only: dropout stays off
    stats = {f"{name}.{k}": v for name, m in norms.items() for k, v in m.named_buffers()}  # updated in place
    for xb in torch.tensor_split(x, math.ceil(len(x) / batch_size)):  # batches of equal size: every image weighs alike
        with autocast(x.device, precision):
            functional_call(probe, {**params, **stats}, (xb,))
    return {**params, **stats}

@torch.inference_mode()
def evaluate(model, params, x, y, batch_size=256, precision=torch.float32):
    """Mean cross-entropy (nats), accuracy and log-probabilities (N, classes) of weights `params`."""
    parameters_of(model, params, statistics=True)  # never the model object's own statistics: other weights' ones
    model.eval()
    log_probs = []
    for xb in x.split(batch_size):
        with autocast(x.device, precision):
            logits = functional_call(model, params, (xb,))
        log_probs.append(F.log_softmax(logits.float(), 1))  # float32, as every metric
    log_probs = torch.cat(log_probs)
    return F.nll_loss(log_probs, y).item(), (log_probs.argmax(1) == y).float().mean().item(), log_probs

def barrier(values, ts):
    """Barrier height: max_t [ v(t) - ((1-t) v(0) + t v(1)) ], for values v at ts (ts[0]=0, ts[-1]=1)."""
    return max(v - ((1 - t) * values[0] + t * values[-1]) for v, t in zip(values, ts, strict=True))

def progress(log, name, done, total, start):
    """One line for a long loop, readable in a log file: what is done, what is left and the time left."""
    spent = time.perf_counter() - start
    log(f"{name}: {done}/{total} done, {total - done} left, about {spent / done * (total - done):.0f} s left")

def sweep(model, paths, ts, data, eval_train, bn_images=2000, batch_size=256, log=print, precision=torch.float32):
    """Per path (points, coeffs) and t: train/test loss and accuracy, and test log-probs (T, N, C)."""
    splits = {"train": (data.train_x[:eval_train], data.train_y[:eval_train]), "test": (data.test_x, data.test_y)}
    metrics = {path: {"train_loss": [], "train_acc": [], "test_loss": [], "test_acc": []} for path in paths}
    test_log_probs = {path: [] for path in paths}
    start = time.perf_counter()
    for i, (path, t) in enumerate([(path, t) for path in paths for t in ts]):
        points, coeffs = paths[path]
        phi = curve_point(points, coeffs(t, len(points)))
        if bn_images > 0:  # BatchNorm statistics recomputed at each point; 0: interpolated ones
            phi = recompute_bn(model, phi, data.train_x[:bn_images], batch_size, precision)
        for split, (xs, ys) in splits.items():
            loss, acc, lp = evaluate(model, phi, xs, ys, batch_size=batch_size, precision=precision)
            metrics[path][f"{split}_loss"].append(loss)
            metrics[path][f"{split}_acc"].append(acc)
        test_log_probs[path].append(lp)  # the test split's, for the ensembles
        progress(log, f"sweep ({path}, t = {t:.2f})", i + 1, len(paths) * len(ts), start)
    return metrics, {path: torch.stack(lps) for path, lps in test_log_probs.items()}


# ──── │ 7. Ensembling │ ─────────────────────────────────────────────────────────────────────────
def ensemble_metrics(log_probs, y, bins=15):
    """Accuracy, NLL = -mean log(1/K sum_k p_k(y)), ECE and reliability bins of K members' mean; log_probs (K, N, C)."""
    mean_log_p = torch.logsumexp(log_probs, 0) - math.log(log_probs.shape[0])  # (N, C)
    nll = -mean_log_p.gather(1, y[:, None]).mean().item()
    conf, pred = mean_log_p.exp().max(1)
    correct = (pred == y).float()
    b = (conf * bins).ceil().long().clamp(1, bins) - 1  # bins (0, 1/15], (1/15, 2/15], ...
    count = torch.bincount(b, minlength=bins)  # images per bin
    right = torch.zeros(bins, device=y.device).index_add_(0, b, correct)  # correct answers per bin
    sure = torch.zeros(bins, device=y.device).index_add_(0, b, conf)  # summed confidence per bin
    ece = ((right - sure).abs().sum() / len(y)).item()  # sum over bins of (share of items) x |accuracy - confidence|
    used = count > 0
    reliability = {"confidence": (sure / count)[used].tolist(), "accuracy": (right / count)[used].tolist(),
                   "count": count[used].tolist()}
    return {"acc": correct.mean().item(), "nll": nll, "ece": ece, "reliability": reliability}


# ──── │ 8. Fast ensembles │ ─────────────────────────────────────────────────────────────────────
def fge_lr(step, cycle_steps, lr_high, lr_low):
    """Triangular cycle: lr_low -> lr_high at mid-cycle -> lr_low at the cycle's end, where FGE takes a snapshot."""
    frac = (step % cycle_steps + 1) / cycle_steps
    return lr_low + (lr_high - lr_low) * (1 - abs(2 * frac - 1))

def fge_snapshots(model, w, x, y, cycles=4, cycle_epochs=2, lr_high=0.01, lr_low=1e-4, batch_size=128,
                  weight_decay=5e-4, augment_pad=4, seed=0, log=print, precision=torch.float32):
    """Fast Geometric Ensembling: SGD from w with a cyclical rate (fge_lr); returns (cycle-end snapshots, history)."""
    parameters_of(model, w)  # checks that w describes the model
    model.load_state_dict({**model.state_dict(), **w})  # a parameter dict keeps the model's own statistics
    model.train()
    snapshots, history = [], []
    for cycle in range(cycles):
        history += sgd_epochs(list(model.parameters()), partial(logits_only, model), x, y, epochs=cycle_epochs,
                              batch_size=batch_size, lr_at=partial(fge_lr, lr_high=lr_high, lr_low=lr_low),
                              weight_decay=weight_decay, augment_pad=augment_pad, seed=seed + cycle, log=log,
                              name=f"FGE cycle {cycle + 1}/{cycles}", precision=precision)
        snapshots.append(detached(model.state_dict()))  # with BatchNorm: the statistics of training too
    return snapshots, history

def simplex_coeffs(n, gen=None):
    """A uniform point of the simplex with n vertices (Dirichlet(1, ..., 1)): c_j = e_j / sum_i e_i, e_j ~ Exp(1)."""
    e = torch.empty(n, dtype=torch.float64).exponential_(generator=gen)
    return (e / e.sum()).tolist()

def simplex_volume(vertices):
    """Cayley-Menger volume (differentiable): vol^2 = (-1)^(k+1) / (2^k (k!)^2) det [[0, 1^T], [1, D]], D = dist^2."""
    k = len(vertices) - 1
    device = next(iter(vertices[0].values())).device
    cm = torch.ones(k + 2, k + 2, dtype=torch.float64, device=device)  # the bordered matrix [[0, 1^T], [1, D]]
    cm.diagonal().zero_()  # the corner, and each vertex's distance to itself
    for i, a in enumerate(vertices):
        for j, b in enumerate(vertices[:i]):  # each pair once, D being symmetric: squared distance over all tensors
            cm[i + 1, j + 1] = cm[j + 1, i + 1] = sum((a[name] - b[name]).double().square().sum() for name in a)
    volume_sq = (-1) ** (k + 1) * torch.linalg.det(cm) / (2 ** k * math.factorial(k) ** 2)
    return volume_sq.clamp_min(0).sqrt()

def train_simplex(model, vertices, x, y, new_vertices=2, epochs=3, batch_size=128, lr=0.05, weight_decay=5e-4,
                  lam=1e-3, augment_pad=4, seed=0, log=print, precision=torch.float32):
    """Add vertices one by one: min E_{c~Dir(1)} [L(sum_j c_j V_j) + wd/2 ||.||^2] - lam log vol(V_0..V_k)."""
    vertices = [detached(parameters_of(model, v)) for v in vertices]
    history = []
    gen = torch.Generator().manual_seed(seed)
    for j in range(new_vertices):
        new = {}
        for name in vertices[0]:  # near the centre c: noise of 1 % of the tensor's standard deviation
            c = sum(v[name] for v in vertices) / len(vertices)
            noise = 0.01 * c.std() * torch.randn(c.shape, generator=gen).to(c)
            new[name] = nn.Parameter(torch.empty_like(c).copy_(c + noise))  # empty_like keeps c's memory layout
        history += train_points(model, [*vertices, new], simplex_coeffs, x, y, lr=lr, weight_decay=weight_decay,
                                seed=seed + j, lam=lam, epochs=epochs, batch_size=batch_size, augment_pad=augment_pad,
                                log=log, name=f"simplex vertex {len(vertices)}", precision=precision)
        vertices.append(detached(new))
    return vertices, history


# ──── │ 9. Aligning neurons │ ───────────────────────────────────────────────────────────────────
class Group(NamedTuple):
    """Hidden units reordered together: unit u owns entries u*block .. u*block+block-1 along each listed axis."""
    units: int
    tensors: list  # [(tensor name, axis, block)]: weights and biases, matched and permuted
    statistics: list  # [(tensor name, axis, block)]: BatchNorm running statistics, permuted only

# Operations that treat each unit (channel) on its own: a space of units passes through them unchanged.
PER_UNIT = {"relu", "leakyrelu", "gelu", "silu", "elu", "tanh", "sigmoid", "relu6", "hardtanh", "identity", "dropout",
            "dropout1d", "dropout2d", "maxpool1d", "maxpool2d", "avgpool1d", "avgpool2d", "adaptiveavgpool1d",
            "adaptiveavgpool2d", "adaptivemaxpool2d", "contiguous", "clone", "add", "iadd", "sub"}

def operation_kind(node, modules):
    """What one operation of a traced graph does to the units (axis 1) of the tensors it reads."""
    m = modules.get(node.target) if node.op == "call_module" else None
    name = type(m).__name__ if m is not None else getattr(node.target, "__name__", node.target)
    name = str(name).replace("_", "").lower()  # nn.MaxPool2d, F.max_pool2d and x.relu_() alike
    if name in ("linear", "conv1d", "conv2d", "conv3d") and getattr(m, "groups", 1) == 1:
        return "open" if name != "linear" or len(shape_of(node)) == 2 else "other"  # Linear: units on the last axis
    if name in PER_UNIT or (name in ("mul", "truediv") and len(node.all_input_nodes) == 1):
        return "carry"  # x + y, x * 0.5 keep the units; a product of two tensors (a gate) is "other"
    kinds = {"batchnorm1d": "normalise", "batchnorm2d": "normalise", "batchnorm3d": "normalise", "flatten": "reshape",
             "view": "reshape", "reshape": "reshape", "mean": "mean", "size": "ignore", "dim": "ignore"}
    return kinds.get(name, "other")  # size, dim: numbers, not units; other: the input, the output, anything else

def shape_of(node):
    """The output shape that shape propagation recorded for a node, or None if its output is not one tensor."""
    meta = node.meta.get("tensor_meta")
    return tuple(meta.shape) if hasattr(meta, "shape") else None

def block_factor(node, kind):
    """Output entries per input entry on axis 1 (H*W for a flattened (B, C, H, W) map, else 1); None: units lost."""
    shape, before = shape_of(node), shape_of(node.all_input_nodes[0])
    if shape is None or before is None or min(len(shape), len(before)) < 2 or shape[0] != before[0]:
        return None
    if kind == "reshape" and len(shape) == 2 and shape[1] == math.prod(before[1:]):
        return math.prod(before[2:])  # (B, C, H, W) -> (B, C*H*W): each channel's H*W entries stay together
    if kind == "mean":
        dims = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
        dims = [dims] if isinstance(dims, int) else list(dims or [])
        if not dims or any(d % len(before) < 2 for d in dims):  # a mean over everything, the batch or the units
            return None
    same = all(shape_of(n) is not None and shape_of(n)[1:2] == shape[1:2] for n in node.all_input_nodes)
    return 1 if same else None

def join(parent, a, b):
    """Union-find, kept flat (parent[s] is s's root): merge the spaces of a and b into the smaller root (0 wins)."""
    keep, drop = sorted((parent[a], parent[b]))  # the two roots
    parent[:] = [keep if p == drop else p for p in parent]

def trace_units(model, x):
    """Units through the traced graph: [(space, tensor, axis, block, is_statistic)] and the union-find of spaces."""
    import torch.fx
    from torch.fx.passes.shape_prop import ShapeProp
    try:
        traced = torch.fx.symbolic_trace(model)
        ShapeProp(traced).propagate(x)  # records each operation's output shape
    except Exception as err:  # data-dependent control flow, for one
        reason = (str(err).strip() or type(err).__name__).splitlines()[0]
        raise ValueError(f"permutation_groups: torch.fx cannot trace {type(model).__name__} ({reason}); "
                         f"alignment needs a forward without data-dependent control flow") from None
    modules = dict(model.named_modules())
    entries = []
    parent = [0]  # space 0: units kept in place (those of the input, the output, anything not understood)
    unit = {}  # node -> (space of its output's axis 1, entries per unit along that axis)
    for node in traced.graph.nodes:
        kind = operation_kind(node, modules)
        inputs = [unit[n] for n in node.all_input_nodes if n in unit]
        factor = block_factor(node, kind) if kind not in ("open", "other", "ignore") and inputs else None
        space, block = inputs[0] if inputs else (0, 1)  # the units of the first tensor it reads
        if kind == "open" and len(inputs) == 1:
            entries.append((space, f"{node.target}.weight", 1, block, False))  # the units it reads
            parent.append(len(parent))  # a new space: the units it writes
            entries += [(parent[-1], f"{node.target}.{name}", 0, 1, False) for name in ("weight", "bias")
                        if getattr(modules[node.target], name) is not None]  # one entry per unit it writes
            unit[node] = (parent[-1], 1)
        elif factor is not None and all(b == block for _, b in inputs):  # the units stay on axis 1, in one order
            for other, _ in inputs[1:]:  # x + y (a residual connection): both sides share one order of units
                join(parent, space, other)
            unit[node] = (space, block * factor)
            for name in ("weight", "bias", "running_mean", "running_var"):  # BatchNorm's tensors: one entry per unit
                if kind == "normalise" and getattr(modules[node.target], name) is not None:
                    entries.append((space, f"{node.target}.{name}", 0, block, name.startswith("running_")))
        elif kind != "ignore":  # the spaces this operation touches stay as they are, and so does its output's
            for space, _ in inputs:
                join(parent, space, 0)
            unit[node] = (0, 1)
    return entries, parent

@torch.no_grad()
def permutation_groups(model, x):
    """{name: Group} of hidden units that can be reordered without changing model(x) (traced, then self-checked)."""
    probe = copy.deepcopy(model).eval()  # traced and checked on a copy: the model stays as it was
    entries, parent = trace_units(probe, x)
    holder = {}
    for space, tensor, axis, _, _ in entries:  # one tensor axis met in two spaces: they are one space
        join(parent, space, holder.setdefault((tensor, axis), space))
    members = {}
    for space, *entry in entries:
        members.setdefault(parent[space], {})[tuple(entry)] = None  # an ordered set: a layer used twice
    state = probe.state_dict()
    groups = {}
    for space, found in members.items():
        tensors = [(t, axis, block) for t, axis, block, statistic in found if not statistic]
        statistics = [(t, axis, block) for t, axis, block, statistic in found if statistic]
        sizes = {divmod(state[t].shape[axis], block) for t, axis, block, _ in found}  # {(units, 0)} if consistent
        if space == 0 or not tensors or len(sizes) != 1 or next(iter(sizes))[1] != 0:
            continue  # left as it is: alignment may be partial, never a different function
        groups[tensors[0][0].rpartition(".")[0]] = Group(next(iter(sizes))[0], tensors, statistics)  # its first layer
    gen = torch.Generator().manual_seed(0)
    probe.double()  # float64: a real change of function stands far above rounding
    noisy = {k: v + 0.1 * torch.rand(v.shape, generator=gen, dtype=v.dtype).to(v.device)  # additive: zero-initialised
             if v.is_floating_point() else v for k, v in probe.state_dict().items()}  # tensors take part too
    before = functional_call(probe, noisy, (x[:2].double(),))
    for name, group in groups.items():
        shuffled = permute_units(noisy, {name: torch.randperm(group.units, generator=gen)}, groups)
        after = functional_call(probe, shuffled, (x[:2].double(),))
        if not torch.allclose(after, before, rtol=1e-6, atol=1e-6 * before.abs().max().item()):
            raise ValueError(f"permutation_groups: reordering the units of group {name} changes the outputs of "
                             f"{type(model).__name__}; this network cannot be aligned here")
    return groups

def permute_units(params, perms, groups):
    """The same function with hidden units reordered: along every axis of groups[name], slot u takes unit perm[u]."""
    out = dict(params)
    for name, perm in perms.items():
        for tensor, axis, block in groups[name].tensors + groups[name].statistics:
            if tensor not in out:  # a parameter dict has no running statistics
                continue
            if out[tensor].dim() <= axis or out[tensor].shape[axis] != len(perm) * block:
                raise ValueError(f"weights: tensor {tensor} does not hold {len(perm)} units along axis {axis}")
            moved = out[tensor].unflatten(axis, (-1, block)).index_select(axis, perm.to(out[tensor].device))
            out[tensor] = torch.empty_like(params[tensor]).copy_(moved.flatten(axis, axis + 1))  # layout kept
    return out

@torch.no_grad()
def match_weights(w1, w2, groups, max_rounds=100):
    """Weight matching (Git Re-Basin): pi(w2) maximising <w1, pi(w2)>, one group at a time until no group changes."""
    from scipy.optimize import linear_sum_assignment
    perms = {name: torch.arange(group.units) for name, group in groups.items()}
    for tensor in dict.fromkeys(t for group in groups.values() for t, _, _ in group.tensors):  # in the groups' order
        if tensor not in w1 or tensor not in w2 or w1[tensor].shape != w2[tensor].shape:  # two weights of one network
            found = [f"of shape {tuple(w[tensor].shape)}" if tensor in w else "missing" for w in (w1, w2)]
            raise ValueError(f"weights: tensor {tensor} is {found[0]} in w1, {found[1]} in w2: not one network's")
    permute_units(w1, perms, groups)  # ValueError if a tensor's axis does not hold its group's units
    for _ in range(max_rounds):
        before = dict(perms)
        for name, group in groups.items():
            others = {k: p for k, p in perms.items() if k != name}  # every other group as it stands
            moved = permute_units({t: w2[t] for t, _, _ in group.tensors}, others, groups)
            similarity = 0  # (units of w1, units of w2): sum over the group's tensors of <w1's unit u, w2's unit v>
            for t, axis, _ in group.tensors:  # one row per unit, holding every entry of the tensor that it owns
                rows1 = w1[t].double().movedim(axis, 0).reshape(group.units, -1)
                rows2 = moved[t].double().movedim(axis, 0).reshape(group.units, -1)
                similarity = similarity + rows1 @ rows2.T
            perms[name] = torch.as_tensor(linear_sum_assignment(similarity.cpu().numpy(), maximize=True)[1])
        if all(torch.equal(perms[name], before[name]) for name in perms):  # a round that changed nothing
            break
    return permute_units(w2, perms, groups)

def layerwise_barriers(model, w1, targets, ts, data, eval_train, bn_images=2000, log=print, precision=torch.float32):
    """Barriers [path][layer] when one layer's own tensors move from w1 to targets[path]; its error at t=1."""
    layers = dict.fromkeys(name.rpartition(".")[0] for name, _ in model.named_parameters())  # in definition order
    paths = {}
    for path, target in targets.items():
        for layer in layers:  # this module's weight, bias and statistics, not those of modules inside it
            step = {k: target[k] - v if k.rpartition(".")[0] == layer else torch.zeros_like(v) for k, v in w1.items()}
            paths[f"{path} {layer}"] = ([w1, step], lambda t, n: [1.0, t])  # w1 + t step: the other layers stay w1
    out = {path: {} for path in targets}
    metrics = sweep(model, paths, ts, data, eval_train=eval_train, bn_images=bn_images, log=log, precision=precision)[0]
    for name, m in metrics.items():
        path, layer = name.split()
        out[path][layer] = {"test_error": barrier([1 - a for a in m["test_acc"]], ts),
                            "train_loss": barrier(m["train_loss"], ts), "swapped_test_error": 1 - m["test_acc"][-1]}
    return out


# ──── │ 10. Landscape │ ─────────────────────────────────────────────────────────────────────────
def landscape(model, w1, theta, w2, coords, x, y, bn_x=None, batch_size=256, log=print, precision=torch.float32):
    """Test loss at a w1 + b w2 + (1 - a - b) theta for (a, b) in coords x coords (rows b); BN statistics from bn_x."""
    rows = []
    start = time.perf_counter()
    for b in coords:  # w1 at (1, 0), w2 at (0, 1), theta at (0, 0); c_0 w1 + c_1 theta + c_2 w2 at (c_0, c_2)
        points = [curve_point([w1, theta, w2], [a, 1 - a - b, b]) for a in coords]
        if bn_x is not None:
            points = [recompute_bn(model, w, bn_x, batch_size, precision) for w in points]
        rows.append([evaluate(model, w, x, y, batch_size=batch_size, precision=precision)[0] for w in points])
        progress(log, "landscape rows", len(rows), len(coords), start)
    return rows


# ──── │ 11. Plots │ ─────────────────────────────────────────────────────────────────────────────
def save_figure(axes, path, grid=True, **legend):
    """Legends below the axes (off the data) and grids, then their Figure to PNG via a temporary file."""
    for ax in axes:
        ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.16), **legend)
        if grid:
            ax.grid(alpha=0.3)
    write_atomic(path, lambda tmp: axes[0].figure.savefig(tmp, format="png", dpi=130, bbox_inches="tight"))

def plot_landscape(losses, coords, curve_xy, names, title, path):
    """Filled contour of the loss grid (log levels), the curve, the line, and names of w1, w2, theta at their places."""
    from matplotlib.figure import Figure
    z = np.maximum(np.array(losses), 1e-6)  # log levels need positive values
    inside = [i for i, c in enumerate(coords) if 0 <= c <= 1] or list(range(len(coords)))  # around w1, w2, theta
    top = max(z[np.ix_(inside, inside)].max(), 1.01 * z.min())  # the far corners, higher still, share the top colour
    ax = Figure(figsize=(6, 5)).subplots()
    levels = np.geomspace(z.min(), top, 24)
    cs = ax.contourf(coords, coords, np.minimum(z, top), levels=levels, norm="log", cmap="viridis_r")
    round_values = [m * 10.0 ** k for k in range(-3, 5) for m in (1, 2, 5)]  # 0.001, 0.002, 0.005, ..., 50000
    ticks = [z.min()] + [t for t in round_values if z.min() * 1.3 < t <= top]  # the lowest loss, then round values
    ax.figure.colorbar(cs, ax=ax, label="test loss (nats, log scale)", ticks=ticks, format="{x:.3g}")
    ax.plot([1, 0], [0, 1], "--", color="white", lw=1.5, label="straight line")
    if curve_xy:  # a curve of several bends leaves the plane: not drawn
        ax.plot(*zip(*curve_xy, strict=True), "-", color="tab:red", lw=2, label="trained curve")
    for name, xy in zip(names, [(1.0, 0.0), (0.0, 1.0), (0.0, 0.0)], strict=True):  # places of w1, w2, theta
        ax.plot(*xy, "o", color="black", ms=6)
        ax.annotate(name, xy, xytext=(6, 6), textcoords="offset points", fontsize=11, weight="bold")
    ax.set(xlabel=f"a (towards {names[0]})", ylabel=f"b (towards {names[1]})", title=title)
    save_figure([ax], path, grid=False, ncols=2, fontsize=8, facecolor="0.6")  # grey: the white line shows

PATH_STYLES = {"curve": ("o-", "tab:red"), "line": ("s--", "tab:gray"), "aligned": ("^-.", "tab:green")}
ENSEMBLE_COLOURS = {"w1": "tab:blue", "w2": "tab:cyan", "w1+w2": "tab:purple", "curve": "tab:red",
                    "fge": "tab:orange", "simplex": "tab:brown"}  # the curve's red is the curve's in every figure

def plot_sweep(ts, metrics, layerwise, title, path):
    """Test error and train loss along t on each path, then each layer's test-error barrier (layerwise)."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import LogLocator, NullFormatter
    axes = Figure(figsize=(15, 3.8)).subplots(1, 3, gridspec_kw={"wspace": 0.3})
    for name, m in metrics.items():
        style, color = PATH_STYLES.get(name, (":", PATH_STYLES[name.split("_")[0]][1]))  # *_interpolated_bn: dotted
        axes[0].plot(ts, [100 * (1 - a) for a in m["test_acc"]], style, color=color, label=name)
        axes[1].plot(ts, m["train_loss"], style, color=color, label=name)
    axes[0].set(xlabel="t", ylabel="test error (%)", title=title)
    axes[1].set(xlabel="t", ylabel="train loss (nats)", yscale="log", title="train loss along t")
    axes[1].yaxis.set_major_locator(LogLocator(subs=(1, 2, 5)))  # 0.1, 0.2, 0.5, 1, 2: labels that read as numbers
    axes[1].yaxis.set_major_formatter("{x:g}")
    axes[1].yaxis.set_minor_formatter(NullFormatter())  # minor ticks unlabelled: no 3x10^-1 beside 0.5
    layers = list(layerwise["line"])
    for i, (name, barriers) in enumerate(layerwise.items()):
        heights = [100 * barriers[layer]["test_error"] for layer in layers]  # points of test error
        axes[2].bar(np.arange(len(layers)) + 0.4 * i, heights, 0.4, color=PATH_STYLES[name][1], label=name)
    axes[2].set_xticks(np.arange(len(layers)) + 0.2, layers)
    axes[2].set(ylabel="test-error barrier (points)", title="one layer moves from w1, the others stay")
    flat = [name for name, barriers in layerwise.items() if max(b["test_error"] for b in barriers.values()) <= 0]
    if flat:  # the paths on which no layer rises above its chord: bars of height 0 would be invisible, say so
        axes[2].text(0.98, 0.95, f"{' and '.join(flat)}: no barrier at any layer", ha="right", va="top",
                     transform=axes[2].transAxes)
    save_figure(axes, path, ncols=2)

def plot_ensembles(ts, ens, pairs, title, path):
    """Accuracy of each ensemble against its cost, reliability diagram, and {w1, phi(t)} pairs along t, in percent."""
    from matplotlib.figure import Figure
    axes = Figure(figsize=(18, 4.5)).subplots(1, 3, gridspec_kw={"wspace": 0.25})
    axes[0].figure.suptitle(f"{title}: ensembles", y=1.02)
    for name, e in ens.items():  # a legend, not labels at the points: points of similar cost would collide
        label = f"{name}: {e['size']} network(s), NLL {e['nll']:.3f}, ECE {e['ece']:.3f}"
        axes[0].plot(e["epochs"], 100 * e["acc"], "o", ms=8, color=ENSEMBLE_COLOURS.get(name), label=label)
    axes[0].set(xlabel="training epochs beyond w1", ylabel="test accuracy (%)", title="accuracy against cost")
    best = max((n for n in ens if n not in ("w1", "w2", "w1+w2")), key=lambda n: ens[n]["acc"])
    axes[1].plot([0, 100], [0, 100], ":", color="black", lw=1, label="perfect calibration")
    for name in ("w1", "w1+w2", best):
        bins = ens[name]["reliability"]  # mean confidence, accuracy and image count of each non-empty bin
        share = np.array(bins["count"]) / sum(bins["count"])
        conf, acc = 100 * np.array(bins["confidence"]), 100 * np.array(bins["accuracy"])
        axes[1].plot(conf, acc, "-", color=ENSEMBLE_COLOURS.get(name), lw=1, label=name)
        axes[1].scatter(conf, acc, s=4 + 400 * share, color=ENSEMBLE_COLOURS.get(name))
    axes[1].set(xlabel="confidence (%)", ylabel="accuracy (%)", title="reliability (dot area: images in the bin)")
    for name, accs in pairs.items():
        axes[2].plot(ts, 100 * np.array(accs), PATH_STYLES[name][0], color=PATH_STYLES[name][1],
                     label=f"{{w1, phi(t)}} on the {name.replace('aligned', 'aligned line')}")
    axes[2].axhline(100 * ens["w1+w2"]["acc"], color=ENSEMBLE_COLOURS["w1+w2"], lw=1, label="{w1, w2}")
    axes[2].set(xlabel="t", ylabel="test accuracy (%)", title="two-model ensemble along t")
    save_figure(axes, path, fontsize=8)


# ──── │ 12. Command line │ ──────────────────────────────────────────────────────────────────────
def run_stage(args, name, compute, timings, log=print):
    """compute() -> dict with "images", saved as OUT/<name>-<hash of its options>.pt (--resume: loaded back); timed."""
    meta = {k: vars(args)[k] for k in STAGE_OPTIONS[name]}  # the options the stage depends on
    path = Path(args.out) / f"{name}-{hashlib.sha1(json.dumps(meta, sort_keys=True).encode()).hexdigest()[:10]}.pt"
    if args.resume and path.exists():
        try:  # the file's name holds the hash of its options: it belongs to this configuration
            result = torch.load(path, map_location=args.device, weights_only=True)["result"]
        except Exception as err:
            raise ValueError(f"{path}: unreadable checkpoint ({type(err).__name__}); delete it") from None
        log(f"resume: reusing {path}")
    else:
        start = time.perf_counter()
        result = {**compute(), "seconds": time.perf_counter() - start}
        write_atomic(path, lambda tmp: torch.save({"meta": meta, "result": result}, tmp))
    timings[name] = {"seconds": result["seconds"], "images_per_s": result["images"] / result["seconds"]}
    return result

COEFFS = {"bezier": bezier_coeffs, "polychain": polychain_coeffs}  # --curve
PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16}  # --precision
QUICK = {"epochs": 4, "curve_epochs": 12, "curve_lr": 0.02, "batch_size": 64, "train_subset": 4000,
         "test_subset": 500, "eval_train": 500, "points": 11, "grid": 9, "eval_test": 250, "width": 8, "fge_cycles": 2,
         "fge_cycle_epochs": 1, "simplex_vertices": 2, "simplex_epochs": 1, "bn_images": 250}

# The options each stage depends on (its own and those of the stages it builds on): they name its checkpoint.
DATA_OPTIONS = ["dataset", "data_dir", "train_subset", "test_subset", "seed", "width", "batchnorm", "epochs",
                "batch_size", "lr", "wd", "no_augment", "precision"]
CURVE_OPTIONS = DATA_OPTIONS + ["curve", "bends", "curve_epochs", "curve_lr", "align_curve"]
STAGE_OPTIONS = {"endpoints": DATA_OPTIONS, "curve": CURVE_OPTIONS,
                 "sweep": CURVE_OPTIONS + ["points", "eval_train", "bn_images"],
                 "fge": DATA_OPTIONS + ["fge_cycles", "fge_cycle_epochs", "fge_lr", "bn_images"],
                 "simplex": DATA_OPTIONS + ["curve_lr", "simplex_vertices", "simplex_epochs", "bn_images"],
                 "layerwise": DATA_OPTIONS + ["eval_test", "bn_images"],
                 "landscape": CURVE_OPTIONS + ["grid", "eval_test", "bn_images"]}

def build_parser():
    """The command line's options, in groups: data, training, curve, fast ensembles, evaluation, run control."""
    p = argparse.ArgumentParser(prog="modeconnectivity.py", description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)  # --help shows defaults

    def error(message):  # one line, without the usage block
        p.exit(2, f"{p.prog}: error: {message}\n")
    p.error = error

    def number(kind, low, strict=False):  # an argparse type: an int or float >= low (> low if strict)
        def parse(text):
            with contextlib.suppress(ValueError, OverflowError):  # not a number, or a huge one: as out of range
                value = kind(text)
                if math.isfinite(value) and (value > low or (value == low and not strict)):
                    return value
            raise argparse.ArgumentTypeError(f"{text!r}: must be {kind.__name__} {'>' if strict else '>='} {low}")
        return parse
    pos_int, pos_float, non_neg = number(int, 1), number(float, 0, strict=True), number(float, 0)
    g = p.add_argument_group("data").add_argument
    g("--dataset", default="cifar10", choices=DATASETS, help="data set")
    g("--data-dir", default="data", help="download and cache folder; for 'folder': the one with train/, test/")
    g("--train-subset", type=pos_int, help="use the first N training images (None: all; synthetic: 10000)")
    g("--test-subset", type=pos_int, help="use the first N test images (None: all; synthetic: 2000)")
    g("--no-augment", action="store_true", help="no random crop and flip (they are on for 3-channel images)")
    g = p.add_argument_group("model and training of the endpoints").add_argument
    g("--width", type=pos_int, default=32, help="ConvNet channels: width, 2*width, 4*width")
    g("--epochs", type=pos_int, default=30, help="epochs per endpoint")
    g("--batch-size", type=pos_int, default=128, help="training batch size (endpoints, curve, FGE, simplex)")
    g("--lr", type=pos_float, default=0.05, help="peak learning rate of the endpoints' one-cycle schedule")
    g("--wd", type=non_neg, default=5e-4, help="weight decay, as wd/2 ||w||^2 in the loss")
    g("--seed", type=int, default=0, help="seed of the first endpoint; the second uses seed+1")
    g("--batchnorm", action="store_true", help="BatchNorm after each convolution (statistics recomputed per point)")
    g = p.add_argument_group("curve").add_argument
    g("--curve", default="bezier", choices=sorted(COEFFS), help="curve family")
    g("--bends", type=pos_int, default=1, help="middle control points of the curve")
    g("--curve-epochs", type=pos_int, default=120, help="epochs of curve training")
    g("--curve-lr", type=pos_float, help="peak learning rate of curve and simplex training (None: --lr)")
    g("--align-curve", action="store_true", help="end the curve at w2 with its units aligned to w1's (same function)")
    g = p.add_argument_group("fast ensembles (FGE and simplex)").add_argument
    g("--fge-cycles", type=number(int, 0), default=4, help="FGE cycles from w1, one member each (0: skip FGE)")
    g("--fge-cycle-epochs", type=pos_int, default=2, help="epochs per FGE cycle")
    g("--fge-lr", type=pos_float, default=0.01, help="FGE learning rate at mid-cycle (its high point)")
    g("--simplex-vertices", type=number(int, 0), default=2, help="vertices added to w1 (0: skip the simplex)")
    g("--simplex-epochs", type=pos_int, default=3, help="training epochs per added vertex")
    g = p.add_argument_group("evaluation and landscape").add_argument
    g("--points", type=number(int, 2), default=21, help="evenly spaced t in [0, 1] for the sweep")
    g("--eval-train", type=pos_int, default=10000, help="training images for the train loss along t")
    g("--eval-test", type=pos_int, default=2000, help="images per landscape and layer-wise point (test and train)")
    g("--bn-images", type=pos_int, default=2000, help="training images that recompute BatchNorm statistics per point")
    g("--grid", type=number(int, 2), default=21, help="landscape grid lines per axis")
    g = p.add_argument_group("run control").add_argument
    g("--out", help="output folder (None: runs/<dataset>-<curve>)")
    g("--label", help="data set name in plot titles (None: --dataset, or the folder name)")
    g("--device", default="auto", choices=["auto", "cpu", "cuda", "mps"], help="device")
    g("--quick", action="store_true", help=f"a first look in under a minute: {QUICK} (your own options win)")
    g("--resume", action="store_true", help="reuse the finished stages in --out whose options match")
    g("--precision", default="auto", choices=["auto", *PRECISIONS], help="autocast precision of every forward pass "
      "(auto: bf16 on a GPU that has it, and on a CPU where a few training steps measure it 1.2x faster)")
    return p

def parse_args(argv):
    """Parse and check the options (a bad one: ValueError naming it and its value); create the --out folder."""
    parser = build_parser()
    parser.set_defaults(**(QUICK if parser.parse_args(argv).quick else {}))  # defaults, not the options you gave
    args = parser.parse_args(argv)
    args.curve_lr = args.curve_lr or args.lr
    available = {"cpu": True, "cuda": torch.cuda.is_available(), "mps": torch.backends.mps.is_available()}
    if args.device == "auto":
        args.device = next(d for d in ("cuda", "mps", "cpu") if available[d])
    elif not available[args.device]:
        raise ValueError(f"--device {args.device}: not available on this machine; use --device cpu or auto")
    args.out = args.out or f"runs/{args.dataset}-{args.curve}"
    Path(args.out).mkdir(parents=True, exist_ok=True)  # OSError (main: one line) now, or at the first checkpoint
    return args

def new_model(data, width, seed, batchnorm=False):
    """A ConvNet shaped for the data, on its device; its initial weights and dropout masks depend on the seed alone."""
    torch.manual_seed(seed)
    model = ConvNet(data.train_x.shape[1], len(data.classes), data.train_x.shape[2], width, batchnorm=batchnorm)
    return model.to(data.train_x.device, memory_format=torch.channels_last)

def choose_precision(requested, model, x, y, repeat=4):
    """(name, bf16 speed-up or None). auto: bf16 on a CUDA GPU with bf16, or on a CPU if it trains >= 1.2x faster."""
    if requested != "auto":
        return requested, None
    if x.device.type != "cpu":  # CUDA: bf16 if supported; MPS: float32
        return ("bf16" if x.device.type == "cuda" and torch.cuda.is_bf16_supported() else "fp32"), None
    probe = copy.deepcopy(model).train()  # timed on a copy: the model's weights stay as they were

    def step(precision):  # one forward and backward pass of training
        with autocast(x.device, precision):
            logits = probe(x)
        F.cross_entropy(logits.float(), y).backward()
    fp32 = min(timeit.repeat(partial(step, torch.float32), number=1, repeat=repeat))  # the fastest pass: the least
    bf16 = min(timeit.repeat(partial(step, torch.bfloat16), number=1, repeat=repeat))  # disturbed by other work
    return ("bf16" if fp32 / bf16 >= 1.2 else "fp32"), fp32 / bf16

def endpoints_stage(args, data, fit):
    """Both endpoints: one training function, seeds args.seed and args.seed + 1 (fit: what all SGD runs share)."""
    states, history = [], []
    for seed in (args.seed, args.seed + 1):
        model = new_model(data, args.width, seed, args.batchnorm)
        history += train_endpoint(model, data.train_x, data.train_y, args.epochs, lr=args.lr, seed=seed, **fit)
        states.append(detached(model.state_dict()))  # with BatchNorm: its running statistics too
    return {"states": states, "history": history, "images": sum(h["images"] for h in history)}

def sweep_stage(args, model, paths, ts, data, log):
    """The paths along t; with BatchNorm also the line and aligned line with the endpoints' statistics interpolated."""
    naive = {f"{path}_interpolated_bn": paths[path] for path in ("line", "aligned") if args.batchnorm}  # the naive view
    sweep_paths = partial(sweep, model, ts=ts, data=data, eval_train=args.eval_train, log=log,
                          precision=PRECISIONS[args.precision])  # what both sweeps share
    metrics, log_probs = sweep_paths(paths, bn_images=args.bn_images)
    metrics.update(sweep_paths(naive, bn_images=0)[0])  # 0: the endpoints' statistics interpolated, not recomputed
    per_point = min(args.eval_train, len(data.train_x)) + len(data.test_x)  # images evaluated at a point
    return {"metrics": metrics, "log_probs": log_probs, "images": len(ts) * (len(paths) + len(naive)) * per_point}

def fast_ensemble_stage(args, kind, model, w1, data, fit):
    """FGE snapshots ("fge") or samples of a simplex grown from w1: members, test log-probabilities, cost."""
    torch.manual_seed(args.seed + (3 if kind == "fge" else 4))  # dropout masks depend on the seed alone
    if kind == "fge":
        members, history = fge_snapshots(model, w1, data.train_x, data.train_y, lr_high=args.fge_lr, seed=args.seed + 3,
                                         cycles=args.fge_cycles, cycle_epochs=args.fge_cycle_epochs, **fit)
    else:
        vertices, history = train_simplex(model, [w1], data.train_x, data.train_y, new_vertices=args.simplex_vertices,
                                          epochs=args.simplex_epochs, lr=args.curve_lr, seed=args.seed + 4, **fit)
        gen = torch.Generator().manual_seed(args.seed + 5)  # 8 samples, fixed: free of training, a test pass each
        members = [curve_point(vertices, simplex_coeffs(len(vertices), gen)) for _ in range(8)]
    with_stats = [recompute_bn(model, w, data.train_x[:args.bn_images], precision=fit["precision"]) for w in members]
    log_probs = torch.stack([evaluate(model, w, data.test_x, data.test_y, precision=fit["precision"])[2]
                             for w in with_stats])
    return {"epochs": len(history), "members": members, "log_probs": log_probs,
            "history": history, "images": sum(h["images"] for h in history) + len(members) * len(data.test_x)}

def layerwise_stage(args, model, w1, targets, data, log):
    """Barriers with one layer moving from w1 to each target, on --eval-test train and test images per point."""
    ts = [i / 10 for i in range(11)]  # t = 0, 0.1, ..., 1 for every run: fixed, unlike the sweep's --points
    n = min(args.eval_test, len(data.train_x), len(data.test_x))  # train and test images per point
    small = data._replace(test_x=data.test_x[:n], test_y=data.test_y[:n])
    result = layerwise_barriers(model, w1, targets, ts, small, eval_train=n, bn_images=args.bn_images, log=log,
                                precision=PRECISIONS[args.precision])
    return {"barriers": result, "images": len(targets) * len(result["line"]) * len(ts) * 2 * n}

def landscape_stage(args, model, points, data, log):
    """Loss on a grid in the plane of w1, w2 and theta (phi(0.5) for several bends), and the curve in it (one bend)."""
    coeffs = COEFFS[args.curve]
    theta = points[1] if args.bends == 1 else curve_point(points, coeffs(0.5, len(points)))
    coords = [-0.5 + 2 * i / (args.grid - 1) for i in range(args.grid)]  # w1, w2, theta at 0 and 1, half spare
    curve = [coeffs(i / 60, 3) for i in range(61)] if args.bends == 1 else []  # several bends leave the plane
    x, y = data.test_x[:args.eval_test], data.test_y[:args.eval_test]
    losses = landscape(model, points[0], theta, points[-1], coords=coords, x=x, y=y, log=log,
                       bn_x=data.train_x[:args.bn_images], precision=PRECISIONS[args.precision])
    names = ["w1", "aligned w2" if args.align_curve else "w2", "theta" if args.bends == 1 else "phi(0.5)"]
    return {"test_loss": losses, "coords": coords, "curve_xy": [(c[0], c[2]) for c in curve],  # see landscape
            "names": names, "images": len(coords) ** 2 * len(x)}

def collect_results(args, ts, metrics, ens, pairs, layers, land, timings, model, w1, data):
    """results.json: accuracies and errors as fractions in [0, 1], losses in nats, speed ratios in images/s."""
    passes = timeit.repeat(partial(evaluate, model, w1, data.test_x, data.test_y, precision=PRECISIONS[args.precision]),
                           number=1, repeat=3)  # seconds of plain inference, in the run's own precision
    plain = {"training": timings["endpoints"]["images_per_s"], "inference": len(data.test_x) / sorted(passes)[1]}
    against = {"training": ("curve", "fge", "simplex"), "inference": ("sweep", "layerwise", "landscape")}
    speed = {f"{name}_vs_plain_{kind}": timings[name]["images_per_s"] / plain[kind]  # each stage against plain ones
             for kind, names in against.items() for name in names if name in timings}
    barriers = {path: {"train_loss": barrier(m["train_loss"], ts),
                       "test_error": barrier([1 - a for a in m["test_acc"]], ts)} for path, m in metrics.items()}
    return {"config": vars(args),
            "versions": {"python": sys.version.split()[0], "torch": torch.__version__, "device": args.device,
                         "threads": torch.get_num_threads(), "precision": args.precision},
            "endpoints": [{"seed": args.seed + i, **{k: v[end] for k, v in metrics["curve"].items()}}
                          for i, end in enumerate((0, -1))],
            "sweep": {"t": ts, **metrics}, "barrier": barriers, "ensemble": {**ens, "pair_along_t": pairs},
            "layerwise": layers, "timings": timings,
            "landscape": {"plane": "squeezed", "range": [land["coords"][0], land["coords"][-1]], "grid": args.grid,
                          **{k: land[k] for k in ("test_loss", "coords", "curve_xy", "names")}},
            "efficiency": {"plain_inference_images_per_s": plain["inference"], **speed}}

def run(args, log=print):
    """The recipe, one call per stage from the data to the figures; writes everything to args.out, returns results."""
    out = Path(args.out)
    t0 = time.perf_counter()
    data = load_data(args.dataset, args.data_dir, args.device, train_size=args.train_subset, test_size=args.test_subset,
                     seed=args.seed, log=log)
    timings = {"data": {"seconds": time.perf_counter() - t0, "images_per_s": None}}  # no image through the network
    label = args.label or (Path(args.data_dir).name if args.dataset == "folder" else args.dataset)  # in titles
    log(f"data: {label}, {len(data.train_x)} train and {len(data.test_x)} test images {tuple(data.train_x.shape[1:])}")
    requested = args.precision
    probe = new_model(data, args.width, args.seed, args.batchnorm)  # timed on one batch, then dropped
    batch = (data.train_x[:args.batch_size], data.train_y[:args.batch_size])
    args.precision, speedup = choose_precision(requested, probe, *batch)  # checkpoints are named with the choice
    log(f"precision: {args.precision} ({requested}" + (f"; bf16 trained {speedup:.2f}x as fast)" if speedup else ")"))
    stage = partial(run_stage, args, timings=timings, log=log)  # stage(name, compute) -> result, computed or reused
    fit = {"batch_size": args.batch_size, "weight_decay": args.wd, "log": log, "precision": PRECISIONS[args.precision],
           "augment_pad": 0 if args.no_augment or data.train_x.shape[1] != 3 else 4}  # what every SGD run shares
    w1, w2 = stage("endpoints", lambda: endpoints_stage(args, data, fit))["states"]
    model = new_model(data, args.width, args.seed + 2, args.batchnorm)  # functional_call gives its weights
    aligned = match_weights(w1, w2, permutation_groups(model, data.train_x[:4]))  # w2's units in w1's order

    def curve_stage():  # the curve from w1 to w2, or to the aligned w2
        points, history = train_curve(model, w1, aligned if args.align_curve else w2, data.train_x, data.train_y,
                                      coeffs=COEFFS[args.curve], bends=args.bends, epochs=args.curve_epochs,
                                      lr=args.curve_lr, seed=args.seed + 2, **fit)
        return {"points": points, "history": history, "images": sum(h["images"] for h in history)}
    points = stage("curve", curve_stage)["points"]
    paths = {"curve": (points, COEFFS[args.curve]), "line": ([w1, w2], bezier_coeffs),
             "aligned": ([w1, aligned], bezier_coeffs)}
    ts = [i / (args.points - 1) for i in range(args.points)]
    sw = stage("sweep", lambda: sweep_stage(args, model, paths, ts, data, log))
    curve_lp = sw["log_probs"]["curve"]  # (T, N, C) along t; each ensemble's log-probs, cost in epochs beyond w1:
    members = {"w1": (curve_lp[:1], 0), "w2": (curve_lp[-1:], args.epochs), "w1+w2": (curve_lp[[0, -1]], args.epochs),
               "curve": (curve_lp, args.epochs + args.curve_epochs)}
    for kind, size in (("fge", args.fge_cycles), ("simplex", args.simplex_vertices)):  # the fast ensembles
        if size > 0:  # 0 cycles or 0 vertices skip one
            fast = stage(kind, partial(fast_ensemble_stage, args, kind, model, w1, data=data, fit=fit))
            members[kind] = (fast["log_probs"], fast["epochs"])
    ens = {name: {**ensemble_metrics(lp, data.test_y), "size": len(lp), "epochs": cost}
           for name, (lp, cost) in members.items()}
    pairs = {path: [ensemble_metrics(lp[[0, i]], data.test_y)["acc"] for i in range(len(lp))]  # {phi(0), phi(t)}
             for path, lp in sw["log_probs"].items()}
    targets = {"line": w2, "aligned": aligned}
    layers = stage("layerwise", lambda: layerwise_stage(args, model, w1, targets, data, log))["barriers"]
    land = stage("landscape", lambda: landscape_stage(args, model, points, data, log))
    t0 = time.perf_counter()
    plot_landscape(land["test_loss"], land["coords"], land["curve_xy"], land["names"],
                   title=f"{label}: test loss in the plane of {', '.join(land['names'])}", path=out / "landscape.png")
    plot_sweep(ts, sw["metrics"], layers, f"{label}: {args.curve} curve vs straight lines", out / "sweep.png")
    plot_ensembles(ts, ens, pairs, label, out / "ensembles.png")
    timings["plots"] = {"seconds": time.perf_counter() - t0, "images_per_s": None}
    results = collect_results(args, ts, sw["metrics"], ens=ens, pairs=pairs, layers=layers, land=land,
                              timings=timings, model=model, w1=w1, data=data)
    results["versions"].update(precision_requested=requested, bf16_training_speedup=speedup)
    write_atomic(out / "results.json", lambda tmp: tmp.write_text(json.dumps(results, indent=1)))
    barriers = ", ".join(f"{path} {b['test_error']:.4f}" for path, b in results["barrier"].items())
    log(f"done: test-error barriers {barriers}; wrote {out}/results.json")
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
