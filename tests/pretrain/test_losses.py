"""Losses against independent loop oracles (float64, no shared code), hand-computed values and invariances."""

import math
import os
from datetime import timedelta
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from pretrain.losses import DINOLoss, GramLoss, IBOTPatchLoss, KoLeoLoss, sinkhorn_knopp
from pretrain.losses._dist import all_reduce_max, all_reduce_sum, world_size

LN2, LN3 = math.log(2.0), math.log(3.0)


# ---------------------------------------------------------------------------------------------------
# Oracles: the recipe written as plainly as possible, one Python loop per sum.


def _log_softmax_ref(row: list[float], temp: float) -> list[float]:
    scaled = [v / temp for v in row]
    top = max(scaled)
    log_norm = top + math.log(sum(math.exp(v - top) for v in scaled))
    return [v - log_norm for v in scaled]


def _cross_entropy_ref(target: list[float], logits: list[float], temp: float) -> float:
    return -sum(t * lp for t, lp in zip(target, _log_softmax_ref(logits, temp)))


def dino_ref(student: list[np.ndarray], teacher: list[np.ndarray], temp: float) -> float:
    total, n_pairs = 0.0, 0
    for t_view, target in enumerate(teacher):
        for s_view, logits in enumerate(student):
            if s_view == t_view:
                continue
            per_image = [
                _cross_entropy_ref(list(target[b]), list(logits[b]), temp) for b in range(len(target))
            ]
            total += sum(per_image) / len(per_image)
            n_pairs += 1
    return total / n_pairs


def centering_ref(logits: np.ndarray, center: np.ndarray, temp: float) -> np.ndarray:
    out = np.zeros_like(logits)
    for i, row in enumerate(logits):
        out[i] = [math.exp(v) for v in _log_softmax_ref([row[k] - center[k] for k in range(len(row))], temp)]
    return out


def center_update_ref(center: np.ndarray, logits: np.ndarray, momentum: float) -> np.ndarray:
    mean = [sum(logits[i][k] for i in range(len(logits))) / len(logits) for k in range(len(center))]
    return np.array([momentum * center[k] + (1 - momentum) * mean[k] for k in range(len(center))])


def sinkhorn_ref(logits: np.ndarray, temp: float, n_iterations: int) -> np.ndarray:
    n, k = logits.shape
    q = [[math.exp(logits[j][i] / temp) for j in range(n)] for i in range(k)]  # K x N
    total = sum(sum(row) for row in q)
    q = [[v / total for v in row] for row in q]
    for _ in range(n_iterations):
        for i in range(k):
            row_sum = sum(q[i])
            q[i] = [v / row_sum / k for v in q[i]]
        for j in range(n):
            col_sum = sum(q[i][j] for i in range(k))
            for i in range(k):
                q[i][j] = q[i][j] / col_sum / n
    return np.array([[q[i][j] * n for i in range(k)] for j in range(n)])


def ibot_ref(student: np.ndarray, teacher: np.ndarray, masks: np.ndarray, temp: float) -> float:
    total, patch = 0.0, 0
    for image in range(len(masks)):
        losses = []
        for p in range(len(masks[image])):
            if masks[image][p]:
                losses.append(_cross_entropy_ref(list(teacher[patch]), list(student[patch]), temp))
                patch += 1
        if losses:
            total += sum(losses) / len(losses)
    return total / len(masks)


def koleo_ref(features: np.ndarray) -> float:
    unit = [row / math.sqrt(sum(v * v for v in row)) for row in features]
    total = 0.0
    for i in range(len(unit)):
        nearest = min(
            math.sqrt(sum((a - b) ** 2 for a, b in zip(unit[i], unit[j]))) for j in range(len(unit)) if j != i
        )
        total += math.log(nearest + 1e-8)
    return -total / len(unit)


