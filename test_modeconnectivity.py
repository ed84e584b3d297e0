"""Tests on tiny synthetic data: python -m pytest (about 70 to 90 s on two CPU cores, no network)."""
import builtins
import contextlib
import json
import math
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call

import modeconnectivity as mc

HERE = Path(__file__).resolve().parent
TINY = ["--dataset", "synthetic", "--train-subset", "512", "--test-subset", "128", "--width", "4", "--epochs", "2",
        "--curve-epochs", "10", "--batch-size", "64", "--points", "3", "--grid", "3", "--eval-train", "128",
        "--eval-test", "64", "--device", "cpu", "--fge-cycles", "2", "--fge-cycle-epochs", "1",
        "--simplex-vertices", "1", "--simplex-epochs", "1", "--precision", "fp32"]


def tiny_data(size=16):
    return mc.load_data("synthetic", None, "cpu", train_size=512, test_size=256, seed=0, image_size=size)


def random_params(seed, width=4, size=16):
    torch.manual_seed(seed)
    return {k: v.detach() for k, v in mc.ConvNet(3, 10, size, width).named_parameters()}


def metrics_only(results):
    """results.json without the wall-clock parts, which differ between runs."""
    return {k: v for k, v in results.items() if k not in ("timings", "efficiency", "config")}


@pytest.fixture(scope="module")
def trained():
    """Two endpoints trained from different seeds on tiny 16x16 data, shared by the curve tests."""
    data = tiny_data()
    model = mc.ConvNet(3, 10, 16, width=16)
    ends = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        m = mc.ConvNet(3, 10, 16, width=16)
        mc.train_endpoint(m, data.train_x, data.train_y, epochs=10, batch_size=32, lr=0.05,
                          weight_decay=5e-4, augment_pad=2, seed=seed, log=lambda s: None)
        ends.append({k: v.detach() for k, v in m.named_parameters()})
    return data, model, ends


# ── 4. Curves: coefficients against hand-computed values ─────────────────────────────────────────
def test_bezier_coeffs_by_hand():
    assert mc.bezier_coeffs(0.25, 3) == pytest.approx([0.5625, 0.375, 0.0625])
    assert mc.bezier_coeffs(0.5, 4) == pytest.approx([1 / 8, 3 / 8, 3 / 8, 1 / 8])
    assert mc.bezier_coeffs(0.0, 3) == [1, 0, 0] and mc.bezier_coeffs(1.0, 3) == [0, 0, 1]
    assert mc.bezier_coeffs(0.3, 2) == pytest.approx([0.7, 0.3])  # the straight line


def test_polychain_coeffs_by_hand():
    assert mc.polychain_coeffs(0.25, 3) == pytest.approx([0.5, 0.5, 0.0])
    assert mc.polychain_coeffs(0.5, 3) == pytest.approx([0.0, 1.0, 0.0])
    assert mc.polychain_coeffs(0.75, 3) == pytest.approx([0.0, 0.5, 0.5])
    assert mc.polychain_coeffs(0.5, 4) == pytest.approx([0.0, 0.5, 0.5, 0.0])
    assert mc.polychain_coeffs(0.3, 2) == pytest.approx([0.7, 0.3])


@pytest.mark.parametrize("fn", [mc.bezier_coeffs, mc.polychain_coeffs])
@pytest.mark.parametrize("n", [2, 3, 4, 6])
def test_coeffs_sum_to_one_and_are_nonnegative(fn, n):
    for i in range(101):
        c = fn(i / 100, n)
        assert len(c) == n and sum(c) == pytest.approx(1.0, abs=1e-12) and min(c) >= 0


def test_curve_point_endpoints_bend_and_line():
    w1, theta, w2 = random_params(0), random_params(1), random_params(2)
    for fn in (mc.bezier_coeffs, mc.polychain_coeffs):
        for t, target in ((0.0, w1), (1.0, w2)):
            phi = mc.curve_point([w1, theta, w2], fn(t, 3))
            assert all(torch.equal(phi[k], target[k]) for k in w1)  # exact, not approximately
    bend = mc.curve_point([w1, theta, w2], mc.polychain_coeffs(0.5, 3))
    assert all(torch.equal(bend[k], theta[k]) for k in w1)
    for fn in (mc.bezier_coeffs, mc.polychain_coeffs):
        phi = mc.curve_point([w1, w2], fn(0.3, 2))
        assert all(torch.allclose(phi[k], 0.7 * w1[k] + 0.3 * w2[k], atol=1e-7) for k in w1)


def test_curve_point_is_the_bezier_formula():
    w1, theta, w2 = random_params(0), random_params(1), random_params(2)
    t = 0.3
    phi = mc.curve_point([w1, theta, w2], mc.bezier_coeffs(t, 3))
    for k in w1:
        expected = (1 - t) ** 2 * w1[k] + 2 * t * (1 - t) * theta[k] + t ** 2 * w2[k]
        assert torch.allclose(phi[k], expected, atol=1e-6)


def test_curve_bad_input():
    w1, w2 = random_params(0), random_params(1)
    for bad_t in (-0.1, 1.5):
        with pytest.raises(ValueError, match="t = "):
            mc.bezier_coeffs(bad_t, 3)
        with pytest.raises(ValueError, match="t = "):
            mc.polychain_coeffs(bad_t, 3)
    with pytest.raises(ValueError, match="at least 2"):
        mc.curve_point([w1], [1.0])
    other = dict(w2)
    other["extra"] = other.pop("fc2.bias")
    with pytest.raises(ValueError, match="names or shapes"):
        mc.curve_point([w1, other], [0.5, 0.5])
    wider = random_params(1, width=8)
    with pytest.raises(ValueError, match="names or shapes"):
        mc.curve_point([w1, wider], [0.5, 0.5])


# ── 2. Model and 1. Data ──────────────────────────────────────────────────────────────────────────
def test_functional_forward_matches_module():
    model = mc.ConvNet(3, 10, 16, width=4).eval()
    x = torch.randn(5, 3, 16, 16)
    params = dict(model.named_parameters())
    assert torch.allclose(functional_call(model, params, (x,)), model(x), atol=1e-6)
    other = random_params(7)
    reference = mc.ConvNet(3, 10, 16, width=4).eval()
    reference.load_state_dict(other)
    assert torch.allclose(functional_call(model, other, (x,)), reference(x), atol=1e-6)


def test_augment_crops_and_flips():
    x = torch.arange(2 * 3 * 4 * 4, dtype=torch.float32).view(2, 3, 4, 4)
    out = mc.augment(x, 0, torch.Generator().manual_seed(0))  # no padding: only flips are possible
    for i in range(2):
        assert torch.equal(out[i], x[i]) or torch.equal(out[i], x[i].flip(2))
    out = mc.augment(x, 2, torch.Generator().manual_seed(1))
    assert out.shape == x.shape
    padded = F.pad(x, (2, 2, 2, 2))
    windows = [padded[i, :, r:r + 4, c:c + 4] for i in range(2) for r in range(5) for c in range(5)]
    for i in range(2):  # every output image is a 4x4 window of its padded image, maybe mirrored
        assert any(torch.equal(out[i], w) or torch.equal(out[i], w.flip(2)) for w in windows[25 * i:25 * (i + 1)])


def test_synthetic_data_is_deterministic_and_normalised():
    a, b = tiny_data(), tiny_data()
    assert torch.equal(a.train_x, b.train_x) and torch.equal(a.test_y, b.test_y)
    assert a.train_x.shape == (512, 3, 16, 16) and len(a.classes) == 10
    assert a.train_x.mean().abs() < 0.05 and (a.train_x.std() - 1).abs() < 0.05
    assert len(a.train_y.unique()) == 10


def write_folder(root, train_classes, test_classes, side=8):
    from PIL import Image
    for half, classes in (("train", train_classes), ("test", test_classes)):
        for k, name in enumerate(classes):
            (root / half / name).mkdir(parents=True)
            for i in range(3):
                Image.new("RGB", (side, side), (40 * k + i, 0, 255)).save(root / half / name / f"{i}.png")


def test_folder_dataset(tmp_path):
    write_folder(tmp_path, ["cat", "dog"], ["cat", "dog"])
    lines = []
    data = mc.load_data("folder", tmp_path, "cpu", log=lines.append)
    assert data.train_x.shape == (6, 3, 8, 8) and data.classes == ["cat", "dog"]
    assert len(lines) == 12 and "decoding" in lines[5] and "6/6 done, 0 left" in lines[5]  # each half: 6 images
    assert sorted(data.train_y.tolist()) == [0, 0, 0, 1, 1, 1] and data.train_y.tolist() != [0, 0, 0, 1, 1, 1]
    for x, y in zip(data.train_x, data.train_y, strict=True):  # shuffled once, images and labels together
        assert (x[0, 0, 0] > 0) == (y == 1)  # normalised red: cats (0-2) below the mean, dogs (40-42) above
    assert list(tmp_path.glob("folder-*-uint8.pt"))  # decoded once, cached for the next run
    lines.clear()
    assert torch.equal(mc.load_data("folder", tmp_path, "cpu", log=lines.append).train_x, data.train_x)
    assert lines == []  # from the cache: nothing to decode


