"""Knowledge distillation on digits with jc.distillation (Hinton, Vinyals & Dean 2015).

Three experiments over several seeds (the data split, initialisations and batch order vary with
the seed), reporting test errors out of 539 as mean ± std:

1. A 64-1200-1200-10 teacher (dropout 0.2 on the input and 0.5 on the hidden layers, as in
   Hinton et al.'s MNIST setting) vs small students trained alone (no regularisation) vs the
   same students distilled from the teacher on the same training set, with the fraction of the
   student→teacher gap that distillation closes. Two students: 64-16-10 (a clear gap to the
   teacher, but little capacity to imitate it) and 64-64-10 (enough capacity, small gap).
   Hinton et al. on MNIST: student alone 146 errors, distilled 74, teacher 67.
2. A transfer set: the 64-64-10 student sees labels for only 5% of the training set and the
   teacher's soft targets for all of it (``labels=None``: pure distillation), vs the student
   trained on the 5% labels alone.
3. Distillation into a compressed student: 64-300-100-10 pruned to 90% (``jc.pruning.prune``
   around Adam, a polynomial schedule) and int4 quantization-aware (``jc.quantization.
   fake_quantize`` in the student's forward pass), with and without the teacher, one jitted
   step each.

The teacher's logits for the training set are computed once and passed as ``teacher_logits=``
(the teacher is fixed, so every step would recompute the same numbers). ``--temperature`` and
``--alpha`` were chosen on seeds 0-1; the report uses seeds 100-104.

Measured (full mode, seeds 100-104, test errors out of 539, mean ± std):

    teacher 64-1200-1200-10 (dropout)        9.4 ± 3.0
    1. 64-16-10 alone / distilled           14.0 ± 1.2 / 14.0 ± 3.5   (0% of the gap closed)
       64-64-10 alone / distilled           10.6 ± 3.0 / 10.6 ± 3.6   (0% of a 1.2-error gap)
    2. 5% labels alone / + soft targets     80.0 ± 19.2 / 11.8 ± 3.8
    3. 90% pruned + int4, alone / distilled  8.4 ± 2.3 / 10.4 ± 3.0

On digits the teacher is only a few errors better than the students (within the seed-to-seed
spread), so distilling on the same labelled data adds nothing measurable (parts 1 and 3); the
64-16-10 student has a gap but not the capacity to imitate the teacher's full distribution. The
teacher's soft targets pay off when labels are scarce (part 2: 80 -> 12 errors with 5% labels).

    python examples/03_distill.py            # full: 5 seeds (~20 minutes on 2 busy cores)
    python examples/03_distill.py --quick    # 1 seed, a few steps: a smoke run
"""

from __future__ import annotations

import argparse
import time
from functools import partial

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from jcompress import distillation as jd
from jcompress.demo import MLP, load_digits

SMALL, MEDIUM, COMPRESSED = (16, 10), (64, 10), (300, 100, 10)


class Teacher(nn.Module):
    """64-1200-1200-10 with dropout (Hinton et al. 2015, MNIST)."""

    hidden: tuple[int, ...] = (1200, 1200)
    input_rate: float = 0.2
    hidden_rate: float = 0.5

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        x = nn.Dropout(self.input_rate, deterministic=not train)(x)
        for i, h in enumerate(self.hidden):
            x = nn.relu(nn.Dense(h, name=f"Dense_{i}")(x))
            x = nn.Dropout(self.hidden_rate, deterministic=not train)(x)
        return nn.Dense(10, name=f"Dense_{len(self.hidden)}")(x)


def ce_loss(fn):
    """A ``make_train_step`` loss without a teacher: mean cross-entropy on the labels."""

    def loss(params, _teacher, x, y, **kwargs):
        logits = fn(params, x, **kwargs)
        return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, y)), {}

    return loss


def index_batches(n: int, batch: int, steps: int, seed: int):
    """``steps`` minibatches of indices, reshuffled every epoch (``batch`` capped at ``n``)."""
    rng = np.random.default_rng(seed)
    batch, done = min(batch, n), 0
    while True:
        perm = rng.permutation(n)
        for i in range(0, n - batch + 1, batch):
            if done == steps:
                return
            yield perm[i : i + batch]
            done += 1


class Runner:
    """Builds each jitted step and evaluation once and reuses it for every seed."""

    def __init__(self, cfg):
        self.cfg = cfg
        self.cache = {}

    def cached(self, name, build):
        if name not in self.cache:
            self.cache[name] = build()
        return self.cache[name]

    def fit(self, name, build, params, n, seed, batch_args):
        """``build() -> (loss_fn, optimizer)``; ``batch_args(idx) -> (teacher, x, y, kwargs)``."""

        def make():
            loss_fn, opt = build()
            return jd.make_train_step(loss_fn, opt), opt

        step, opt = self.cached(name, make)
        state = opt.init(params)
        for idx in index_batches(n, 64, self.cfg.steps, seed):
            teacher_params, x, y, kwargs = batch_args(idx)
            params, state, _, _ = step(params, state, teacher_params, x, y, **kwargs)
        return params

    def errors(self, name, fn, params, data) -> int:
        logits = self.cached("eval " + name, lambda: jax.jit(fn))(params, data.x_test)
        return int(np.sum(np.argmax(np.asarray(logits), -1) != data.y_test))