def gram_ref(student: np.ndarray, teacher: np.ndarray) -> float:
    total, count = 0.0, 0
    for image in range(len(student)):
        s_rows = [row / math.sqrt(sum(v * v for v in row)) for row in student[image]]
        t_rows = [row / math.sqrt(sum(v * v for v in row)) for row in teacher[image]]
        for i in range(len(s_rows)):
            for j in range(len(s_rows)):
                g_s = sum(a * b for a, b in zip(s_rows[i], s_rows[j]))
                g_t = sum(a * b for a, b in zip(t_rows[i], t_rows[j]))
                total += (g_s - g_t) ** 2
                count += 1
    return total / count


def _cubic_weights(t: float, a: float = -0.75) -> list[float]:
    """Keys cubic convolution weights of the 4 taps around a source point at fraction t."""

    def near(x: float) -> float:
        return ((a + 2) * x - (a + 3)) * x * x + 1

    def far(x: float) -> float:
        return ((a * x - 5 * a) * x + 8 * a) * x - 4 * a

    return [far(t + 1), near(t), near(1 - t), far(2 - t)]


def bicubic_ref(channels: np.ndarray, out_h: int, out_w: int) -> np.ndarray:
    """(D, H, W) -> (D, out_h, out_w); half-pixel centres, border taps clamped."""
    _, in_h, in_w = channels.shape
    out = np.zeros((channels.shape[0], out_h, out_w))
    for y in range(out_h):
        src_y = (y + 0.5) * in_h / out_h - 0.5
        y0, wy = math.floor(src_y), _cubic_weights(src_y - math.floor(src_y))
        for x in range(out_w):
            src_x = (x + 0.5) * in_w / out_w - 0.5
            x0, wx = math.floor(src_x), _cubic_weights(src_x - math.floor(src_x))
            for dy in range(4):
                yy = min(max(y0 - 1 + dy, 0), in_h - 1)
                for dx in range(4):
                    xx = min(max(x0 - 1 + dx, 0), in_w - 1)
                    out[:, y, x] += wy[dy] * wx[dx] * channels[:, yy, xx]
    return out


def _np(t: torch.Tensor) -> np.ndarray:
    return t.detach().double().numpy()


def _teacher_ref(logits: np.ndarray, center: np.ndarray, temp: float, mode: str) -> np.ndarray:
    return centering_ref(logits, center, temp) if mode == "centering" else sinkhorn_ref(logits, temp, 3)


# ---------------------------------------------------------------------------------------------------
# DINO


@pytest.mark.parametrize(
    ("batch", "k", "n_local", "student_temp", "teacher_temp", "mode"),
    [
        (1, 3, 0, 0.1, 0.04, "centering"),
        (4, 8, 2, 0.1, 0.07, "centering"),
        (3, 5, 4, 0.5, 0.04, "sinkhorn"),
        (6, 16, 8, 0.1, 0.07, "sinkhorn"),
        (2, 4, 1, 1.0, 1.0, "sinkhorn"),
    ],
)
def test_dino_matches_oracle(batch, k, n_local, student_temp, teacher_temp, mode):
    g = torch.Generator().manual_seed(batch * 100 + k)
    student = [torch.randn(batch, k, generator=g) * 2 for _ in range(2 + n_local)]
    teacher_logits = torch.randn(2 * batch, k, generator=g) * 2
    loss_fn = DINOLoss(k, student_temp=student_temp)
    loss_fn.center.copy_(torch.randn(1, k, generator=g))
    center = _np(loss_fn.center)[0]

    probs = loss_fn.teacher_probs(teacher_logits, teacher_temp, mode)
    loss = loss_fn(student, list(probs.chunk(2)))

    probs_ref = _teacher_ref(_np(teacher_logits), center, teacher_temp, mode)
    np.testing.assert_allclose(_np(probs), probs_ref, atol=1e-5)
    expected = dino_ref([_np(s) for s in student], [probs_ref[:batch], probs_ref[batch:]], student_temp)
    assert loss.item() == pytest.approx(expected, rel=1e-5, abs=1e-6)


