"""Training on the IPU model against numpy: the same model, the same initial
parameters (read from the simulator before the first step), the same batches, 50
steps; the loss curves agree within 1e-3 relative.

The numpy side is written out by hand (forward and backward of each layer, the
optimizers as torch.optim computes them), in float64, independently of the
gradient rules it checks.
"""
from __future__ import annotations

import sys

import numpy as np
import pytest
from numpy.lib.stride_tricks import sliding_window_view

import popdsl
from popdsl.ir import graph as g
from popdsl.ir.target import get_target
from popdsl.passes.partition import partition
from popdsl.pipeline import compile_source

STEPS = 50
RTOL = 1e-3


# ---------------------------------------------------------------- numpy: layers

def softmax_ce(logits, labels):
    z = logits - logits.max(axis=1, keepdims=True)
    p = np.exp(z) / np.exp(z).sum(axis=1, keepdims=True)
    n = len(labels)
    loss = -np.log(p[np.arange(n), labels]).mean()
    d = p.copy()
    d[np.arange(n), labels] -= 1
    return loss, d / n


def conv_fwd(x, w):                      # stride 1, padding 1
    k = w.shape[2]
    win = sliding_window_view(np.pad(x, ((0, 0), (0, 0), (1, 1), (1, 1))), (k, k), axis=(2, 3))
    return np.einsum("nchwyx,ocyx->nohw", win, w), win


def conv_bwd(dy, w, win, shape):
    k = w.shape[2]
    dw = np.einsum("nohw,nchwyx->ocyx", dy, win)
    n, c, h, wd = shape
    dxp = np.zeros((n, c, h + 2, wd + 2))
    for ky in range(k):
        for kx in range(k):
            dxp[:, :, ky:ky + h, kx:kx + wd] += np.einsum("nohw,oc->nchw", dy, w[:, :, ky, kx])
    return dxp[:, :, 1:-1, 1:-1], dw


def bn_fwd(x, gamma, beta, state, name, eps=1e-5):
    mu = x.mean(axis=(0, 2, 3))
    var = x.var(axis=(0, 2, 3))
    m = x.size // x.shape[1]
    state[name + ".running_mean"] = 0.9 * state[name + ".running_mean"] + 0.1 * mu
    state[name + ".running_var"] = 0.9 * state[name + ".running_var"] + 0.1 * var * m / (m - 1)
    xhat = (x - mu[:, None, None]) / np.sqrt(var + eps)[:, None, None]
    return gamma[:, None, None] * xhat + beta[:, None, None], (xhat, var, gamma, m)


def bn_bwd(dy, cache, eps=1e-5):
    xhat, var, gamma, m = cache
    dgamma, dbeta = (dy * xhat).sum(axis=(0, 2, 3)), dy.sum(axis=(0, 2, 3))
    dxhat = dy * gamma[:, None, None]
    dx = (m * dxhat - dxhat.sum(axis=(0, 2, 3))[:, None, None]
          - xhat * (dxhat * xhat).sum(axis=(0, 2, 3))[:, None, None]) / (m * np.sqrt(var + eps)[:, None, None])
    return dx, dgamma, dbeta