def mlp_fn(features, transform=None):
    model = MLP(features)

    def fn(params, x):
        return model.apply({"params": transform(params) if transform else params}, x)

    return model, fn


def train_teacher(run, data, seed):
    teacher = Teacher()
    params = teacher.init(jax.random.key(seed), data.x_train[:1])["params"]
    key = jax.random.key(seed + 1000)
    train_fn = lambda p, x, rngs: teacher.apply({"params": p}, x, train=True, rngs=rngs)

    def make():
        opt = optax.adam(1e-3)
        return jd.make_train_step(ce_loss(train_fn), opt), opt

    step, opt = run.cached("teacher", make)
    state = opt.init(params)
    for i, idx in enumerate(index_batches(len(data.x_train), 64, run.cfg.teacher_steps, seed)):
        rngs = {"dropout": jax.random.fold_in(key, i)}
        x, y = data.x_train[idx], data.y_train[idx]
        params, state, _, _ = step(params, state, None, x, y, rngs=rngs)
    return params, run.cached("teacher fn", lambda: jax.jit(partial(teacher.apply, train=False)))


def labelled(idx, data, teacher_logits=None):
    kwargs = {} if teacher_logits is None else {"teacher_logits": teacher_logits[idx]}
    return None, data.x_train[idx], data.y_train[idx], kwargs


# ----------------------------------------------------------------------------------------------
# 1. Students alone vs distilled
# ----------------------------------------------------------------------------------------------


def part1(run, data, seed, logits, features):
    cfg, tag = run.cfg, "-".join(map(str, features))
    model, fn = mlp_fn(features)
    init = model.init(jax.random.key(seed + 1), data.x_train[:1])["params"]
    n = len(data.x_train)
    alone = run.fit(
        "alone " + tag,
        lambda: (ce_loss(fn), optax.adam(cfg.lr)),
        init,
        n,
        seed + 2,
        lambda idx: labelled(idx, data),
    )
    kd = lambda: (
        jd.distillation_loss(fn, None, temperature=cfg.temperature, alpha=cfg.alpha),
        optax.adam(cfg.lr),
    )
    distilled = run.fit(
        "distilled " + tag, kd, init, n, seed + 2, lambda idx: labelled(idx, data, logits)
    )
    return run.errors(tag, fn, alone, data), run.errors(tag, fn, distilled, data)


# ----------------------------------------------------------------------------------------------
# 2. Transfer set: 5% labels + soft targets for everything
# ----------------------------------------------------------------------------------------------


def part2(run, data, seed, logits):
    cfg = run.cfg
    model, fn = mlp_fn(MEDIUM)
    init = model.init(jax.random.key(seed + 3), data.x_train[:1])["params"]
    n = len(data.x_train)
    few = np.random.default_rng(seed + 4).permutation(n)[: round(cfg.label_fraction * n)]
    xl, yl = data.x_train[few], data.y_train[few]
    alone = run.fit(
        "few alone",
        lambda: (ce_loss(fn), optax.adam(cfg.lr)),
        init,
        len(few),
        seed + 5,
        lambda idx: (None, xl[idx], yl[idx], {}),
    )

    def build():
        # Soft targets for a batch of the whole training set (labels=None: pure distillation,
        # alpha=1) plus the hard loss on a batch of the labelled 5%, in every step.
        soft = jd.distillation_loss(fn, None, temperature=cfg.temperature, alpha=1.0)
        hard = ce_loss(fn)

        def loss(p, _, batch, _labels):
            (x, t), (x_l, y_l) = batch
            kd, aux = soft(p, None, x, teacher_logits=t)
            ce, _ = hard(p, None, x_l, y_l)
            return cfg.alpha * kd + (1 - cfg.alpha) * ce, aux

        return loss, optax.adam(cfg.lr)

    rng = np.random.default_rng(seed + 6)

    def batch_args(idx):
        lab = rng.choice(len(few), size=min(64, len(few)), replace=False)
        return None, ((data.x_train[idx], logits[idx]), (xl[lab], yl[lab])), None, {}

    distilled = run.fit("few distilled", build, init, n, seed + 5, batch_args)
    return run.errors("medium", fn, alone, data), run.errors("medium", fn, distilled, data)


# ----------------------------------------------------------------------------------------------
# 3. A 90%-pruned, int4 quantization-aware student, with and without the teacher
# ----------------------------------------------------------------------------------------------


