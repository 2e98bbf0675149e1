"""Benchmark: cost of a distillation step relative to a plain training step of the student.

Three jitted steps (value_and_grad + Adam update) of the same student, timed side by side in
one process with interleaved repeats (medians reported):

* ``plain``: cross-entropy on labels, no teacher;
* ``distill``: ``jc.distillation.distillation_loss`` (alpha=0.5), the teacher's forward pass
  inside the step (its backward pass is skipped: stop_gradient);
* ``precomputed``: the same loss with ``teacher_logits=`` (stored once for a fixed transfer
  set), so no teacher runs in the step.

The expected extra cost of ``distill`` over ``plain`` is one teacher forward pass, timed alone
as ``teacher_fwd``. Timed with ``benchmarks/_harness.py`` (interleaved medians, noise measure).

    python benchmarks/distill.py [--quick]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import optax

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _harness import Run

from jcompress import distillation as jd
from jcompress.demo import MLP

TEACHER = (1200, 1200, 10)


def build(student_features, batch, seed=0):
    k = jax.random.split(jax.random.key(seed), 4)
    x = jax.random.uniform(k[0], (batch, 64))
    y = jax.random.randint(k[1], (batch,), 0, 10)
    student, teacher = MLP(student_features), MLP(TEACHER)
    sp = student.init(k[2], x)["params"]
    tp = teacher.init(k[3], x)["params"]
    sfn = lambda p, x: student.apply({"params": p}, x)
    tfn = lambda p, x: teacher.apply({"params": p}, x)
    opt = optax.adam(1e-3)

    def plain_loss(p, _, x, y):
        return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(sfn(p, x), y)), {}

    plain = jd.make_train_step(plain_loss, opt)
    distill = jd.make_train_step(jd.distillation_loss(sfn, tfn, temperature=4.0, alpha=0.5), opt)
    teacher_fwd = jax.jit(tfn)
    logits = teacher_fwd(tp, x)
    state = opt.init(sp)
    runs = {
        "plain": lambda: plain(sp, state, None, x, y),
        "distill": lambda: distill(sp, state, tp, x, y),
        "precomputed": lambda: distill(sp, state, None, x, y, teacher_logits=logits),
        "teacher_fwd": lambda: teacher_fwd(tp, x),
    }
    return runs


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="few repeats (a smoke run)")
    args = parser.parse_args(argv)
    run = Run("distill", script=__file__, argv=argv, quick=args.quick)
    repeats = 3 if args.quick else 15
    configs = [((30, 10), 64), ((30, 10), 512), ((300, 100, 10), 64), ((300, 100, 10), 512)]
    if args.quick:
        configs = configs[:1]
    columns = ["student", "batch", "plain ms", "distill ms", "precomputed ms", "teacher fwd ms"]
    columns += ["distill / plain", "precomputed / plain"]
    title = f"a train step of the student (teacher 64-{'-'.join(map(str, TEACHER))}), medians"
    with run.table("step", title, columns) as t:
        for features, batch in configs:
            m = run.interleaved(build(features, batch), repeats=repeats).wall
            t.row(
                ["64-" + "-".join(map(str, features)), batch,
                 *(1e3 * m[k] for k in ("plain", "distill", "precomputed", "teacher_fwd")),
                 m["distill"] / m["plain"], m["precomputed"] / m["plain"]],
                data=m,
            )  # fmt: skip
    run.finish()


if __name__ == "__main__":
    main()