def test_dino_pinned_value():
    # K=2, B=2, τs=0.5, 2 global crops: pairs (teacher 0, student 1) and (teacher 1, student 0).
    # Student logits/τs: [0,0] -> log p = [-ln2, -ln2];  [ln3, 0] -> p = [3/4, 1/4].
    half_ln3 = LN3 / 2
    student = [torch.tensor([[0.0, 0.0], [half_ln3, 0.0]]), torch.tensor([[half_ln3, 0.0], [0.0, 0.0]])]
    teacher = [torch.tensor([[1.0, 0.0], [0.0, 1.0]]), torch.tensor([[0.5, 0.5], [1.0, 0.0]])]
    # (t0, s1): image 0: -1·ln(3/4) = ln(4/3); image 1: -1·ln(1/2) = ln2      -> mean (ln2 + ln(4/3))/2
    # (t1, s0): image 0: -(0.5+0.5)·ln(1/2) = ln2; image 1: -ln(3/4) = ln(4/3) -> mean (ln2 + ln(4/3))/2
    # loss = (ln2 + ln(4/3))/2 = ln(8/3)/2 = 0.4904146
    loss = DINOLoss(2, student_temp=0.5)(student, teacher)
    assert loss.item() == pytest.approx(0.4904146, abs=1e-6)


def test_dino_pairs_skip_the_same_view():
    # One-hot targets: teacher crop 0 says class 0, teacher crop 1 says class 1. Student crop 0 is sure
    # of class 1 and crop 1 of class 0: CE ≈ 0 against the other view, ≈ 1000 against its own view.
    # The 8 uniform local crops give CE = ln K against each teacher crop: 16 of the 18 pairs.
    k, batch, n_local = 4, 3, 8
    one_hot = torch.eye(k)
    teacher = [one_hot[0].expand(batch, k), one_hot[1].expand(batch, k)]
    student = [100 * one_hot[1].expand(batch, k), 100 * one_hot[0].expand(batch, k)]
    student += [torch.zeros(batch, k)] * n_local
    loss = DINOLoss(k)(student, teacher)
    assert loss.item() == pytest.approx(16 / 18 * math.log(k), abs=1e-6)


@pytest.mark.parametrize("mode", ["centering", "sinkhorn"])
def test_dino_batch_permutation_invariance(mode):
    g = torch.Generator().manual_seed(0)
    batch, k = 5, 6
    student = [torch.randn(batch, k, generator=g) for _ in range(4)]
    teacher_logits = torch.randn(2, batch, k, generator=g)
    perm = torch.randperm(batch, generator=g)
    loss_fn = DINOLoss(k)

    def loss_of(stud, teach):
        return loss_fn(stud, list(loss_fn.teacher_probs(teach.reshape(-1, k), 0.05, mode).chunk(2)))

    permuted = loss_of([s[perm] for s in student], teacher_logits[:, perm])
    assert permuted.item() == pytest.approx(loss_of(student, teacher_logits).item(), rel=1e-6)


def test_dino_gradients_reach_student_only():
    g = torch.Generator().manual_seed(1)
    student = [torch.randn(3, 4, generator=g, requires_grad=True) for _ in range(3)]
    teacher_logits = torch.randn(6, 4, generator=g, requires_grad=True)
    loss_fn = DINOLoss(4)
    for mode in ("centering", "sinkhorn"):
        probs = loss_fn.teacher_probs(teacher_logits, 0.04, mode)
        assert not probs.requires_grad
        loss_fn(student, list(probs.chunk(2))).backward()
    assert teacher_logits.grad is None
    assert all(s.grad is not None and s.grad.abs().sum() > 0 for s in student)


def test_dino_rejects_fewer_student_than_teacher_crops():
    with pytest.raises(ValueError, match="student"):
        DINOLoss(2)([torch.zeros(1, 2)], [torch.zeros(1, 2), torch.zeros(1, 2)])


def test_unknown_target_mode_raises():
    with pytest.raises(ValueError, match="centering"):
        DINOLoss(2).teacher_probs(torch.zeros(2, 2), 0.04, "softmax")  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------------------------