def test_folder_dataset_errors(tmp_path):
    write_folder(tmp_path / "a", ["cat", "dog"], ["cat", "fish"])
    with pytest.raises(ValueError, match="classes"):
        mc.load_data("folder", tmp_path / "a", "cpu")
    (tmp_path / "b" / "train" / "cat").mkdir(parents=True)
    with pytest.raises(ValueError, match="expected a folder with train/<class>/<image> and test/<class>/<image>"):
        mc.load_data("folder", tmp_path / "b", "cpu")
    (tmp_path / "b" / "test" / "cat").mkdir(parents=True)
    with pytest.raises(ValueError, match="no images"):
        mc.load_data("folder", tmp_path / "b", "cpu")
    write_folder(tmp_path / "c", ["cat"], ["cat"], side=4)  # too small for three 2x2 max-pools
    with pytest.raises(ValueError, match=r">= 8 px; .*cat.\d\.png is 4x4"):
        mc.load_data("folder", tmp_path / "c", "cpu")


def test_folder_skips_hidden_names_and_names_bad_files(tmp_path):
    from PIL import Image
    write_folder(tmp_path / "plain", ["cat", "dog"], ["cat", "dog"])
    write_folder(tmp_path / "kept", ["cat", "dog"], ["cat", "dog"])
    (tmp_path / "kept" / "train" / "cat" / ".DS_Store").write_bytes(b"\0\0\0\1Bud1")  # what macOS leaves
    (tmp_path / "kept" / "test" / ".ipynb_checkpoints").mkdir()  # a hidden folder beside the classes
    a, b = (mc.load_data("folder", tmp_path / name, "cpu") for name in ("plain", "kept"))
    assert a.classes == b.classes == ["cat", "dog"] and torch.equal(a.train_x, b.train_x)
    caches = [{p.name for p in (tmp_path / name).glob("folder-*")} for name in ("plain", "kept")]
    assert caches[0] == caches[1] and len(caches[0]) == 1  # hidden names leave the cache's name alone
    (tmp_path / "kept" / "train" / "dog" / "notes.txt").write_text("not an image")
    with pytest.raises(ValueError, match=r"dog.notes\.txt is not a readable image"):
        mc.load_data("folder", tmp_path / "kept", "cpu")
    Image.new("RGB", (12, 10)).save(tmp_path / "plain" / "test" / "dog" / "big.png")  # 10 rows, 12 columns
    with pytest.raises(ValueError, match=r"test/ needs square images of one size.*\d\.png is 8x8, .*big\.png is 10x12"):
        mc.load_data("folder", tmp_path / "plain", "cpu")


def test_folder_decoding_prints_ten_progress_lines_ending_with_all(tmp_path):
    write_folder(tmp_path, ["cat"], ["cat"])
    from PIL import Image
    for i in range(3, 25):  # 25 training images, 3 test images
        Image.new("RGB", (8, 8), (i, 0, 0)).save(tmp_path / "train" / "cat" / f"{i}.png")
    lines = []
    mc.read_folder(tmp_path, log=lines.append)
    train = [line for line in lines if "train" in line]
    assert len(train) == 10 and "25/25 done, 0 left" in train[-1] and len(lines) == 13


def test_a_subset_smaller_than_a_batch_trains_on_one_batch_per_epoch(tmp_path):
    fewer_stages = ["--curve-epochs", "1", "--fge-cycles", "0", "--simplex-vertices", "0", "--grid", "2"]
    results = mc.main(TINY + fewer_stages + ["--train-subset", "5", "--out", str(tmp_path)])  # --batch-size 64
    assert results["timings"]["endpoints"]["images_per_s"] > 0 and (tmp_path / "results.json").exists()
    saved = torch.load(checkpoint(tmp_path, "endpoints"), weights_only=True)["result"]
    assert [h["images"] for h in saved["history"]] == [5] * len(saved["history"])  # every image, once per epoch


# ── 5. Curve training ─────────────────────────────────────────────────────────────────────────────
def test_train_curve_moves_only_the_middle_and_lowers_the_midpoint_loss(trained):
    data, model, (w1, w2) = trained
    torch.manual_seed(0)  # dropout masks: the same whichever tests ran before
    line_mid = mc.curve_point([w1, w2], [0.5, 0.5])
    before, _, _ = mc.evaluate(model, line_mid, data.train_x, data.train_y)
    points, history = mc.train_curve(model, w1, w2, data.train_x, data.train_y, mc.bezier_coeffs, 1, epochs=10,
                                     batch_size=32, lr=0.05, weight_decay=5e-4, augment_pad=2, seed=0,
                                     log=lambda s: None)
    assert len(points) == 3 and len(history) == 10
    assert all(torch.equal(points[0][k], w1[k]) and torch.equal(points[2][k], w2[k]) for k in w1)
    assert any(not torch.allclose(points[1][k], line_mid[k]) for k in w1)  # theta left the line
    after, _, _ = mc.evaluate(model, mc.curve_point(points, mc.bezier_coeffs(0.5, 3)), data.train_x, data.train_y)
    end_loss = max(mc.evaluate(model, w, data.train_x, data.train_y)[0] for w in (w1, w2))
    assert before > end_loss + 0.5  # the line's midpoint is a ridge on this data ...
    assert after < before - 0.5 * (before - end_loss)  # ... and the curve's closes at least half of that gap


def test_aligned_curve_starts_at_w1_and_ends_at_w2s_function(trained):
    data, model, (w1, w2) = trained
    aligned = mc.match_weights(w1, w2, convnet_groups(width=16))
    assert any(not torch.equal(aligned[k], w2[k]) for k in w2)  # other weights ...
    points, _ = mc.train_curve(model, w1, aligned, data.train_x[:128], data.train_y[:128], epochs=1, batch_size=32,
                               log=lambda s: None)
    assert all(torch.equal(points[0][k], w1[k]) for k in w1)
    model.eval()
    x = data.test_x[:32]  # ... the same function
    assert torch.allclose(functional_call(model, points[-1], (x,)), functional_call(model, w2, (x,)), atol=1e-4)


def test_chain_rule_and_only_middle_points_trained(trained):
    data, model, (w1, w2) = trained
    theta = {k: ((w1[k] + w2[k]) / 2).requires_grad_() for k in w1}
    ends = [{k: v.clone().requires_grad_() for k, v in w.items()} for w in (w1, w2)]
    phi = mc.curve_point([ends[0], theta, ends[1]], mc.bezier_coeffs(0.4, 3))
    loss = F.cross_entropy(functional_call(model, phi, (data.train_x[:32],)), data.train_y[:32])
    grads = torch.autograd.grad(loss, list(theta.values()) + list(ends[0].values()))
    g_theta, g_w1 = grads[:len(theta)], grads[len(theta):]
    # chain rule: dL/dtheta = c_1(t) dL/dphi and dL/dw1 = c_0(t) dL/dphi
    c0, c1, _ = mc.bezier_coeffs(0.4, 3)
    assert all(torch.allclose(gt / c1, gw / c0, atol=1e-5) for gt, gw in zip(g_theta, g_w1, strict=True))
    # train_curve's optimiser holds the middle points only: both bends move, the endpoints do not
    before = [{k: v.clone() for k, v in w.items()} for w in (w1, w2)]
    points, _ = mc.train_curve(model, w1, w2, data.train_x[:128], data.train_y[:128], mc.polychain_coeffs, 2,
                               epochs=4, batch_size=32, log=lambda s: None)
    assert len(points) == 4
    for k in w1:
        assert torch.equal(points[0][k], before[0][k]) and torch.equal(points[3][k], before[1][k])
        assert torch.equal(w1[k], before[0][k]) and torch.equal(w2[k], before[1][k])
    for i in (1, 2):  # started on the line at 1/3 and 2/3, then moved
        start = mc.curve_point([w1, w2], [1 - i / 3, i / 3])
        assert any(not torch.allclose(points[i][k], start[k]) for k in w1)


# ── 6-7. Sweep, barrier, ensembles ───────────────────────────────────────────────────────────────
def test_barrier_by_hand():
    ts = [0.0, 0.5, 1.0]
    assert mc.barrier([1.0, 5.0, 3.0], ts) == pytest.approx(3.0)  # 5 - (1 + 3) / 2
    assert mc.barrier([1.0, 1.0, 3.0], ts) == pytest.approx(0.0)  # below the chord: only the ends count


