"""The walk over a batch in micro-batches: the train step runs each of its passes through it.

With one micro-batch the pass runs once on the whole batch, exactly as
written; with ``n`` it runs on each of ``n`` micro-batches one after the other
(docs/algorithms.md, section 17), so that only one micro-batch's activations
are alive at a time.
"""

from __future__ import annotations

import tensorflow as tf


class MicroBatches:
    """Runs a pass of the step over ``n`` micro-batches of a batch.

    ``run(fn, tensors)`` calls ``fn(fraction, *chunks)``, which returns
    ``(sums, parts)``: lists of tensors, the first summed over the
    micro-batches, the second placed in the batch's rows. ``fraction`` is the
    micro-batch's share of the batch, or None when the batch is not split
    (``n == 1``: ``fn`` runs once, on the tensors as they are).
    """

    def __init__(self, n: int):
        self.n = int(n)

    @property
    def split(self) -> bool:
        """Whether the batch is split (``n > 1``)."""
        return self.n > 1

    def run(self, fn, tensors):
        if not self.split:
            return fn(None, *tensors)
        return self._walk(fn, tensors)

    def _walk(self, fn, tensors):
        """The micro-batches after the first run in a ``tf.while_loop``.

        A batch of ``b`` examples gives micro-batches of ``b // n``, the first
        one taking the remainder (the last, partial batch of an epoch). Rows
        are gathered and scattered by index, so that under XLA every shape is
        a compile-time constant while the start moves.
        """
        n = self.n
        size = tf.shape(tensors[0])[0]
        chunk, rest = size // n, size % n
        total = tf.cast(size, tf.float32)

        def run(start, length):
            rows = start + tf.range(length)
            return fn(tf.cast(length, tf.float32) / total, *[tf.gather(t, rows) for t in tensors])

        def place(buffers, start, parts):
            if not parts:
                return []
            rows = (start + tf.range(tf.shape(parts[0])[0]))[:, None]
            return [tf.tensor_scatter_nd_update(b, rows, p) for b, p in zip(buffers, parts)]

        sums, parts = run(0, chunk + rest)
        shapes = [tf.TensorShape([None]) + p.shape[1:] for p in parts]
        zeros = [tf.ensure_shape(tf.zeros(tf.concat([[size], tf.shape(p)[1:]], 0), p.dtype), shape)
                 for p, shape in zip(parts, shapes)]
        buffers = place(zeros, 0, parts)

        def body(i, sums, buffers):
            start = rest + i * chunk
            more, parts = run(start, chunk)
            return i + 1, [a + b for a, b in zip(sums, more)], place(buffers, start, parts)

        count = tf.where(chunk > 0, n, 1)  # fewer examples than micro-batches: all in the first
        _, sums, buffers = tf.while_loop(
            lambda i, *_: i < count, body, (tf.constant(1), sums, buffers), parallel_iterations=1,
            shape_invariants=(tf.TensorShape([]), [s.shape for s in sums], shapes),
        )
        return sums, buffers


__all__ = ["MicroBatches"]