def pool_fwd(x):                         # 2x2, stride 2; the gradient to the first maximum
    n, c, h, w = x.shape
    win = x.reshape(n, c, h // 2, 2, w // 2, 2).transpose(0, 1, 2, 4, 3, 5).reshape(n, c, h // 2, w // 2, 4)
    return win.max(axis=4), win.argmax(axis=4)


def pool_bwd(dy, first, shape):
    n, c, h, w = shape
    d = np.zeros((n, c, h // 2, w // 2, 4))
    np.put_along_axis(d, first[..., None], dy[..., None], axis=4)
    return d.reshape(n, c, h // 2, w // 2, 2, 2).transpose(0, 1, 2, 4, 3, 5).reshape(shape)


# ---------------------------------------------------------------- numpy: optimizers (torch.optim)

def sgd(lr, momentum=0.0, weight_decay=0.0):
    def step(params, grads, state):
        for k in params:
            d = grads[k] + weight_decay * params[k]
            if momentum:
                d = state[k + ".momentum"] = momentum * state.get(k + ".momentum", 0.0) + d
            params[k] = params[k] - lr * d
    return step


def adam(lr, beta1=0.9, beta2=0.999, eps=1e-8):
    def step(params, grads, state):
        t = state["adam.step"] = state.get("adam.step", 0) + 1
        for k in params:
            m = state[k + ".adam_m"] = beta1 * state.get(k + ".adam_m", 0.0) + (1 - beta1) * grads[k]
            v = state[k + ".adam_v"] = beta2 * state.get(k + ".adam_v", 0.0) + (1 - beta2) * grads[k] ** 2
            denom = np.sqrt(v) / np.sqrt(1 - beta2 ** t) + eps
            params[k] = params[k] - lr / (1 - beta1 ** t) * m / denom
    return step


# ---------------------------------------------------------------- numpy: models

def mlp(params, state, x, y):
    z1 = x @ params["dense_1.w"] + params["dense_1.b"]
    h = np.maximum(z1, 0)
    loss, dl = softmax_ce(h @ params["dense_2.w"] + params["dense_2.b"], y)
    dz1 = (dl @ params["dense_2.w"].T) * (z1 > 0)
    return loss, {"dense_2.w": h.T @ dl, "dense_2.b": dl.sum(0), "dense_1.w": x.T @ dz1, "dense_1.b": dz1.sum(0)}


def cnn(params, state, x, y):
    grads, caches, a = {}, [], x
    for s in (1, 2):
        name = f"stage_{s}.conv_bn_1"
        z, win = conv_fwd(a, params[name + ".conv_1.w"])
        b, bc = bn_fwd(z, params[name + ".batch_norm_1.gamma"], params[name + ".batch_norm_1.beta"], state,
                       name + ".batch_norm_1")
        r = np.maximum(b, 0)
        pooled, first = pool_fwd(r)
        caches.append((name, a.shape, win, bc, b, first, r.shape))
        a = pooled
    flat = a.reshape(len(x), -1)
    loss, dl = softmax_ce(flat @ params["dense_1.w"] + params["dense_1.b"], y)
    grads["dense_1.w"], grads["dense_1.b"] = flat.T @ dl, dl.sum(0)
    da = (dl @ params["dense_1.w"].T).reshape(a.shape)
    for name, in_shape, win, bc, b, first, r_shape in reversed(caches):
        dr = pool_bwd(da, first, r_shape) * (b > 0)
        dz, grads[name + ".batch_norm_1.gamma"], grads[name + ".batch_norm_1.beta"] = bn_bwd(dr, bc)
        da, grads[name + ".conv_1.w"] = conv_bwd(dz, params[name + ".conv_1.w"], win, in_shape)
    return loss, grads


# ---------------------------------------------------------------- the runs

MLP = """import "popnn";
graph mlp(tiles = 16) {
    input x: f32[16, 12];
    input y: i32[16];
    let logits = dense(relu(dense(x, 32)), 4);
    let loss = mean(cross_entropy(logits, y));
    output loss;
    minimize loss with OPTIMIZER;
}
"""

CNN = """import "popnn";
def stage(x: f32[N, C, H, W], filters: int) -> f32[N, filters, OH, OW] {
    return max_pool2d(relu(conv_bn(x, filters, 3, 1, 1)), 2);
}
graph cnn(tiles = 64) {
    input x: f32[8, 1, 8, 8];
    input y: i32[8];
    let h = stage(stage(x, 4), 6);
    let logits = dense(reshape(h, [8, 24]), 3);
    let loss = mean(cross_entropy(logits, y));
    output loss;
    minimize loss with OPTIMIZER;
}
"""


def batches(shape, classes, seed, distinct=5):
    """Inputs for STEPS steps, `distinct` batches over and over (epochs), and the
    labels a fixed linear teacher gives them (so there is something to learn)."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((distinct * shape[0],) + shape[1:]).astype(np.float32)
    teacher = rng.standard_normal((int(np.prod(shape[1:])), classes))
    y = (x.reshape(len(x), -1) @ teacher).argmax(axis=1).astype(np.int32)
    reps = -(-STEPS // distinct)
    return np.tile(x, (reps,) + (1,) * (x.ndim - 1))[:STEPS * shape[0]], np.tile(y, reps)[:STEPS * shape[0]]


def train_both(src, optimizer, np_opt, model, shape, classes, seed=0):
    exe = popdsl.compile(src.replace("OPTIMIZER", optimizer))
    params = {t.name: None for t in exe.ir.tensors if t.kind == "param"}
    x, y = batches(shape, classes, seed)
    with popdsl.Simulator(exe, threads=2) as sim:
        params = {k: sim.read(k).astype(np.float64) for k in params}
        state = {t.name: sim.read(t.name).astype(np.float64) for t in exe.ir.tensors
                 if t.kind == "var" and "running" in t.name}
        device = sim.run({"x": x, "y": y}, steps=STEPS)["loss"]
        final = {t.name: sim.read(t.name) for t in exe.ir.tensors if t.kind in ("param", "var")}
    b = shape[0]
    losses = []
    for s in range(STEPS):
        loss, grads = model(params, state, x[s * b:(s + 1) * b].astype(np.float64), y[s * b:(s + 1) * b])
        np_opt(params, grads, state)
        losses.append(loss)
    want = {**params, **state}
    assert set(final) == set(want)          # the optimizer's state: named as numpy's (and PyTorch's)
    return device, np.array(losses), final, want


@pytest.mark.parametrize("optimizer,np_opt", [
    ("sgd(lr = 0.05, momentum = 0.9, weight_decay = 0.001)", sgd(0.05, 0.9, 0.001)),
    ("adam(lr = 0.01)", adam(0.01)),
], ids=["sgd-momentum", "adam"])
def test_mlp_loss_curve_matches_numpy(optimizer, np_opt):
    device, reference, final, want = train_both(MLP, optimizer, np_opt, mlp, (16, 12), 4)
    assert reference[-1] < 0.5 * reference[0]               # it learns
    np.testing.assert_allclose(device, reference, rtol=RTOL)
    for k, v in want.items():
        np.testing.assert_allclose(final[k], v, rtol=RTOL, atol=1e-4, err_msg=k)


def test_cnn_with_batch_norm_loss_curve_matches_numpy():
    device, reference, final, want = train_both(CNN, "sgd(lr = 0.05, momentum = 0.9)", sgd(0.05, 0.9), cnn,
                                                (8, 1, 8, 8), 3)
    assert reference[-1] < 0.5 * reference[0]
    np.testing.assert_allclose(device, reference, rtol=RTOL)
    # Parameters and the running statistics batch norm keeps (momentum 0.1, unbiased).
    for k, v in want.items():
        np.testing.assert_allclose(final[k], v, rtol=RTOL, atol=1e-4, err_msg=k)


@pytest.mark.parametrize("optimizer,np_opt", [
    ("sgd(lr = 0.05, momentum = 0.9, weight_decay = 0.001)", sgd(0.05, 0.9, 0.001)),
    ("adam(lr = 0.01)", adam(0.01)),
], ids=["sgd-momentum", "adam"])
def test_each_var_takes_its_new_value_once_nothing_reads_its_old_one(monkeypatch, optimizer, np_opt):
    """A var is written as soon as nothing left to compute reads it, not all at
    the end of the step; its update's own reads (weight decay, the momentum, Adam's
    step count) still see the old value: one step equals numpy's to float32
    rounding (a read of a new value is off by lr x weight decay x p and more)."""
    monkeypatch.setattr(sys.modules[__name__], "STEPS", 1)
    _, _, final, want = train_both(MLP, optimizer, np_opt, mlp, (16, 12), 4)
    for k, v in want.items():
        np.testing.assert_allclose(final[k], v, rtol=1e-5, atol=1e-6, err_msg=k)
    graph = partition(compile_source(MLP.replace("OPTIMIZER", optimizer), "<string>", get_target("gc200"),
                                     stop_after="autodiff"))
    trained = {t.id for t in graph.tensors if t.kind in ("param", "var")}
    program = graph.program.body
    writes = [k for k, n in enumerate(program) if isinstance(n, g.Copy) and n.dst.tensor in trained]
    computes = [k for k, n in enumerate(program) if isinstance(n, g.Execute)]
    assert writes and writes[0] < computes[-1]