# Teacher targets: centering and Sinkhorn-Knopp


def test_centering_pinned_value():
    # softmax(([1, 3] − [1, 1]) / 1) = [1, e²] / (1 + e²) = [0.1192029, 0.8807971]
    loss_fn = DINOLoss(2)
    loss_fn.center.fill_(1.0)
    probs = loss_fn.teacher_probs(torch.tensor([[1.0, 3.0]]), 1.0, "centering")
    torch.testing.assert_close(probs, torch.tensor([[0.1192029, 0.8807971]]), atol=1e-6, rtol=0)


def test_center_update_pinned_values():
    # mean of [[1, 2], [3, 4]] = [2, 3]; c1 = 0.9·0 + 0.1·[2, 3] = [0.2, 0.3];
    # c2 = 0.9·[0.2, 0.3] + 0.1·[2, 3] = [0.38, 0.57]
    loss_fn = IBOTPatchLoss(2)
    logits = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    loss_fn.update_center(logits)
    torch.testing.assert_close(loss_fn.center, torch.tensor([[0.2, 0.3]]))
    loss_fn.update_center(logits)
    torch.testing.assert_close(loss_fn.center, torch.tensor([[0.38, 0.57]]))


@pytest.mark.parametrize(("n", "k", "momentum"), [(1, 3, 0.9), (7, 5, 0.5), (12, 16, 0.99)])
def test_center_update_matches_oracle(n, k, momentum):
    g = torch.Generator().manual_seed(n)
    loss_fn = DINOLoss(k, center_momentum=momentum)
    loss_fn.center.copy_(torch.randn(1, k, generator=g))
    center = _np(loss_fn.center)[0]
    logits = torch.randn(n, k, generator=g).to(torch.bfloat16)
    loss_fn.update_center(logits)
    np.testing.assert_allclose(
        _np(loss_fn.center)[0], center_update_ref(center, _np(logits), momentum), atol=1e-6
    )


def test_center_unchanged_without_logits():
    loss_fn = IBOTPatchLoss(3)
    loss_fn.center.fill_(0.5)
    loss_fn.update_center(torch.zeros(0, 3))
    assert torch.equal(loss_fn.center, torch.full((1, 3), 0.5))


def test_sinkhorn_pinned_value():
    # K=2, N=2, τt=1, one iteration. Q = exp(z)ᵀ with exp(z) = [[1, 2], [3, 4]] -> Q = [[1, 3], [2, 4]].
    # (Normalising to total mass 1 first changes nothing after the row step.)
    # rows / (sum · K): [[1/8, 3/8], [2/12, 4/12]];  column sums 7/24 and 17/24
    # columns / (sum · N), then · N: column 0 -> [3/7, 4/7], column 1 -> [9/17, 8/17]
    logits = torch.tensor([[0.0, LN2], [LN3, math.log(4.0)]])
    expected = torch.tensor([[3 / 7, 4 / 7], [9 / 17, 8 / 17]])
    torch.testing.assert_close(sinkhorn_knopp(logits, 1.0, n_iterations=1), expected, atol=1e-6, rtol=0)


@pytest.mark.parametrize(
    ("n", "k", "temp", "n_iterations"),
    [(1, 3, 0.04, 3), (2, 2, 1.0, 1), (6, 4, 0.07, 3), (16, 8, 0.04, 3), (9, 32, 0.1, 5)],
)
def test_sinkhorn_matches_oracle(n, k, temp, n_iterations):
    logits = torch.randn(n, k, generator=torch.Generator().manual_seed(n * k)) * 2
    expected = sinkhorn_ref(_np(logits), temp, n_iterations)
    np.testing.assert_allclose(_np(sinkhorn_knopp(logits, temp, n_iterations)), expected, atol=1e-5)