def test_ensemble_metrics_by_hand():
    p1 = torch.tensor([[0.9, 0.1], [0.7, 0.3], [0.2, 0.8], [0.6, 0.4], [0.9, 0.1]])
    p2 = torch.tensor([[0.8, 0.2], [0.2, 0.8], [0.3, 0.7], [0.1, 0.9], [0.8, 0.2]])
    y = torch.tensor([0, 0, 1, 0, 1])
    m = mc.ensemble_metrics(torch.stack([p1, p2]).log(), y, bins=10)
    # mean probabilities [.85 .15] [.45 .55] [.25 .75] [.35 .65] [.85 .15]: right on images 0 and 2
    assert m["acc"] == pytest.approx(0.4)
    assert m["nll"] == pytest.approx(-sum(map(math.log, (0.85, 0.45, 0.75, 0.35, 0.15))) / 5, rel=1e-5)
    # confidence bins: (.8, .9] holds images 0 (right) and 4 (wrong), then .55, .65 wrong and .75 right alone
    ece = (2 * abs(0.5 - 0.85) + abs(0 - 0.55) + abs(0 - 0.65) + abs(1 - 0.75)) / 5
    assert m["ece"] == pytest.approx(ece, rel=1e-5)
    bins = m["reliability"]  # the non-empty bins in order: .55, .65, .75 and (.8, .9]
    assert bins["count"] == [1, 1, 1, 2] and bins["accuracy"] == [0, 0, 1, 0.5]
    assert bins["confidence"] == pytest.approx([0.55, 0.65, 0.75, 0.85], rel=1e-5)
    single = mc.ensemble_metrics(p1.log()[None], y)
    assert single["nll"] == pytest.approx(-sum(map(math.log, (0.9, 0.7, 0.8, 0.6, 0.1))) / 5, rel=1e-5)
    assert torch.isfinite(torch.tensor(mc.ensemble_metrics(torch.full((3, 5, 2), -1e4), y)["nll"]))  # stable


# ── 8. Landscape ─────────────────────────────────────────────────────────────────────────────────
def test_landscape_places_w1_w2_theta_and_curve_points_at_their_coefficients(trained):
    data, model, (w1, w2) = trained
    theta = {k: v + 0.05 * torch.randn(v.shape, generator=torch.Generator().manual_seed(7)) for k, v in w1.items()}
    x, y = data.test_x[:64], data.test_y[:64]

    def loss(w):
        return mc.evaluate(model, w, x, y)[0]
    grid = mc.landscape(model, w1, theta, w2, [0.0, 0.25, 0.5, 1.0], x, y)  # grid[b][a], coords in this order
    assert grid[0][3] == pytest.approx(loss(w1), rel=1e-5)  # (a, b) = (1, 0)
    assert grid[3][0] == pytest.approx(loss(w2), rel=1e-5)  # (0, 1)
    assert grid[0][0] == pytest.approx(loss(theta), rel=1e-5)  # (0, 0)
    bezier = mc.curve_point([w1, theta, w2], mc.bezier_coeffs(0.5, 3))  # coefficients (1/4, 1/2, 1/4): at (1/4, 1/4)
    assert grid[1][1] == pytest.approx(loss(bezier), rel=1e-5)
    chain = mc.curve_point([w1, theta, w2], mc.polychain_coeffs(0.25, 3))  # (1/2, 1/2, 0): at (1/2, 0)
    assert grid[0][2] == pytest.approx(loss(chain), rel=1e-5)
    assert len({round(v, 6) for row in grid for v in row}) > 10  # 16 points, not one loss repeated


# ── 8. Fast ensembles: FGE and simplexes ─────────────────────────────────────────────────────────
def test_fge_schedule_by_hand():
    # 10 steps a cycle: up from lr_low to lr_high at step 5 (the middle), back to lr_low at step 10
    values = [mc.fge_lr(s, 10, 0.05, 0.001) for s in range(20)]
    assert values[4] == pytest.approx(0.05) and values[9] == pytest.approx(0.001) and values[19] == pytest.approx(0.001)
    assert values[0] == pytest.approx(0.001 + 0.049 * 0.2) and values[6] == pytest.approx(0.001 + 0.049 * 0.6)
    assert values[:10] == pytest.approx(values[10:])  # every cycle the same


def test_fge_one_snapshot_per_cycle_and_they_differ(trained):
    data, _, (w1, _) = trained
    model = mc.ConvNet(3, 10, 16, width=16)
    snaps, history = mc.fge_snapshots(model, w1, data.train_x[:256], data.train_y[:256], cycles=3, cycle_epochs=1,
                                      lr_high=0.05, lr_low=1e-4, batch_size=32, augment_pad=2, log=lambda s: None)
    assert len(snaps) == 3 and len(history) == 3 and snaps[0].keys() == w1.keys()
    for a, b in ((w1, snaps[0]), (snaps[0], snaps[1]), (snaps[1], snaps[2])):
        assert sum((a[k] - b[k]).square().sum().item() for k in a) > 1e-6


def test_simplex_coeffs_are_uniform_on_the_simplex():
    gen = torch.Generator().manual_seed(0)
    for k in (2, 3, 5):
        draws = torch.tensor([mc.simplex_coeffs(k, gen) for _ in range(4000)])
        assert (draws >= 0).all() and torch.allclose(draws.sum(1), torch.ones(4000, dtype=draws.dtype))
        assert draws.mean(0) == pytest.approx([1 / k] * k, abs=0.02)
    # Dirichlet(1, 1): the first coefficient is uniform on [0, 1], so its variance is 1/12
    two = torch.tensor([mc.simplex_coeffs(2, gen)[0] for _ in range(4000)])
    assert two.var().item() == pytest.approx(1 / 12, abs=0.01)


def test_simplex_volume_by_hand():
    def point(*xs):  # a "network" with one weight tensor: a point of the plane or of space
        return {"w": torch.tensor(xs, dtype=torch.float64)}
    assert mc.simplex_volume([point(0, 0), point(3, 4)]).item() == pytest.approx(5)  # a segment: its length
    assert mc.simplex_volume([point(0, 0), point(1, 0), point(0, 1)]).item() == pytest.approx(0.5)
    h = math.sqrt(3) / 2
    tetrahedron = [point(0, 0, 0), point(1, 0, 0), point(0.5, h, 0), point(0.5, h / 3, math.sqrt(2 / 3))]
    assert mc.simplex_volume(tetrahedron).item() == pytest.approx(1 / (6 * math.sqrt(2)))
    assert mc.simplex_volume([point(0, 0), point(1, 1), point(2, 2)]).item() == pytest.approx(0, abs=1e-6)


def test_train_simplex_keeps_fixed_vertices_and_lowers_the_loss(trained):
    data, model, (w1, w2) = trained
    torch.manual_seed(0)  # dropout masks: the same whichever tests ran before
    x, y = data.train_x, data.train_y
    before = [{k: v.clone() for k, v in w.items()} for w in (w1, w2)]

    def mean_loss(vertices):  # the training loss at 8 uniform points of the simplex
        return sum(mc.evaluate(model, mc.curve_point(vertices, mc.simplex_coeffs(3, gen)), x, y)[0]
                   for _ in range(8)) / 8
    gen = torch.Generator().manual_seed(1)
    untrained = mc.curve_point([w1, w2], [0.5, 0.5])  # where train_simplex starts the new vertex: the centroid
    loss_untrained = mean_loss([w1, w2, untrained])
    vertices, history = mc.train_simplex(model, [w1, w2], x, y, new_vertices=1, epochs=6, batch_size=32, lr=0.05,
                                         lam=1e-3, augment_pad=2, log=lambda s: None)
    assert len(vertices) == 3 and len(history) == 6
    for k in w1:  # the fixed vertices stay bit for bit
        assert torch.equal(vertices[0][k], before[0][k]) and torch.equal(vertices[1][k], before[1][k])
    gen = torch.Generator().manual_seed(1)
    loss_trained = mean_loss(vertices)
    assert loss_trained < loss_untrained - 0.05  # the same sampled coefficients, lower loss (1.72 vs 1.91 here)
    assert mc.simplex_volume(vertices).item() > 0


# ── 9. Aligning neurons ──────────────────────────────────────────────────────────────────────────
def convnet_groups(width=4, size=16, batchnorm=False):
    return mc.permutation_groups(mc.ConvNet(3, 10, size, width, batchnorm=batchnorm), torch.randn(2, 3, size, size))


def random_perms(groups, seed):
    gen = torch.Generator().manual_seed(seed)
    return {name: torch.randperm(group.units, generator=gen) for name, group in groups.items()}


def test_convnet_groups_by_hand():
    groups = convnet_groups(width=4)
    assert list(groups) == ["conv1", "conv2", "conv3", "fc1"]  # fc2 writes the logits: never permuted
    assert groups["conv1"] == mc.Group(4, [("conv1.weight", 0, 1), ("conv1.bias", 0, 1), ("conv2.weight", 1, 1)], [])
    assert groups["conv3"].units == 16 and groups["conv3"].tensors[-1] == ("fc1.weight", 1, 4)  # 2x2 map per channel
    bn = convnet_groups(width=4, batchnorm=True)["conv2"]
    assert ("bn2.weight", 0, 1) in bn.tensors
    assert bn.statistics == [("bn2.running_mean", 0, 1), ("bn2.running_var", 0, 1)]


def test_permuted_network_computes_the_same_function():
    model = mc.ConvNet(3, 10, 16, width=4).eval()
    groups = convnet_groups(width=4)
    x = torch.randn(6, 3, 16, 16)
    for seed in range(3):
        w = random_params(seed)
        permuted = mc.permute_units(w, random_perms(groups, seed + 10), groups)
        assert any(not torch.equal(permuted[k], w[k]) for k in w)
        assert torch.allclose(functional_call(model, permuted, (x,)), functional_call(model, w, (x,)), atol=1e-5)


