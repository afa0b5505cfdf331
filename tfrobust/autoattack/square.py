"""Square Attack (Andriushchenko, Croce, Flammarion and Hein, ECCV 2020): score-based random search.

Square-shaped updates on the margin loss, no gradients (L-inf: Algorithm 2;
L2: Algorithm 3). See the package docstring of :mod:`tfrobust.autoattack`
for the differences from the reference.
"""

from __future__ import annotations

import numpy as np
import tensorflow as tf

from tfrobust import seeds
from tfrobust.attacks import margin, per_example, project
from tfrobust.autoattack.core import (
    LABEL_SPEC, SCALAR_SPEC, SEED_SPEC, Survivors, TINY, as_inputs, check_eps, check_norm, check_positive_int,
    check_seed, compiled, image_spec, normalize, predict_logits, predicted,
)
from tfrobust.errors import UserError
from tfrobust.seeds import attack_seed


def _square_p(i, p_init, n_queries, rescale):
    """Fraction of pixels changed at iteration ``i`` (Andriushchenko et al. 2020; the reference schedule)."""
    it = tf.cast(i, tf.float64)
    if rescale:
        it = tf.floor(it / n_queries * 10000.0)
    bounds = tf.constant([10, 50, 200, 500, 1000, 2000, 4000, 6000, 8000], tf.float64)
    halvings = tf.reduce_sum(tf.cast(it > bounds, tf.float64))
    return p_init / tf.pow(tf.constant(2.0, tf.float64), halvings)


def _harmonic2(n):
    """Table H[k] = sum_{m=1}^{k} 1 / m^2, k = 0..n."""
    return np.concatenate([[0.0], np.cumsum(1.0 / np.arange(1, n + 1) ** 2)])