def test_sinkhorn_stable_at_low_temperature():
    # z/τt reaches ~300: exp overflows fp32 (limit ~88) unless computed in a stable way.
    logits = torch.randn(12, 6, generator=torch.Generator().manual_seed(3)) * 4
    probs = sinkhorn_knopp(logits.to(torch.bfloat16), 0.04)
    assert probs.dtype == torch.float32 and torch.isfinite(probs).all()
    expected = sinkhorn_ref(_np(logits.to(torch.bfloat16)), 0.04, 3)
    np.testing.assert_allclose(_np(probs), expected, atol=1e-5)


def test_sinkhorn_marginals():
    n, k = 24, 6
    logits = torch.randn(n, k, generator=torch.Generator().manual_seed(4))
    for n_iterations in (1, 3):
        rows = sinkhorn_knopp(logits, 0.1, n_iterations).sum(dim=1)
        torch.testing.assert_close(rows, torch.ones(n), atol=1e-6, rtol=0)
    imbalance = [(sinkhorn_knopp(logits, 0.1, i).sum(dim=0) - n / k).abs().max().item() for i in (1, 3, 100)]
    assert imbalance[0] > imbalance[1] > imbalance[2]
    assert imbalance[2] < 1e-4  # each prototype receives N/K of the batch


def test_sinkhorn_permutation_equivariance():
    g = torch.Generator().manual_seed(5)
    logits = torch.randn(10, 4, generator=g)
    perm = torch.randperm(10, generator=g)
    torch.testing.assert_close(sinkhorn_knopp(logits[perm], 0.05), sinkhorn_knopp(logits, 0.05)[perm])


# ---------------------------------------------------------------------------------------------------
# iBOT


def _random_masks(g: torch.Generator, n_images: int, n_patches: int, density: float) -> torch.Tensor:
    masks = torch.rand(n_images, n_patches, generator=g) < density
    masks[0] = False  # always one image without a masked patch
    return masks


@pytest.mark.parametrize(
    ("n_images", "n_patches", "k", "density", "student_temp", "mode"),
    [
        (2, 4, 3, 0.5, 0.1, "centering"),
        (4, 9, 8, 0.3, 0.1, "sinkhorn"),
        (6, 16, 5, 0.6, 0.5, "centering"),
        (3, 6, 16, 0.9, 1.0, "sinkhorn"),
    ],
)
def test_ibot_matches_oracle(n_images, n_patches, k, density, student_temp, mode):
    g = torch.Generator().manual_seed(n_images * n_patches + k)
    masks = _random_masks(g, n_images, n_patches, density)
    student_patches = torch.randn(n_images, n_patches, k, generator=g) * 2
    teacher_patches = torch.randn(n_images, n_patches, k, generator=g) * 2
    loss_fn = IBOTPatchLoss(k, student_temp=student_temp)
    loss_fn.center.copy_(torch.randn(1, k, generator=g))
    center = _np(loss_fn.center)[0]

    probs = loss_fn.teacher_probs(teacher_patches[masks], 0.07, mode)
    loss = loss_fn(student_patches[masks], probs, masks)

    # The oracle walks `masks` row-major itself, so it also checks the gather order.
    teacher_ref = np.array(
        [_np(teacher_patches)[i][p] for i in range(n_images) for p in range(n_patches) if masks[i, p]]
    )
    student_ref = np.array(
        [_np(student_patches)[i][p] for i in range(n_images) for p in range(n_patches) if masks[i, p]]
    )
    probs_ref = _teacher_ref(teacher_ref, center, 0.07, mode)
    np.testing.assert_allclose(_np(probs), probs_ref, atol=1e-5)
    expected = ibot_ref(student_ref, probs_ref, masks.numpy(), student_temp)
    assert loss.item() == pytest.approx(expected, rel=1e-5, abs=1e-6)


def test_ibot_pinned_value():
    # 3 images of 2 patches; image 0 has 2 masked patches, image 1 one, image 2 none (still counted).
    # Student logits [0,0], [0,0], [ln3,0] (τs = 1); targets [1,0], [0,1], [0,1].
    # Patch CE: ln2, ln2, −ln(1/4) = 2·ln2.  Loss = ((ln2 + ln2)/2 + 2·ln2 + 0) / 3 = ln2 = 0.6931472
    masks = torch.tensor([[True, True], [True, False], [False, False]])
    student = torch.tensor([[0.0, 0.0], [0.0, 0.0], [LN3, 0.0]])
    teacher = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 1.0]])
    loss = IBOTPatchLoss(2, student_temp=1.0)(student, teacher, masks)
    assert loss.item() == pytest.approx(0.6931472, abs=1e-6)