def test_join_merges_two_spaces_under_the_smaller_root():
    parent = [0, 1, 2, 3]
    mc.join(parent, 3, 2)
    assert parent == [0, 1, 2, 2]
    mc.join(parent, 1, 3)  # 3's root is 2: spaces 1, 2 and 3 become one, rooted at 1
    assert parent == [0, 1, 1, 1]
    mc.join(parent, 2, 0)  # space 0 (units kept in place) absorbs them all
    assert parent == [0, 0, 0, 0]


def test_trace_units_of_a_two_layer_perceptron():
    mlp = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.ReLU(), torch.nn.Linear(3, 2))
    entries, parent = mc.trace_units(mlp, torch.randn(2, 4))
    assert entries == [(0, "0.weight", 1, 1, False), (1, "0.weight", 0, 1, False), (1, "0.bias", 0, 1, False),
                       (1, "2.weight", 1, 1, False), (2, "2.weight", 0, 1, False), (2, "2.bias", 0, 1, False)]
    assert parent == [0, 1, 0]  # the hidden units (space 1) move; the outputs (space 2) reach the output: kept


def test_sgd_epochs_learns_and_stops_on_a_diverging_objective():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(256, 5, generator=gen)
    y = (x[:, 0] > 0).long()  # separable by the first feature
    linear = torch.nn.Linear(5, 2)

    def forward(xb):
        return linear(xb), 0.0
    history = mc.sgd_epochs(list(linear.parameters()), forward, x, y, epochs=3, batch_size=32,
                            lr_at=lambda step, total: 0.5, weight_decay=0.0, augment_pad=0, seed=0,
                            log=lambda s: None, name="linear")
    assert [h["epoch"] for h in history] == [1, 2, 3] and all(h["images"] == 256 for h in history)
    assert history[-1]["loss"] < history[0]["loss"] and history[-1]["acc"] > 0.9

    def diverging(xb):
        return linear(xb), torch.tensor(float("nan"))
    with pytest.raises(ValueError, match="linear: objective nan at epoch 1, step 1.*diverged"):
        mc.sgd_epochs(list(linear.parameters()), diverging, x, y, epochs=1, batch_size=32,
                      lr_at=lambda step, total: 0.5, weight_decay=0.0, augment_pad=0, seed=0,
                      log=lambda s: None, name="linear")


def test_permute_units_refuses_weights_of_another_width():
    groups = convnet_groups(width=4)
    w = random_params(0, width=8)  # twice as many units as the groups describe
    with pytest.raises(ValueError, match="tensor conv1.weight does not hold 4 units along axis 0"):
        mc.permute_units(w, random_perms(groups, 0), groups)
    bn_groups = convnet_groups(width=4, batchnorm=True)
    state = mc.ConvNet(3, 10, 16, width=4, batchnorm=True).state_dict()
    state["bn2.running_var"] = torch.ones(3)  # a running statistic of the wrong size: refused, not skipped
    with pytest.raises(ValueError, match="tensor bn2.running_var does not hold 8 units"):
        mc.permute_units(state, random_perms(bn_groups, 0), bn_groups)


def test_match_weights_recovers_a_known_permutation():
    w = random_params(3, width=8)
    groups = convnet_groups(width=8)
    shuffled = mc.permute_units(w, random_perms(groups, 4), groups)
    matched = mc.match_weights(w, shuffled, groups)
    assert all(torch.equal(matched[k], w[k]) for k in w)  # identity distance zero


def test_aligned_line_barrier_is_at_most_the_line_barrier(trained):
    data, model, (w1, w2) = trained
    aligned = mc.match_weights(w1, w2, convnet_groups(width=16))
    ts = [i / 8 for i in range(9)]
    paths = {"line": ([w1, w2], mc.bezier_coeffs), "aligned": ([w1, aligned], mc.bezier_coeffs)}
    lines = []
    metrics, _ = mc.sweep(model, paths, ts, data, 256, log=lines.append)
    errors = {p: mc.barrier([1 - a for a in m["test_acc"]], ts) for p, m in metrics.items()}
    assert errors["aligned"] <= errors["line"]  # on this tiny data; alignment removes part of the ridge
    # pi(w2) computes the same function as w2 (up to the last bits of the logits)
    assert abs(metrics["aligned"]["test_acc"][-1] - metrics["line"]["test_acc"][-1]) <= 1 / len(data.test_y)
    assert len(lines) == 18 and "18/18 done, 0 left" in lines[-1] and "s left" in lines[0]  # progress per point
    small = data._replace(test_x=data.test_x[:64], test_y=data.test_y[:64])
    layers = mc.layerwise_barriers(model, w1, {"line": w2}, [0, 0.5, 1], small, 64, log=lambda s: None)
    swapped = {**w1, "conv2.weight": w2["conv2.weight"], "conv2.bias": w2["conv2.bias"]}
    assert list(layers["line"]) == ["conv1", "conv2", "conv3", "fc1", "fc2"]
    assert layers["line"]["conv2"]["swapped_test_error"] == pytest.approx(
        1 - mc.evaluate(model, swapped, data.test_x[:64], data.test_y[:64])[1])


def test_layerwise_paths_move_one_layer_and_keep_the_others_exactly(monkeypatch):
    w1, w2 = random_params(0), random_params(1)
    seen = {}

    def recording_sweep(model, paths, ts, data, eval_train, bn_images, log, precision):
        seen.update(paths)
        return {name: {"train_loss": [0.0] * len(ts), "test_acc": [1.0] * len(ts)} for name in paths}, None

    monkeypatch.setattr(mc, "sweep", recording_sweep)
    mc.layerwise_barriers(mc.ConvNet(3, 10, 16, 4), w1, {"line": w2}, [0.0, 0.5, 1.0], None, 64)
    assert sorted(seen) == ["line conv1", "line conv2", "line conv3", "line fc1", "line fc2"]
    points, coeffs = seen["line conv2"]
    for t in (0.0, 0.3, 0.7, 1.0):
        phi = mc.curve_point(points, coeffs(t, len(points)))
        assert all(torch.equal(phi[k], w1[k]) for k in w1 if not k.startswith("conv2."))  # not moved, not rounded
        for k in ("conv2.weight", "conv2.bias"):
            assert torch.allclose(phi[k], (1 - t) * w1[k] + t * w2[k], atol=1e-6)


# ── Your own network: BatchNorm statistics, any plain chain, state_dicts ─────────────────────────
def vgg_bn(seed=0):
    """A VGG-style nn.Sequential with BatchNorm and dropout, with running statistics that are not the defaults."""
    torch.manual_seed(seed)
    nn = torch.nn
    model = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(), nn.MaxPool2d(2),
                          nn.Conv2d(6, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(2),
                          nn.Flatten(), nn.Dropout(0.5), nn.Linear(8 * 4 * 4, 12), nn.BatchNorm1d(12), nn.ReLU(),
                          nn.Linear(12, 10))
    for m in model:
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.running_mean.uniform_(-1, 1)
            m.running_var.uniform_(0.5, 2)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.5, 0.5)
    return model


def test_recompute_bn_against_a_reference_by_hand():
    model = vgg_bn()
    model.train()
    own = {k: v.clone() for k, v in model.state_dict().items()}
    params = {k: v.detach() * 1.1 for k, v in model.named_parameters()}  # other weights than the model's
    x = torch.randn(70, 3, 16, 16)
    got = mc.recompute_bn(model, params, x, batch_size=32)  # 70 images in 3 batches of (nearly) equal size
    # by hand: per batch, the batch statistics of each BatchNorm's input, then their mean over the 3 batches
    sums = {}
    for h in torch.tensor_split(x, 3):  # batches of 24, 23 and 23 images
        for j, m in enumerate(model):
            name = str(j)
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                dims = [0, 2, 3] if h.dim() == 4 else [0]
                mean, var = h.mean(dims), h.var(dims)  # the running variance takes the unbiased one
                sums[name] = [s + v for s, v in zip(sums.get(name, [0, 0]), (mean, var), strict=True)]
                h = (h - mean[:, None, None] if h.dim() == 4 else h - mean)
                h = h / (h.var(dims, unbiased=False, keepdim=h.dim() == 4) + m.eps).sqrt()
                w, b = params[f"{name}.weight"], params[f"{name}.bias"]
                h = h * w[:, None, None] + b[:, None, None] if h.dim() == 4 else h * w + b
            elif isinstance(m, torch.nn.Dropout):
                pass  # dropout off while statistics are taken
            elif isinstance(m, (torch.nn.Conv2d, torch.nn.Linear)):
                h = functional_call(m, {"weight": params[f"{name}.weight"], "bias": params[f"{name}.bias"]}, (h,))
            else:
                h = m(h)
    for name, (mean_sum, var_sum) in sums.items():
        assert torch.allclose(got[f"{name}.running_mean"], mean_sum / 3, atol=1e-5)
        assert torch.allclose(got[f"{name}.running_var"], var_sum / 3, atol=1e-4)
    assert all(torch.equal(got[k], v) for k, v in params.items())
    assert all(torch.equal(model.state_dict()[k], v) for k, v in own.items())  # the model's own state is kept
    assert model.training and model[9].training and model[1].momentum == 0.1
    plain = mc.ConvNet(3, 10, 16, width=4)
    w = dict(plain.named_parameters())
    assert mc.recompute_bn(plain, w, x) is w  # no BatchNorm: params unchanged