def _square_l2_pattern_np(s):
    """The s x s L2 update pattern of Square (Alg. 3): two halves of opposite sign,
    each a pyramid of nested squares with weights sum_{k >= d} 1 / (k + 1)^2 (d the
    Chebyshev distance to the half's centre), each half of unit norm, the whole of unit norm."""
    table = _harmonic2(s + 1)
    out = np.zeros((s, s))
    half = s // 2
    top_k = s // 2 + 1
    for rows, cx, sign in ((range(0, half), half // 2, 1.0), (range(half, s), half + (s - half) // 2, -1.0)):
        block = np.zeros((s, s))
        for i in rows:
            for j in range(s):
                dist = max(abs(i - cx), abs(j - s // 2))
                block[i, j] = table[top_k] - table[dist]
        n = np.sqrt((block ** 2).sum())
        if n > 0:
            out += sign * block / n
    return out / max(np.sqrt((out ** 2).sum()), TINY)


def _square_l2_pattern(rows, cols, vh, vw, s, transpose, table):
    """The L2 pattern of size ``s`` placed at (vh, vw), per example, as (B, H, W, 1).

    ``rows``/``cols`` are (1, H, 1)/(1, 1, W) index grids; vh, vw, transpose are (B,).
    """
    i = rows - vh[:, None, None]
    j = cols - vw[:, None, None]
    inside = (i >= 0) & (i < s) & (j >= 0) & (j < s)
    tr = transpose[:, None, None]
    i, j = tf.where(tr, j, i), tf.where(tr, i, j)
    half = s // 2
    top = i < half
    cx = tf.where(top, half // 2, half + (s - half) // 2)
    dist = tf.maximum(tf.abs(i - cx), tf.abs(j - s // 2))
    dist = tf.clip_by_value(dist, 0, tf.shape(table)[0] - 1)
    value = tf.gather(table, s // 2 + 1) - tf.gather(table, dist)
    top_v = tf.where(inside & top, value, 0.0)
    bottom_v = tf.where(inside & tf.logical_not(top), value, 0.0)
    n_top = tf.sqrt(tf.reduce_sum(tf.square(top_v), axis=[1, 2], keepdims=True))
    n_bottom = tf.sqrt(tf.reduce_sum(tf.square(bottom_v), axis=[1, 2], keepdims=True))
    pattern = tf.math.divide_no_nan(top_v, n_top) - tf.math.divide_no_nan(bottom_v, n_bottom)
    total = tf.sqrt(tf.reduce_sum(tf.square(pattern), axis=[1, 2], keepdims=True))
    return tf.cast(tf.math.divide_no_nan(pattern, total), tf.float32)[..., None]


def _uniforms(seed, tag, n):
    return tf.random.stateless_uniform([n], tf.random.experimental.stateless_fold_in(seed, tag))


def _signs(seed, tag, shape):
    u = tf.random.stateless_uniform(shape, tf.random.experimental.stateless_fold_in(seed, tag))
    return tf.where(u < 0.5, -1.0, 1.0)


class _SquareSearch:
    """The random search of one configuration (norm, budget, schedule, image shape), traced once.

    ``run(x, y, eps, seed)`` returns the best point found, its margin and the queries used.
    """

    def __init__(self, call, norm, n_queries, p_init, rescale, shared, quirks, image_shape):
        self.call, self.norm, self.n_queries = call, norm, n_queries
        self.p_init, self.rescale, self.shared, self.quirks = p_init, rescale, shared, quirks
        self.h, self.w, self.c = (int(v) for v in image_shape)
        self.side = min(self.h, self.w)
        self.table = tf.constant(_harmonic2(self.side + 2), tf.float64)
        self.rows = tf.range(self.h)[None, :, None]
        self.cols = tf.range(self.w)[None, None, :]

    def _position(self, u, s, size):
        span = size - s if self.quirks else size - s + 1
        return tf.minimum(tf.cast(tf.floor(u * tf.cast(span, tf.float32)), tf.int32), tf.maximum(size - s, 0))

    def _window(self, vh, vw, s):
        rows, cols = self.rows, self.cols
        m = ((rows >= vh[:, None, None]) & (rows < vh[:, None, None] + s)
             & (cols >= vw[:, None, None]) & (cols < vw[:, None, None] + s))
        return tf.cast(m, tf.float32)[..., None]

    def _side_length(self, i):
        p = _square_p(i, self.p_init, self.n_queries, self.rescale)
        s = tf.cast(tf.round(tf.sqrt(p * self.h * self.w)), tf.int32)
        if self.norm == "linf":
            s = tf.maximum(s, 1)
        else:
            s = tf.maximum(s, 3)
            s = s + 1 - tf.math.floormod(s, 2)
        return tf.minimum(s, self.side)

    def _l2_init(self, batch, seed):
        h, w, c = self.h, self.w, self.c
        s0 = self.side // 5
        delta = tf.zeros([batch, h, w, c])
        pat = _square_l2_pattern_np(s0)
        off_h, off_w = (h - 5 * s0) // 2, (w - 5 * s0) // 2
        n_draw = 1 if self.shared else batch
        k = 0
        for a in range(h // s0):
            for b in range(w // s0):
                vh, vw = off_h + a * s0, off_w + b * s0
                if vh >= h or vw >= w:
                    continue
                canvases = []
                for p in (pat, pat.T):
                    canvas = np.zeros((h, w))
                    hh, ww = min(s0, h - vh), min(s0, w - vw)
                    canvas[vh:vh + hh, vw:vw + ww] = p[:hh, :ww]
                    canvases.append(tf.constant(canvas[None, :, :, None], tf.float32))
                flip = _uniforms(seed, 1000 + 2 * k, n_draw) < 0.5
                flip = tf.broadcast_to(flip, [batch])[:, None, None, None]
                sgn = _signs(seed, 1001 + 2 * k, [batch, 1, 1, c])
                delta = delta + tf.where(flip, canvases[1], canvases[0]) * sgn
                k += 1
        return delta

    def _linf_candidate(self, xs, xb, eps, mask1, it_seed, active, batch, n_draw):
        c = self.c
        colour = tf.gather(tf.broadcast_to(_signs(it_seed, 3, [n_draw, 1, 1, c]), [batch, 1, 1, c]), active)
        x_new = tf.clip_by_value(xb + mask1 * (2.0 * eps) * colour, xs - eps, xs + eps)
        return tf.clip_by_value(x_new, 0.0, 1.0)

    def _l2_candidate(self, xs, xb, eps, s, vh, vw, mask1, draw, it_seed, active, batch):
        c = self.c
        vh2 = self._position(draw(4), s, self.h)
        vw2 = self._position(draw(5), s, self.w)
        mask2 = self._window(vh2, vw2, s)
        transpose = draw(6) < 0.5
        colour = tf.gather(_signs(it_seed, 7, [batch, 1, 1, c]), active)
        delta = xb - xs
        union = tf.maximum(mask1, mask2)
        n_window1 = tf.sqrt(tf.reduce_sum(tf.square(delta * mask1), axis=[1, 2], keepdims=True))
        n_image = tf.sqrt(tf.reduce_sum(tf.square(delta), axis=[1, 2, 3], keepdims=True))
        n_windows = tf.sqrt(tf.reduce_sum(tf.square(delta * union), axis=[1, 2], keepdims=True))
        pattern = _square_l2_pattern(self.rows, self.cols, vh, vw, s, transpose, self.table)
        new = pattern * colour + delta * mask1 / (TINY + n_window1)
        n_new = tf.sqrt(tf.reduce_sum(tf.square(new), axis=[1, 2], keepdims=True))
        budget = tf.sqrt(tf.maximum(eps * eps - tf.square(n_image), 0.0) / c + tf.square(n_windows))
        new = new / (TINY + n_new) * budget
        delta = tf.where(mask1 > 0, new, tf.where(mask2 > 0, 0.0, delta))
        return tf.clip_by_value(xs + eps * normalize(delta, "l2"), 0.0, 1.0)

    def run(self, x, y, eps, seed):
        call = self.call
        batch = tf.shape(x)[0]
        n_draw = 1 if self.shared else batch
        if self.norm == "linf":
            x_best = tf.clip_by_value(x + eps * _signs(seed, 1, [batch, 1, self.w, self.c]), 0.0, 1.0)
        else:
            x_best = tf.clip_by_value(x + eps * normalize(self._l2_init(batch, seed), "l2"), 0.0, 1.0)
        margin_min = margin(call(x_best), y)
        queries = tf.ones([batch], tf.int32)

        def body(i, x_best, margin_min, queries):
            it_seed = tf.random.experimental.stateless_fold_in(seed, i + 1)
            active = tf.where(margin_min > 0)[:, 0]
            xs = tf.gather(x, active)
            ys = tf.gather(y, active)
            xb = tf.gather(x_best, active)
            m_old = tf.gather(margin_min, active)
            s = self._side_length(i)

            def draw(tag):
                u = tf.broadcast_to(_uniforms(it_seed, tag, n_draw), [batch])
                return tf.gather(u, active)

            vh = self._position(draw(1), s, self.h)
            vw = self._position(draw(2), s, self.w)
            mask1 = self._window(vh, vw, s)
            if self.norm == "linf":
                x_new = self._linf_candidate(xs, xb, eps, mask1, it_seed, active, batch, n_draw)
            else:
                x_new = self._l2_candidate(xs, xb, eps, s, vh, vw, mask1, draw, it_seed, active, batch)
            m_new = margin(call(x_new), ys)
            improved = m_new < m_old
            xb = tf.where(per_example(improved, xb), x_new, xb)
            m_upd = tf.where(improved, m_new, m_old)
            x_best = tf.tensor_scatter_nd_update(x_best, active[:, None], xb)
            margin_min = tf.tensor_scatter_nd_update(margin_min, active[:, None], m_upd)
            queries = tf.tensor_scatter_nd_add(queries, active[:, None], tf.ones_like(ys))
            return i + 1, x_best, margin_min, queries

        def cond(i, x_best, margin_min, queries):
            return tf.logical_and(i < self.n_queries, tf.reduce_any(margin_min > 0))

        _, x_best, margin_min, queries = tf.while_loop(
            cond, body, (tf.constant(0), x_best, margin_min, queries))
        return x_best, margin_min, queries


def _square_fn(model, shape, norm, n_queries, p_init, rescale, shared, quirks):
    key = ("square", tuple(shape[1:]), norm, int(n_queries), float(p_init), bool(rescale), bool(shared),
           bool(quirks))
    return compiled(
        model,
        key,
        lambda call: tf.function(
            _SquareSearch(call, norm, int(n_queries), float(p_init), bool(rescale), bool(shared), bool(quirks),
                          shape[1:]).run,
            input_signature=[image_spec(shape), LABEL_SPEC, SCALAR_SPEC, SEED_SPEC],
        ),
    )


def square(model_fn, x, y, eps, norm="linf", n_queries=5000, p_init=0.8, seed=0, *, n_restarts=1,
           rescale_schedule=False, reference_quirks=False):
    """Square Attack (Andriushchenko et al., ECCV 2020, Algorithm 1; L-inf Alg. 2, L2 Alg. 3).

    Score-based random search on the margin loss z_y - max_{k != y} z_k: no
    gradients, one model query per iteration and image. L-inf: start from
    vertical stripes x +- eps; each iteration sets a random square window of
    side round(sqrt(p * h * w)) (all channels) to x +- eps with one random sign
    per channel. L2: start from a 5 x 5 grid of +-"pyramid" patterns scaled to
    norm eps; each iteration moves the perturbation mass of a second random
    window into the first, redrawn as a two-halves pyramid (Alg. 3). A candidate
    replaces the current point when it lowers the margin. The fraction p starts
    at ``p_init`` and halves after iterations 10, 50, 200, 500, 1000, 2000,
    4000, 6000 and 8000 (``rescale_schedule=True`` rescales these to
    ``n_queries`` out of 10000; AutoAttack does not). Each image stops once
    misclassified.

    Images must be NHWC; for L2 both sides must be >= 5 pixels.

    Args:
      reference_quirks: draw one window position per batch (and for L-inf one
        colour, for L2 one pattern orientation) and never place a window on the
        last row or column, as the reference implementation does. By default
        these are drawn per image and positions cover the whole image, as in
        the paper.

    Returns:
      ``x_adv`` (tf.Tensor): the misclassified point found, ``x`` elsewhere.
    """
    norm = check_norm(norm)
    eps = check_eps(eps)
    n_queries = check_positive_int("n_queries", n_queries)
    n_restarts = check_positive_int("n_restarts", n_restarts, 0)
    seed = check_seed(seed)
    if not (isinstance(p_init, (int, float)) and 0 < p_init <= 1):
        raise UserError(f"p_init must be in (0, 1], got {p_init!r}")
    x, y = as_inputs(x, y)
    if x.shape.rank != 4:
        raise UserError(f"Square needs NHWC images, got shape {x.shape}")
    if norm == "l2" and min(int(x.shape[1]), int(x.shape[2])) < 5:
        raise UserError(f"L2 Square needs images of at least 5 x 5 pixels, got {x.shape[1]} x {x.shape[2]}")
    if int(x.shape[0]) == 0 or eps == 0.0:
        return x
    survivors = Survivors(model_fn, x, y)
    run = _square_fn(model_fn, x.shape, norm, n_queries, p_init, rescale_schedule, reference_quirks,
                     reference_quirks)

    def attempt(idx, xs, ys, restart):
        x_found, _, _ = run(xs, ys, tf.constant(eps, tf.float32), attack_seed(seed, seeds.SQUARE, restart))
        x_found = project(x_found, xs, eps, norm)
        return x_found.numpy(), (predicted(predict_logits(model_fn, x_found)) != ys).numpy()

    survivors.restarts(n_restarts, attempt)
    return survivors.result()


__all__ = ["square"]