def test_ibot_image_permutation_invariance():
    g = torch.Generator().manual_seed(6)
    n_images, n_patches, k = 5, 8, 4
    masks = _random_masks(g, n_images, n_patches, 0.5)
    student = torch.randn(n_images, n_patches, k, generator=g)
    teacher = torch.randn(n_images, n_patches, k, generator=g)
    perm = torch.randperm(n_images, generator=g)
    loss_fn = IBOTPatchLoss(k)

    def loss_of(s, t, m):
        return loss_fn(s[m], loss_fn.teacher_probs(t[m], 0.05, "sinkhorn"), m)

    expected = loss_of(student, teacher, masks).item()
    assert loss_of(student[perm], teacher[perm], masks[perm]).item() == pytest.approx(expected, rel=1e-6)


def test_ibot_gradients_reach_student_only():
    g = torch.Generator().manual_seed(7)
    masks = _random_masks(g, 3, 6, 0.7)
    student = torch.randn(3, 6, 5, generator=g, requires_grad=True)
    teacher = torch.randn(3, 6, 5, generator=g, requires_grad=True)
    loss_fn = IBOTPatchLoss(5)
    loss_fn(student[masks], loss_fn.teacher_probs(teacher[masks], 0.04, "centering"), masks).backward()
    assert teacher.grad is None
    assert student.grad[masks].abs().sum(dim=-1).gt(0).all() and not student.grad[~masks].any()


# ---------------------------------------------------------------------------------------------------
# KoLeo


@pytest.mark.parametrize(("batch", "dim"), [(2, 3), (5, 8), (16, 4), (9, 32)])
def test_koleo_matches_oracle(batch, dim):
    features = torch.randn(batch, dim, generator=torch.Generator().manual_seed(batch + dim)) * 3
    assert KoLeoLoss()(features).item() == pytest.approx(koleo_ref(_np(features)), rel=1e-5, abs=1e-6)


def test_koleo_pinned_value():
    # Directions at 0°, 60°, 90° (lengths 2, 5, 0.3: normalisation removes them). Nearest-neighbour
    # chord lengths: 0° -> 60°: 2·sin 30° = 1; 60° <-> 90°: 2·sin 15° = 0.5176381 (twice).
    # L = −(ln 1 + 2·ln 0.5176381) / 3 = 2·0.6584789/3 = 0.4389860
    angles = torch.tensor([0.0, 60.0, 90.0]).deg2rad()
    features = torch.stack([angles.cos(), angles.sin()], dim=1) * torch.tensor([[2.0], [5.0], [0.3]])
    assert KoLeoLoss()(features).item() == pytest.approx(0.4389860, abs=1e-6)


def test_koleo_batch_permutation_invariance():
    g = torch.Generator().manual_seed(8)
    features = torch.randn(7, 5, generator=g)
    perm = torch.randperm(7, generator=g)
    assert KoLeoLoss()(features[perm]).item() == pytest.approx(KoLeoLoss()(features).item(), rel=1e-6)


@pytest.mark.parametrize("precision", ["bf16_autocast", "half_input", "bf16_input"])
def test_koleo_duplicates_stay_finite(precision):
    g = torch.Generator().manual_seed(9)
    base = torch.randn(3, 16, generator=g)
    features = torch.cat([base, base[:2]])  # two exact duplicates
    # Duplicates contribute −ln(1e-8) = 18.42 each; computed in fp32, not inf.
    expected = koleo_ref(_np(features.to(torch.bfloat16 if precision != "half_input" else torch.float16)))
    if precision == "bf16_autocast":
        x = features.clone().requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = KoLeoLoss()(x @ torch.eye(16))  # the matmul makes the input bf16, as after a head
    else:
        x = features.to(torch.float16 if precision == "half_input" else torch.bfloat16).requires_grad_()
        loss = KoLeoLoss()(x)
    loss.backward()
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    assert loss.item() == pytest.approx(expected, rel=1e-3)
    assert torch.isfinite(x.grad).all()