def test_batchnorm_sweep_recomputes_and_evaluate_refuses_stale_statistics():
    data = tiny_data()
    model = mc.ConvNet(3, 10, 16, width=4, batchnorm=True)
    ends = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        m = mc.ConvNet(3, 10, 16, width=4, batchnorm=True)
        mc.train_endpoint(m, data.train_x, data.train_y, epochs=2, batch_size=64, lr=0.05,
                          weight_decay=5e-4, augment_pad=2, seed=seed, log=lambda s: None)
        ends.append(m.state_dict())
    w1, w2 = ends
    metrics, _ = mc.sweep(model, {"line": ([w1, w2], mc.bezier_coeffs)}, [0.0, 0.5, 1.0], data, 128, bn_images=300,
                          log=lambda s: None)
    for end, w in ((0, w1), (-1, w2)):
        expected = mc.evaluate(model, mc.recompute_bn(model, w, data.train_x[:300]), data.test_x, data.test_y)
        assert metrics["line"]["test_acc"][end] == expected[1]
        assert metrics["line"]["test_loss"][end] == pytest.approx(expected[0], rel=1e-6)
    naive, _ = mc.sweep(model, {"line": ([w1, w2], mc.bezier_coeffs)}, [0.0, 0.5, 1.0], data, 128, bn_images=0,
                        log=lambda s: None)
    assert naive["line"]["test_acc"][0] == mc.evaluate(model, w1, data.test_x, data.test_y)[1]  # its own statistics
    with pytest.raises(ValueError, match="bn1.running_mean is missing.*recompute_bn"):
        mc.evaluate(model, dict(model.named_parameters()), data.test_x, data.test_y)


def test_state_dicts_are_accepted_and_bad_dicts_named():
    data = tiny_data()
    model = mc.ConvNet(3, 10, 16, width=4, batchnorm=True)
    own = {k: v.clone() for k, v in model.state_dict().items()}
    w1, w2 = (mc.ConvNet(3, 10, 16, width=4, batchnorm=True).state_dict() for _ in range(2))
    points, _ = mc.train_curve(model, w1, w2, data.train_x[:128], data.train_y[:128], epochs=1, batch_size=64,
                               log=lambda s: None)
    assert set(points[1]) == {k for k, _ in model.named_parameters()}  # statistics are never trained or interpolated
    assert all(torch.equal(points[0][k], w1[k]) and torch.equal(points[2][k], w2[k]) for k in points[1])
    assert all(torch.equal(model.state_dict()[k], v) for k, v in own.items())  # the model's statistics untouched
    snaps, _ = mc.fge_snapshots(model, w1, data.train_x[:128], data.train_y[:128], cycles=1, cycle_epochs=1,
                                batch_size=64, log=lambda s: None)
    assert snaps[0].keys() == w1.keys()
    assert mc.match_weights(w1, w2, convnet_groups(batchnorm=True)).keys() == w2.keys()
    missing = {k: v for k, v in w1.items() if k != "fc2.bias"}
    with pytest.raises(ValueError, match="fc2.bias is missing"):
        mc.train_curve(model, missing, w2, data.train_x, data.train_y, epochs=1, log=lambda s: None)
    other = mc.ConvNet(3, 10, 16, width=8).state_dict()
    with pytest.raises(ValueError, match=r"conv1.weight is of shape \(8, 3, 3, 3\)"):
        mc.fge_snapshots(model, other, data.train_x, data.train_y, cycles=1, log=lambda s: None)


def test_match_weights_on_a_batchnorm_chain_keeps_the_function_and_undoes_a_permutation():
    model = vgg_bn().eval()
    x = torch.randn(5, 3, 16, 16)
    groups = mc.permutation_groups(model, x)
    assert list(groups) == ["0", "4", "10"] and groups["4"].tensors[-1] == ("10.weight", 1, 16)  # after Flatten
    w = model.state_dict()
    shuffled = mc.permute_units(w, random_perms(groups, 3), groups)
    assert not torch.equal(shuffled["5.running_mean"], w["5.running_mean"])  # buffers move with their units
    assert torch.allclose(functional_call(model, shuffled, (x,)), model(x), atol=1e-5)
    matched = mc.match_weights(w, shuffled, groups)
    assert matched.keys() == w.keys() and all(torch.equal(matched[k], w[k]) for k in w)
    other = vgg_bn(seed=1).state_dict()
    aligned = mc.match_weights(w, other, groups)
    assert torch.allclose(functional_call(model, aligned, (x,)), functional_call(model, other, (x,)), atol=1e-5)


class Block(torch.nn.Module):
    """conv-BN-ReLU-conv-BN plus a shortcut (1x1 conv and BN where the shape changes), then ReLU."""

    def __init__(self, c_in, c_out, stride=1):
        super().__init__()
        nn = torch.nn
        self.conv1, self.bn1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False), nn.BatchNorm2d(c_out)
        self.conv2, self.bn2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False), nn.BatchNorm2d(c_out)
        self.shortcut = nn.Identity()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out))

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class SmallResNet(torch.nn.Module):
    """Stem, two stages of two blocks (the second stage halves the map and doubles the width), mean, linear."""

    def __init__(self, width=4):
        super().__init__()
        nn = torch.nn
        self.conv, self.bn = nn.Conv2d(3, width, 3, padding=1, bias=False), nn.BatchNorm2d(width)
        self.stages = nn.Sequential(Block(width, width), Block(width, width),
                                    Block(width, 2 * width, 2), Block(2 * width, 2 * width))
        self.fc = nn.Linear(2 * width, 10)

    def forward(self, x):
        return self.fc(self.stages(F.relu(self.bn(self.conv(x)))).mean((2, 3)))


def noisy_state(model, seed):
    """A state_dict with every floating tensor shifted at random, so that units differ (and zeros are not zero)."""
    gen = torch.Generator().manual_seed(seed)
    return {k: v + 0.1 * torch.rand(v.shape, generator=gen) if v.is_floating_point() else v
            for k, v in model.state_dict().items()}


def test_resnet_groups_follow_the_residual_streams_and_a_planted_permutation_is_undone():
    torch.manual_seed(0)
    model = SmallResNet(width=4)
    data = tiny_data()
    mc.train_endpoint(model, data.train_x, data.train_y, epochs=2, batch_size=64, lr=0.05,
                      weight_decay=5e-4, augment_pad=2, seed=0, log=lambda s: None)
    model.eval()
    groups = mc.permutation_groups(model, data.test_x[:4])
    stream1 = {t for t, _, _ in groups["conv"].tensors}  # the stem writes the first stream; each block adds to it
    assert {"conv.weight", "bn.weight", "stages.0.bn2.bias", "stages.1.bn2.weight", "stages.0.conv1.weight",
            "stages.2.conv1.weight", "stages.2.shortcut.0.weight"} <= stream1
    stream2 = {t for t, _, _ in groups["stages.2.conv2"].tensors}  # opened by the block and its 1x1 shortcut alike
    assert {"stages.2.shortcut.0.weight", "stages.2.shortcut.1.bias", "stages.3.bn2.weight", "fc.weight"} <= stream2
    inner = [name for name in groups if name.endswith("conv1")]
    assert inner == ["stages.0.conv1", "stages.1.conv1", "stages.2.conv1", "stages.3.conv1"]  # one group each
    assert len(groups) == 6 and groups["stages.2.conv2"].units == 8
    w = model.state_dict()
    shuffled = mc.permute_units(w, random_perms(groups, 5), groups)
    assert torch.allclose(functional_call(model, shuffled, (data.test_x,)), model(data.test_x), atol=1e-4)
    matched = mc.match_weights(w, shuffled, groups)
    assert all(torch.equal(matched[k], w[k]) for k in w)  # exactly undone


def test_torchvision_resnet18_groups():
    import torchvision
    model = torchvision.models.resnet18(num_classes=10)
    groups = mc.permutation_groups(model, torch.randn(2, 3, 32, 32))
    assert len(groups) == 12  # 4 streams (stem + 3 downsample shortcuts) and one group inside each of 8 blocks
    assert groups["conv1"].units == 64 and ("layer2.0.downsample.0.weight", 1, 1) in groups["conv1"].tensors
    assert ("fc.weight", 1, 1) in groups["layer4.0.conv2"].tensors
    assert model.training  # the model's mode is left as it was


class Shifted(torch.nn.Module):
    """A learned per-channel shift, zero at initialisation, read by custom code."""

    def __init__(self):
        super().__init__()
        self.conv1, self.conv2 = torch.nn.Conv2d(3, 6, 3), torch.nn.Conv2d(6, 6, 3)
        self.shift = torch.nn.Parameter(torch.zeros(1, 6, 1, 1))
        self.fc = torch.nn.Linear(6, 10)

    def forward(self, x):
        return self.fc(F.relu(self.conv2(F.relu(self.conv1(x) + self.shift))).mean((2, 3)))