def part3(run, data, seed, logits):
    from jcompress.pruning import polynomial_schedule, prune, sparsity
    from jcompress.quantization import QuantSpec, fake_quantize

    cfg = run.cfg
    spec = QuantSpec(bits=4)  # int4, per output channel, absmax scales
    # QAT: the forward pass sees int4 weights (straight-through gradient to the float ones).
    model, fn = mlp_fn(COMPRESSED, lambda p: fake_quantize(p, spec))
    init = model.init(jax.random.key(seed + 7), data.x_train[:1])["params"]
    n = len(data.x_train)

    def optimizer():
        schedule = polynomial_schedule(
            cfg.final_sparsity,
            begin_step=cfg.steps // 10,
            end_step=cfg.steps * 6 // 10,
            update_every=max(cfg.steps // 50, 1),
        )
        return prune(optax.adam(cfg.lr), schedule=schedule)

    plain = run.fit(
        "pq alone",
        lambda: (ce_loss(fn), optimizer()),
        init,
        n,
        seed + 8,
        lambda idx: labelled(idx, data),
    )
    kd = lambda: (
        jd.distillation_loss(fn, None, temperature=cfg.temperature, alpha=cfg.alpha),
        optimizer(),
    )
    distilled = run.fit(
        "pq distilled", kd, init, n, seed + 8, lambda idx: labelled(idx, data, logits)
    )
    reached = min(float(sparsity(plain)), float(sparsity(distilled)))
    return run.errors("pq", fn, plain, data), run.errors("pq", fn, distilled, data), reached


# ----------------------------------------------------------------------------------------------


def summary(values) -> str:
    v = np.asarray(values, np.float64)
    return f"{v.mean():6.1f} ± {v.std(ddof=1) if len(v) > 1 else 0.0:4.1f}"


def gap_closed(results, alone, distilled) -> str:
    t, a, d = (np.mean(results[k]) for k in ("teacher", alone, distilled))
    return f"{100 * (a - d) / (a - t):.0f}% of {a - t:.1f} errors" if a > t else "no gap"


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="1 seed, a few steps (smoke run)")
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--first-seed", type=int, default=100)
    parser.add_argument("--temperature", type=float, default=2.0)
    parser.add_argument("--alpha", type=float, default=0.5)
    parser.add_argument("--parts", default="123", help="which experiments to run, e.g. 12")
    parser.add_argument("--teacher-steps", type=int, default=3000)
    cfg = parser.parse_args()
    cfg.lr, cfg.label_fraction, cfg.final_sparsity = 3e-3, 0.05, 0.9
    cfg.steps = 20 if cfg.quick else 3000
    cfg.teacher_steps = 20 if cfg.quick else cfg.teacher_steps
    seeds = range(cfg.first_seed, cfg.first_seed + (1 if cfg.quick else cfg.seeds))
    print(
        f"digits, seeds {list(seeds)}, T={cfg.temperature}, alpha={cfg.alpha}, "
        f"{cfg.steps} steps of 64 per student, teacher {cfg.teacher_steps} steps"
    )
    run, results, t0 = Runner(cfg), {}, time.perf_counter()

    def record(key, value):
        results.setdefault(key, []).append(value)
        return value

    for seed in seeds:
        data = load_digits(seed=seed)
        tparams, tfn = train_teacher(run, data, seed)
        tvars = {"params": tparams}
        line = [
            f"seed {seed}: teacher {record('teacher', run.errors('teacher', tfn, tvars, data))}"
        ]
        logits = tfn(tvars, data.x_train)
        if "1" in cfg.parts:
            for features in (SMALL, MEDIUM):
                tag = "-".join(map(str, features))
                a, d = part1(run, data, seed, logits, features)
                line.append(
                    f"64-{tag} alone {record('alone ' + tag, a)}, "
                    f"distilled {record('distilled ' + tag, d)}"
                )
        if "2" in cfg.parts:
            a, d = part2(run, data, seed, logits)
            line.append(
                f"5% labels {record('few alone', a)}, +soft targets {record('few distilled', d)}"
            )
        if "3" in cfg.parts:
            a, d, s = part3(run, data, seed, logits)
            line.append(
                f"pruned+int4 {record('pq alone', a)}, distilled "
                f"{record('pq distilled', d)} (sparsity {record('pq sparsity', s):.3f})"
            )
        print("; ".join(line), f"[{time.perf_counter() - t0:.0f}s]", flush=True)

    print(f"\ntest errors out of {len(data.y_test)}, mean ± std over {len(seeds)} seed(s)")
    print(f"  teacher 64-1200-1200-10 (dropout)          {summary(results['teacher'])}")
    if "1" in cfg.parts:
        for features in (SMALL, MEDIUM):
            tag = "-".join(map(str, features))
            print(
                f"  1. student 64-{tag:<7} alone               {summary(results['alone ' + tag])}"
            )
            print(
                f"     student 64-{tag:<7} distilled           "
                f"{summary(results['distilled ' + tag])}   gap closed: "
                f"{gap_closed(results, 'alone ' + tag, 'distilled ' + tag)}"
            )
    if "2" in cfg.parts:
        print(f"  2. 5% labels alone                         {summary(results['few alone'])}")
        print(f"     5% labels + soft targets on all         {summary(results['few distilled'])}")
    if "3" in cfg.parts:
        print(f"  3. 90% pruned + int4 QAT, no teacher       {summary(results['pq alone'])}")
        print(
            f"     90% pruned + int4 QAT, distilled        {summary(results['pq distilled'])}"
            f"   (sparsity >= {min(results['pq sparsity']):.3f})"
        )


if __name__ == "__main__":
    main()