def test_koleo_neighbours_found_in_fp32_under_autocast():
    # Many near-ties: bf16 similarities (8 mantissa bits) would pick wrong neighbours.
    features = torch.randn(128, 3, generator=torch.Generator().manual_seed(13))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = KoLeoLoss()(features)
    assert loss.item() == pytest.approx(koleo_ref(_np(features)), rel=1e-5)


def test_koleo_batch_one_raises():
    with pytest.raises(ValueError, match=r"at least 2 samples per process.*batch size.*weight to 0"):
        KoLeoLoss()(torch.randn(1, 8))


# ---------------------------------------------------------------------------------------------------
# Gram anchoring


@pytest.mark.parametrize(("batch", "grid", "dim"), [(1, (2, 2), 3), (2, (3, 4), 8), (3, (4, 4), 5)])
def test_gram_matches_oracle(batch, grid, dim):
    g = torch.Generator().manual_seed(batch * 10 + dim)
    n_patches = grid[0] * grid[1]
    student = torch.randn(batch, n_patches, dim, generator=g)
    teacher = torch.randn(batch, n_patches, dim, generator=g)
    loss = GramLoss()(student, teacher, grid, grid)
    assert loss.item() == pytest.approx(gram_ref(_np(student), _np(teacher)), rel=1e-5)


@pytest.mark.parametrize(
    ("student_grid", "teacher_grid"), [((3, 4), (6, 8)), ((4, 3), (5, 7)), ((4, 4), (2, 3))]
)
def test_gram_resizes_teacher_bicubically(student_grid, teacher_grid):
    g = torch.Generator().manual_seed(sum(teacher_grid))
    batch, dim = 2, 4
    student = torch.randn(batch, student_grid[0] * student_grid[1], dim, generator=g)
    teacher = torch.randn(batch, teacher_grid[0] * teacher_grid[1], dim, generator=g)
    loss = GramLoss()(student, teacher, student_grid, teacher_grid)

    resized = []
    for image in _np(teacher):
        channels = image.T.reshape(dim, *teacher_grid)  # row-major patches -> (D, h', w')
        resized.append(bicubic_ref(channels, *student_grid).reshape(dim, -1).T)
    assert loss.item() == pytest.approx(gram_ref(_np(student), np.stack(resized)), rel=1e-5)


def test_gram_pinned_value():
    # Student rows (1,0), (1,1) -> unit (1,0), (1/√2, 1/√2): G_s = [[1, 1/√2], [1/√2, 1]].
    # Teacher rows (2,0), (0,3) -> G_t = I.  Loss = (0 + 1/2 + 1/2 + 0) / 4 = 0.25
    student = torch.tensor([[[1.0, 0.0], [1.0, 1.0]]])
    teacher = torch.tensor([[[2.0, 0.0], [0.0, 3.0]]])
    assert GramLoss()(student, teacher, (1, 2), (1, 2)).item() == pytest.approx(0.25, abs=1e-6)


def test_gram_zero_for_identical_features():
    features = torch.randn(2, 12, 6, generator=torch.Generator().manual_seed(10))
    assert GramLoss()(features, features * 3, (3, 4), (3, 4)).item() == pytest.approx(0.0, abs=1e-10)
    # A spatially constant map stays constant under the bicubic resize (weights sum to 1).
    constant = torch.randn(2, 1, 6).expand(2, 12, 6)
    assert GramLoss()(constant, constant.repeat(1, 4, 1), (3, 4), (6, 8)).item() == pytest.approx(
        0.0, abs=1e-10
    )