class Gated(torch.nn.Module):
    """Squeeze-excitation: channels scaled by a gate computed from their own means."""

    def __init__(self):
        super().__init__()
        self.conv, self.squeeze, self.excite = torch.nn.Conv2d(3, 6, 3), torch.nn.Linear(6, 3), torch.nn.Linear(3, 6)
        self.fc = torch.nn.Linear(6, 10)

    def forward(self, x):
        h = F.relu(self.conv(x))
        gate = torch.sigmoid(self.excite(F.relu(self.squeeze(h.mean((2, 3))))))
        return self.fc((h * gate[:, :, None, None]).mean((2, 3)))


class Concatenated(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b, self.fc = torch.nn.Conv2d(3, 4, 3), torch.nn.Conv2d(3, 4, 3), torch.nn.Linear(8, 10)

    def forward(self, x):
        return self.fc(torch.cat([F.relu(self.a(x)), F.relu(self.b(x))], 1).mean((2, 3)))


class UsedTwice(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1, self.conv2, self.fc = torch.nn.Conv2d(3, 5, 3), torch.nn.Conv2d(5, 5, 3), torch.nn.Linear(5, 10)

    def forward(self, x):
        return self.fc(F.relu(self.conv2(F.relu(self.conv2(F.relu(self.conv1(x)))))).mean((2, 3)))


class PreActivation(torch.nn.Module):
    """Pre-activation residual blocks: BN-ReLU-conv twice, added to the stream; BN-ReLU before the head."""

    def __init__(self):
        super().__init__()
        nn = torch.nn
        self.stem = nn.Conv2d(3, 4, 3, padding=1)
        self.bn1, self.conv1 = nn.BatchNorm2d(4), nn.Conv2d(4, 6, 3, padding=1)
        self.bn2, self.conv2 = nn.BatchNorm2d(6), nn.Conv2d(6, 4, 3, padding=1)
        self.bn, self.fc = nn.BatchNorm2d(4), nn.Linear(4, 10)

    def forward(self, x):
        s = self.stem(x)
        s = s + self.conv2(F.relu(self.bn2(self.conv1(F.relu(self.bn1(s))))))
        return self.fc(F.relu(self.bn(s)).mean((2, 3)))


class Branching(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.fc = torch.nn.Conv2d(3, 4, 3), torch.nn.Linear(4, 10)

    def forward(self, x):
        h = self.conv(x)
        if h.sum() > 0:  # data-dependent control flow: torch.fx cannot trace it
            h = -h
        return self.fc(h.mean((2, 3)))


def tricky_models():
    nn = torch.nn
    depthwise = nn.Sequential(nn.Conv2d(3, 6, 3), nn.ReLU(), nn.Conv2d(6, 6, 3, groups=6), nn.ReLU(),
                              nn.Conv2d(6, 5, 1), nn.ReLU(), nn.Flatten(), nn.Linear(5 * 4 * 4, 10))
    group_norm = nn.Sequential(nn.Conv2d(3, 6, 3), nn.GroupNorm(2, 6), nn.ReLU(), nn.Conv2d(6, 5, 3), nn.ReLU(),
                               nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(5, 10))
    return {"shift": (Shifted(), ["conv2"]), "depthwise": (depthwise, ["4"]), "concatenation": (Concatenated(), []),
            "group norm": (group_norm, ["3"]), "gate": (Gated(), ["squeeze"]), "twice": (UsedTwice(), ["conv1"]),
            "pre-activation": (PreActivation(), ["stem", "conv1"])}


@pytest.mark.parametrize("kind", list(tricky_models()))
def test_tricky_models_align_partially_and_keep_their_function(kind):
    torch.manual_seed(0)
    model, expected = tricky_models()[kind]
    model.eval()
    x = torch.randn(4, 3, 8, 8)
    groups = mc.permutation_groups(model, x)
    assert list(groups) == expected  # what can move, and nothing else
    w1, w2 = noisy_state(model, 1), noisy_state(model, 2)  # the zero shift is no longer zero
    aligned = mc.match_weights(w1, w2, groups)
    assert torch.allclose(functional_call(model, aligned, (x,)), functional_call(model, w2, (x,)), atol=1e-5)


def test_untraceable_models_and_bad_weights_are_refused_in_one_line():
    with pytest.raises(ValueError, match="torch.fx cannot trace Branching") as refused:
        mc.permutation_groups(Branching(), torch.randn(2, 3, 8, 8))
    assert "\n" not in str(refused.value)  # one line, whatever torch.fx's own message holds
    groups = convnet_groups()
    w1, w2 = random_params(0), random_params(1)
    with pytest.raises(ValueError, match=r"tensor conv2.weight is of shape \(8, 4, 3, 3\) in w1, missing in w2"):
        mc.match_weights(w1, {k: v for k, v in w2.items() if k != "conv2.weight"}, groups)
    with pytest.raises(ValueError, match=r"tensor conv1.weight is of shape \(8, 3, 3, 3\) in w1, of shape \(4, 3"):
        mc.match_weights(random_params(0, width=8), w2, groups)
    hundred_classes = {**w2, "fc2.weight": torch.randn(100, 32)}  # an axis outside every group differs
    with pytest.raises(ValueError, match=r"tensor fc2.weight is of shape \(10, 32\) in w1, of shape \(100, 32\)"):
        mc.match_weights(w1, hundred_classes, groups)
    with pytest.raises(ValueError, match="tensor conv1.weight does not hold 4 units along axis 0"):
        mc.match_weights(random_params(0, width=8), random_params(1, width=8), groups)  # both of another width


def test_the_self_check_refuses_groups_that_change_the_function(monkeypatch):
    # with spaces never merged, the logits become a group of their own: reordering them changes the outputs
    monkeypatch.setattr(mc, "join", lambda parent, a, b: None)
    with pytest.raises(ValueError, match="reordering the units of group fc2 changes the outputs of ConvNet"):
        mc.permutation_groups(mc.ConvNet(3, 10, 16, width=4), torch.randn(2, 3, 16, 16))


def test_float32_opens_no_autocast_context():
    assert isinstance(mc.autocast("mps", torch.float32), contextlib.nullcontext)  # older torch refuses "mps"
    assert isinstance(mc.autocast("cpu", torch.bfloat16), torch.autocast)


def test_match_weights_takes_parameters_that_require_grad():
    a, b = mc.ConvNet(3, 10, 16, 4), mc.ConvNet(3, 10, 16, 4)
    groups = convnet_groups()
    aligned = mc.match_weights(dict(a.named_parameters()), dict(b.named_parameters()), groups)
    x = torch.randn(3, 3, 16, 16)
    b.eval()
    assert aligned.keys() == dict(b.named_parameters()).keys()
    assert torch.allclose(functional_call(b, aligned, (x,)), b(x), atol=1e-5)


# ── 12. Command line: a whole run, resume, determinism, bad input ────────────────────────────────
@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    results = mc.main(TINY + ["--out", str(out)])
    return out, results


def checkpoint(out, stage):
    """The one checkpoint file of a stage in a run folder."""
    files = list(Path(out).glob(f"{stage}-*.pt"))
    assert len(files) == 1, files
    return files[0]


def test_main_writes_every_output(tiny_run):
    out, results = tiny_run
    saved = json.loads((out / "results.json").read_text())
    for key in ("config", "versions", "endpoints", "sweep", "barrier", "ensemble", "layerwise", "landscape", "timings",
                "efficiency"):
        assert key in saved
    assert saved["config"]["dataset"] == "synthetic" and saved["config"]["curve"] == "bezier"
    assert [e["seed"] for e in saved["endpoints"]] == [0, 1]
    assert set(saved["endpoints"][0]) >= {"train_loss", "train_acc", "test_loss", "test_acc"}
    assert saved["sweep"]["t"] == [0.0, 0.5, 1.0]
    for path in ("curve", "line", "aligned"):
        assert set(saved["sweep"][path]) == {"train_loss", "train_acc", "test_loss", "test_acc"}
        assert set(saved["barrier"][path]) == {"train_loss", "test_error"}
        assert len(saved["ensemble"]["pair_along_t"][path]) == 3
    ens = saved["ensemble"]
    assert set(ens) == {"w1", "w2", "w1+w2", "curve", "fge", "simplex", "pair_along_t"}
    for name, size, epochs in (("w1", 1, 0), ("w1+w2", 2, 2), ("curve", 3, 12), ("fge", 2, 2), ("simplex", 8, 1)):
        assert ens[name]["size"] == size and ens[name]["epochs"] == epochs
        assert {"acc", "nll", "ece", "reliability"} <= set(ens[name]) and 0 <= ens[name]["acc"] <= 1
    assert set(saved["layerwise"]) == {"line", "aligned"}
    assert set(saved["layerwise"]["aligned"]["fc1"]) == {"test_error", "train_loss", "swapped_test_error"}
    assert saved["landscape"]["plane"] == "squeezed" and saved["landscape"]["range"] == [-0.5, 1.5]
    assert len(saved["landscape"]["test_loss"]) == 3 and len(saved["landscape"]["test_loss"][0]) == 3
    for stage in ("data", "endpoints", "curve", "sweep", "fge", "simplex", "layerwise", "landscape", "plots"):
        assert saved["timings"][stage]["seconds"] > 0
    for acc in [a for p in ("curve", "line", "aligned") for a in saved["sweep"][p]["test_acc"]]:
        assert 0 <= acc <= 1
    # the endpoints in results.json are the sweep's ends, which the line and the curve share
    for i, end in ((0, 0), (1, -1)):
        for key in ("train_loss", "train_acc", "test_loss", "test_acc"):
            assert saved["endpoints"][i][key] == saved["sweep"]["curve"][key][end] == saved["sweep"]["line"][key][end]
    for png in ("landscape.png", "sweep.png", "ensembles.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list(out.glob("*.tmp*"))
    for stage in mc.STAGE_OPTIONS:
        torch.load(checkpoint(out, stage), weights_only=True)


def test_fp32_run_is_what_the_functions_do_without_a_precision(tiny_run):
    out, results = tiny_run
    assert results["versions"]["precision"] == "fp32" and results["versions"]["bf16_training_speedup"] is None
    data = mc.load_data("synthetic", None, "cpu", train_size=512, test_size=128, seed=0)
    model = mc.new_model(data, width=4, seed=0)
    mc.train_endpoint(model, data.train_x, data.train_y, epochs=2, batch_size=64, lr=0.05,
                      weight_decay=5e-4, augment_pad=4, seed=0, log=lambda s: None)
    saved = torch.load(checkpoint(out, "endpoints"), weights_only=True)["result"]["states"][0]
    assert all(torch.equal(saved[k], v) for k, v in model.state_dict().items())  # bit for bit


def test_bf16_trains_as_well_as_fp32():
    data = tiny_data()
    accuracy = {}
    for precision in (torch.float32, torch.bfloat16):
        torch.manual_seed(0)
        model = mc.ConvNet(3, 10, 16, width=16)
        mc.train_endpoint(model, data.train_x, data.train_y, epochs=10, batch_size=32, lr=0.05,
                          weight_decay=5e-4, augment_pad=2, seed=0, log=lambda s: None,
                          precision=precision)
        assert all(p.dtype == torch.float32 for p in model.parameters())  # the weights stay float32
        weights = dict(model.named_parameters())
        accuracy[precision] = mc.evaluate(model, weights, data.test_x, data.test_y, precision=precision)[1]
    # a stale-weight mistake (one autocast context around the whole loop) would stay near chance, 0.1
    assert accuracy[torch.float32] > 0.5 and abs(accuracy[torch.bfloat16] - accuracy[torch.float32]) < 0.05


def test_bf16_run_records_its_precision_and_keeps_float32_weights(tmp_path):
    results = mc.main(TINY + ["--precision", "bf16", "--out", str(tmp_path)])
    assert results["versions"]["precision"] == "bf16" and results["config"]["precision"] == "bf16"
    saved = torch.load(checkpoint(tmp_path, "curve"), weights_only=True)["result"]["points"][1]
    assert all(v.dtype == torch.float32 for v in saved.values())
    assert all(math.isfinite(e["test_loss"]) for e in results["endpoints"])


def test_auto_precision_measures_and_records_its_choice(tmp_path):
    data = tiny_data()
    model = mc.ConvNet(3, 10, 16, width=4)
    name, speedup = mc.choose_precision("auto", model, data.train_x[:64], data.train_y[:64])
    assert name == ("bf16" if speedup >= 1.2 else "fp32") and speedup > 0
    assert all(p.grad is None for p in model.parameters())  # measured on a copy
    assert mc.choose_precision("bf16", model, data.train_x[:64], data.train_y[:64]) == ("bf16", None)
    small = [a for a in TINY if a not in ("--precision", "fp32")] + ["--epochs", "1", "--curve-epochs", "1",
                                                                    "--fge-cycles", "0", "--simplex-vertices", "0"]
    results = mc.main(small + ["--out", str(tmp_path)])
    versions = results["versions"]
    assert versions["precision_requested"] == "auto" and versions["precision"] in ("fp32", "bf16")
    assert versions["bf16_training_speedup"] > 0 and results["config"]["precision"] == versions["precision"]


def test_resume_reuses_what_matches_and_recomputes_the_same(tiny_run, tmp_path, capsys):
    out, first = tiny_run
    for ckpt in out.glob("*.pt"):  # a finished run's checkpoints (a fresh process repeats them: Ctrl-C test)
        (tmp_path / ckpt.name).write_bytes(ckpt.read_bytes())
    capsys.readouterr()
    resumed = mc.main(TINY + ["--out", str(tmp_path), "--resume"])
    assert metrics_only(resumed) == metrics_only(first)
    assert capsys.readouterr().out.count("resume: reusing") == len(mc.STAGE_OPTIONS)
    for stage in ("sweep", "fge", "simplex"):  # computed again after a reused curve: the same numbers
        checkpoint(tmp_path, stage).unlink()
    assert metrics_only(mc.main(TINY + ["--out", str(tmp_path), "--resume"])) == metrics_only(first)
    # a finer sweep and grid: endpoints and curve reused, sweep and landscape new, old files kept
    capsys.readouterr()
    finer = mc.main(TINY + ["--out", str(tmp_path), "--resume", "--points", "5", "--grid", "4"])
    log = capsys.readouterr().out
    for stage in ("endpoints", "curve"):
        assert f"reusing {checkpoint(tmp_path, stage)}" in log
    assert len(finer["sweep"]["t"]) == 5 and finer["endpoints"] == first["endpoints"]
    assert len(list(tmp_path.glob("sweep-*.pt"))) == 2 and len(list(tmp_path.glob("landscape-*.pt"))) == 2


def test_aligned_and_plain_curves_are_never_reused_for_each_other(tiny_run, tmp_path, capsys):
    out, first = tiny_run
    for ckpt in out.glob("*.pt"):
        (tmp_path / ckpt.name).write_bytes(ckpt.read_bytes())
    capsys.readouterr()
    aligned = mc.main(TINY + ["--out", str(tmp_path), "--resume", "--align-curve"])
    log = capsys.readouterr().out
    assert f"reusing {checkpoint(tmp_path, 'endpoints')}" in log and "curve epoch 1/10" in log  # trained anew
    assert not re.search(r"reusing \S*(curve|sweep|landscape)-", log)  # nothing that depends on the curve
    assert aligned["config"]["align_curve"] is True and first["config"]["align_curve"] is False
    assert aligned["landscape"]["names"] == ["w1", "aligned w2", "theta"]
    assert len(list(tmp_path.glob("curve-*.pt"))) == 2
    assert mc.main(TINY + ["--out", str(tmp_path), "--resume"])["sweep"] == first["sweep"]  # the plain one again


def test_batchnorm_run_writes_recomputed_and_interpolated_barriers(tmp_path):
    results = mc.main(TINY + ["--out", str(tmp_path), "--batchnorm", "--bn-images", "200", "--fge-cycles", "1",
                              "--curve-epochs", "2"])
    assert results["config"]["batchnorm"]
    assert set(results["barrier"]) == {"curve", "line", "aligned", "line_interpolated_bn", "aligned_interpolated_bn"}
    model = mc.ConvNet(3, 10, 32, width=4, batchnorm=True)
    ends = torch.load(checkpoint(tmp_path, "endpoints"), weights_only=True)["result"]["states"]
    assert "bn1.running_mean" in ends[0]  # endpoints keep their own statistics ...
    data = mc.load_data("synthetic", None, "cpu", 512, 128, seed=0)
    w1 = mc.recompute_bn(model, ends[0], data.train_x[:200])  # ... the sweep recomputes them
    assert results["endpoints"][0]["test_acc"] == mc.evaluate(model, w1, data.test_x, data.test_y)[1]
    assert {"sweep_vs_plain_inference", "landscape_vs_plain_inference"} <= set(results["efficiency"])


def run_cli(args, capsys):
    with pytest.raises(SystemExit) as exit_info:
        mc.main(args)
    err = capsys.readouterr().err.strip()
    return exit_info.value.code, err


@pytest.mark.parametrize("args, words", [
    (["--dataset", "imagenet"], ["--dataset", "imagenet"]),
    (["--curve", "spline"], ["--curve", "spline"]),
    (["--plane", "orthonormal"], ["unrecognized", "--plane"]),
    (["--device", "tpu"], ["--device", "tpu"]),
    (["--epochs", "0"], ["--epochs", "'0'"]),
    (["--epochs", "ten"], ["--epochs", "'ten'"]),
    (["--batch-size", "-4"], ["--batch-size", "'-4'"]),
    (["--points", "1"], ["--points", ">= 2"]),
    (["--grid", "1"], ["--grid", ">= 2"]),
    (["--bends", "0"], ["--bends"]),
    (["--width", "2.5"], ["--width"]),
    (["--train-subset", "0"], ["--train-subset"]),
    (["--eval-test", "-1"], ["--eval-test"]),
    (["--lr", "0"], ["--lr", "> 0"]),
    (["--lr", "inf"], ["--lr"]),
    (["--curve-lr", "-1"], ["--curve-lr", "> 0"]),
    (["--fge-cycles", "-1"], ["--fge-cycles", ">= 0"]),
    (["--fge-lr", "0"], ["--fge-lr", "> 0"]),
    (["--simplex-vertices", "two"], ["--simplex-vertices", "'two'"]),
    (["--layer-points", "3"], ["unrecognized", "--layer-points"]),  # removed: the layer-wise stage uses 11 values
    (["--precision", "fp16"], ["--precision", "'fp16'"]),
    (["--epochs", "9" * 400], ["--epochs", "must be int"]),  # too large for a float: refused, not a traceback
])
def test_bad_options_exit_2_with_one_line(args, words, capsys):
    code, err = run_cli(args, capsys)
    assert code == 2 and len(err.splitlines()) == 1 and "Traceback" not in err
    for word in words:
        assert word in err


def test_help_groups_the_options(capsys):
    with pytest.raises(SystemExit):
        mc.main(["--help"])
    text = capsys.readouterr().out
    for group in ("data:", "model and training of the endpoints:", "curve:", "fast ensembles (FGE and simplex):",
                  "evaluation and landscape:", "run control:"):
        assert group in text
    assert "(default: 30)" in text and "(default: 120)" in text  # --epochs, --curve-epochs


def test_unavailable_device_bad_dirs_and_divergence(tmp_path, capsys, monkeypatch):
    if not torch.cuda.is_available():
        code, err = run_cli(["--device", "cuda", "--dataset", "synthetic"], capsys)
        assert code == 2 and "--device cuda" in err
    a_file = tmp_path / "file.txt"
    a_file.write_text("x")
    code, err = run_cli(TINY + ["--data-dir", str(a_file), "--dataset", "folder", "--out", str(tmp_path / "o")], capsys)
    assert code == 2 and "expected" in err and "train/<class>/<image>" in err
    code, err = run_cli(TINY + ["--out", str(a_file / "sub")], capsys)
    assert code == 2 and str(a_file / "sub") in err and len(err.splitlines()) == 1  # mkdir's own error
    def offline(*args, **kwargs):  # what torchvision raises without network; tests never download
        raise RuntimeError("Error downloading cifar-10-python.tar.gz: network unreachable")
    monkeypatch.setattr("torchvision.datasets.CIFAR10", offline)
    code, err = run_cli(TINY + ["--dataset", "cifar10", "--data-dir", str(tmp_path / "empty"),
                                "--out", str(tmp_path / "o")], capsys)
    assert code == 2 and "--dataset synthetic" in err and "--data-dir" in err and len(err.splitlines()) == 1
    out = tmp_path / "diverge"
    code, err = run_cli(TINY + ["--lr", "1e12", "--out", str(out)], capsys)
    assert code == 2 and "lower --lr" in err and len(err.splitlines()) == 1
    assert not list(out.glob("endpoints-*.pt")) and not (out / "results.json").exists()


def test_corrupt_checkpoints_are_refused(tiny_run, tmp_path, capsys):
    out, _ = tiny_run
    good = checkpoint(out, "endpoints")
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / good.name).write_bytes(good.read_bytes()[:200])  # truncated
    code, err = run_cli(TINY + ["--out", str(bad), "--resume"], capsys)
    assert code == 2 and good.name in err and "unreadable" in err
    assert (bad / good.name).stat().st_size == 200  # neither reused nor overwritten


def test_ctrl_c_keeps_checkpoints_and_resume_finishes(tiny_run, tmp_path):
    out = tmp_path / "run"
    args = TINY + ["--out", str(out)]  # TINY's 10 curve epochs: a curve stage long enough to interrupt
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "PYTHONUNBUFFERED": "1"}
    # A shell that starts this suite in the background makes its children ignore SIGINT, and so would the
    # child here: give it the default handling, whatever this process inherited.
    def restore():
        signal.signal(signal.SIGINT, signal.SIG_DFL)
    proc = subprocess.Popen([sys.executable, str(HERE / "modeconnectivity.py"), *args], cwd=tmp_path, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, preexec_fn=restore)
    for line in proc.stdout:  # wait for an event, not for time: the first curve epoch has finished
        if line.startswith("curve epoch 1/"):
            break
    proc.send_signal(signal.SIGINT)
    rest, err = proc.communicate(timeout=120)
    assert proc.returncode == 130 and "--resume" in err and "Traceback" not in err
    assert not (out / "results.json").exists()
    if "curve epoch 10/10" not in rest:  # the curve was still training when the signal came: nothing saved
        assert not list(out.glob("curve-*.pt"))
    assert not list(out.glob("*.tmp*"))
    torch.load(checkpoint(out, "endpoints"), weights_only=True)  # intact
    resumed = mc.main(args + ["--resume"])
    assert metrics_only(resumed) == metrics_only(tiny_run[1])  # the same numbers as an uninterrupted run


def test_importing_runs_nothing():
    code = "import modeconnectivity, sys; print(len([m for m in sys.modules if m.startswith('matplotlib')]))"
    out = subprocess.run([sys.executable, "-c", code], cwd=HERE, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "0" and out.stderr == ""


# The short recipe on CIFAR-10, exactly as README.md gives it (options after the data set)
SHORT = ["--epochs", "8", "--curve-epochs", "8", "--align-curve", "--points", "11", "--eval-train", "5000",
         "--fge-cycles", "2", "--fge-cycle-epochs", "1", "--simplex-epochs", "1", "--grid", "11", "--eval-test", "1000",
         "--bn-images", "1000"]


def test_short_recipe_is_the_readmes_and_a_miniature_of_it_runs(tmp_path):
    readme = (HERE / "README.md").read_text()
    assert "python modeconnectivity.py --dataset cifar10 " + " ".join(SHORT) in readme
    args = mc.parse_args(["--dataset", "cifar10", *SHORT, "--out", str(tmp_path / "parsed")])
    assert (args.epochs, args.curve_epochs, args.align_curve, args.points, args.grid) == (8, 8, True, 11, 11)
    tiny = ["--dataset", "synthetic", *SHORT, "--train-subset", "256", "--test-subset", "64", "--width", "4",
            "--epochs", "1", "--curve-epochs", "2", "--batch-size", "64", "--eval-train", "64", "--eval-test", "32",
            "--bn-images", "64", "--grid", "3", "--points", "3", "--precision", "fp32", "--out", str(tmp_path / "run")]
    results = mc.main(tiny)
    assert results["config"]["align_curve"] and len(results["ensemble"]["fge"]["reliability"]["count"]) > 0
    assert (tmp_path / "run" / "landscape.png").exists()


@pytest.mark.parametrize("seed", [0, 4])
def test_quick_polychain_has_no_barrier(seed, tmp_path):
    # at the endpoints' peak rate (--curve-lr 0.05) seed 4 crossed a 25-point barrier; --quick now trains at 0.02
    args = ["--dataset", "synthetic", "--quick", "--curve", "polychain", "--seed", str(seed), "--precision", "fp32",
            "--fge-cycles", "0", "--simplex-vertices", "0", "--grid", "2", "--points", "5", "--eval-test", "50",
            "--out", str(tmp_path)]  # training as in --quick; t = 0.5, the chain's bend, among the 5 points
    results = mc.main(args)
    assert results["config"]["curve_lr"] == 0.02 and results["barrier"]["curve"]["test_error"] <= 0.03


# ── tutorial.md: its code blocks run, and every function it names exists ─────────────────────────
def tutorial_blocks():
    text = (HERE / "tutorial.md").read_text()
    return re.findall(r"```python\n(.*?)```", text, flags=re.S), text


def test_tutorial_code_blocks_run(tmp_path, monkeypatch):
    blocks, _ = tutorial_blocks()
    assert blocks, "tutorial.md has no python code blocks"
    monkeypatch.chdir(tmp_path)
    namespace = {}
    for block in blocks:
        exec(compile(block, "tutorial.md", "exec"), namespace)


NOT_FUNCTIONS = {"DataLoader", "Figure", "logsumexp", "forward", "pad", "python", "w1", "w2", "weight_decay", "width",
                 "conv", "conv1", "conv2", "conv3", "fc1", "draw", "lr_at",
                 "precision", "auto", "bf16", "fp32", "versions",  # option values and keys, not functions
                 "test_tutorial_code_blocks_run", *mc.DATASETS}


def test_tutorial_names_only_existing_functions():
    _, text = tutorial_blocks()
    names = set(re.findall(r"`([A-Za-z_][A-Za-z0-9_]*)\(?`", text)) - NOT_FUNCTIONS
    missing = sorted(n for n in names if not callable(getattr(mc, n, None)) and not hasattr(builtins, n))
    assert len(names) > 20 and not missing, missing
    headings = re.findall(r"^## (\d+)\. (.+)$", text, flags=re.M)
    source = (HERE / "modeconnectivity.py").read_text()
    for number, title in headings:
        assert f"│ {number}. {title}" in source, f"section {number}. {title} has no banner in the file"