def test_gram_image_permutation_invariance_and_gradients():
    g = torch.Generator().manual_seed(11)
    student = torch.randn(4, 6, 5, generator=g, requires_grad=True)
    teacher = torch.randn(4, 24, 5, generator=g, requires_grad=True)
    perm = torch.randperm(4, generator=g)
    loss = GramLoss()(student, teacher, (2, 3), (4, 6))
    permuted = GramLoss()(student[perm], teacher[perm], (2, 3), (4, 6))
    assert permuted.item() == pytest.approx(loss.item(), rel=1e-6)
    loss.backward()
    assert teacher.grad is None and student.grad.abs().sum() > 0


def test_gram_rejects_grid_mismatch():
    with pytest.raises(ValueError, match="grid"):
        GramLoss()(torch.zeros(1, 6, 2), torch.zeros(1, 6, 2), (2, 3), (3, 3))


# ---------------------------------------------------------------------------------------------------
# Distributed: 2 gloo processes, each with part of the batch, against one process on the full batch


def test_collectives_are_identities_without_process_group():
    t = torch.tensor([1.0, -2.0])
    assert world_size() == 1
    assert all_reduce_sum(t) is t and all_reduce_max(t) is t and torch.equal(t, torch.tensor([1.0, -2.0]))


def _targets_and_center(loss_fn, logits_steps: list[torch.Tensor], temp: float) -> dict[str, torch.Tensor]:
    out = {"sinkhorn": loss_fn.teacher_probs(logits_steps[0], temp, "sinkhorn")}
    for logits in logits_steps:
        out["centering"] = loss_fn.teacher_probs(logits, temp, "centering")
        loss_fn.update_center(logits)
    out["center"] = loss_fn.center.clone()
    return out


def _distributed_worker(rank: int, world: int, init_file: str, out_dir: str, cases: dict) -> None:
    os.environ["GLOO_SOCKET_IFNAME"] = "lo"  # loopback only
    dist.init_process_group(
        "gloo", init_method=f"file://{init_file}", rank=rank, world_size=world, timeout=timedelta(seconds=60)
    )
    try:
        assert world_size() == world
        results = {}
        for name, (loss_cls, steps, splits) in cases.items():
            local = [step[splits[rank]] for step in steps]
            results[name] = _targets_and_center(loss_cls(steps[0].shape[-1]), local, 0.07)
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_two_processes_match_single_process(tmp_path, monkeypatch):
    # Spawned workers import this module by its name: put the directory it is named from on sys.path.
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[__name__.count(".")]))
    g = torch.Generator().manual_seed(12)
    k, batch = 5, 6
    # DINO: crop-major (2·B, K) per process; rank r holds images 3r..3r+2 of both crops.
    dino_rows = torch.arange(2 * batch).reshape(2, batch)
    dino_splits = [dino_rows[:, :3].flatten(), dino_rows[:, 3:].flatten()]
    ibot_rows = torch.arange(10)
    cases = {
        "dino": (DINOLoss, [torch.randn(2 * batch, k, generator=g) for _ in range(2)], dino_splits),
        "ibot_uneven": (
            IBOTPatchLoss,
            [torch.randn(10, k, generator=g) for _ in range(2)],
            [ibot_rows[:3], ibot_rows[3:]],
        ),
        "ibot_one_empty": (
            IBOTPatchLoss,
            [torch.randn(10, k, generator=g) for _ in range(2)],
            [ibot_rows[:0], ibot_rows],
        ),
    }
    mp.spawn(_distributed_worker, args=(2, str(tmp_path / "init"), str(tmp_path), cases), nprocs=2, join=True)

    per_rank = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    for name, (loss_cls, steps, splits) in cases.items():
        single = _targets_and_center(loss_cls(k), steps, 0.07)
        for rank in range(2):
            got = per_rank[rank][name]
            for key in ("sinkhorn", "centering"):
                torch.testing.assert_close(got[key], single[key][splits[rank]], atol=1e-6, rtol=0)
            torch.testing.assert_close(got["center"], single["center"], atol=1e-6, rtol=0)
