"""Prune half the channels of a digits CNN, shrink it for real, fine-tune the small model.

``jcompress.demo.CNN`` (two 3x3 convs of 16 and 32 channels, flatten, Dense 64, Dense 10) is
trained on digits. ``jc.structure.dependencies`` finds the channel groups (each conv's output
channels with their bias and the next layer's input rows; Conv_1's channels are strided rows of
Dense_0's kernel after the flatten; the logits are blocked as the model output);
``structured_masks(params, 0.5, groups=groups)`` removes the half of every group's channels
with the smallest L2 norm (Li et al., 2017, arXiv:1608.08710); ``jc.structure.shrink`` returns
smaller parameters and a function that runs them. The small parameters are then fine-tuned with
an ordinary optax loop under ``jit`` (``jcompress.demo.fit``). ``shrink_linen`` gives the new
widths, so the same small parameters also run in ``CNN(channels=(8, 16), hidden=32)``.

Reported: test accuracy (mean ± std over seeds) of the dense model, the masked model before
fine-tuning, and the shrunken fine-tuned model; parameter bytes; forward time of the jitted
masked-dense model vs the jitted shrunken one on the test set (medians of interleaved repeats;
the machine is shared, so read the ratio).

    python examples/05_shrink_cnn.py           # 5 seeds, full training
    python examples/05_shrink_cnn.py --quick   # 1 seed, a few steps (smoke test)
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jcompress.demo import CNN, accuracy, cross_entropy_loss, fit, load_digits, median_seconds
from jcompress.pruning import apply_masks, structured_masks
from jcompress.report import summarize
from jcompress.structure import dependencies, shrink, shrink_linen


def run_seed(seed: int, *, steps: int, tune_steps: int, repeats: int) -> dict:
    data = load_digits(seed=seed)
    model = CNN()
    x_test = jnp.asarray(data.images("test"))

    def fn(p, x):
        return model.apply({"params": p}, x)

    train_set = (data.images("train"), data.y_train)
    params = jax.jit(model.init)(jax.random.key(seed), x_test[:1])["params"]
    params, _ = fit(
        cross_entropy_loss(fn), optax.adam(3e-3), params, train_set, steps=steps, seed=seed
    )

    groups = dependencies(fn, params, x_test)
    masks = structured_masks(params, 0.5, groups=groups)
    masked = apply_masks(params, masks)
    small_fn, small = shrink(fn, params, masks, x_test)
    tune_loss = cross_entropy_loss(small_fn)
    tuned, _ = fit(
        tune_loss, optax.adam(1e-3), small, train_set, steps=tune_steps, seed=seed + 1000
    )

    # The same small parameters in a CNN rebuilt with the new widths.
    small_vars, widths = shrink_linen(model, {"params": params}, {"params": masks}, x_test)
    rebuilt = CNN(channels=(widths["Conv_0"], widths["Conv_1"]), hidden=widths["Dense_0"])
    np.testing.assert_allclose(
        rebuilt.apply(small_vars, x_test), small_fn(small, x_test), rtol=1e-4, atol=1e-4
    )

    def test_acc(f, p) -> float:
        return 100 * float(accuracy(jax.jit(f)(p, x_test), data.y_test))

    dense_jit, small_jit = jax.jit(fn), jax.jit(small_fn)
    times = median_seconds(
        {"masked": lambda: dense_jit(masked, x_test), "shrunk": lambda: small_jit(tuned, x_test)},
        repeats=repeats,
    )
    return {
        "dense": test_acc(fn, params),
        "masked": test_acc(fn, masked),
        "shrunk+tuned": test_acc(small_fn, tuned),
        "bytes": (summarize(params).memory_bytes, summarize(small).memory_bytes),
        "widths": widths,
        "speedup": times["masked"] / times["shrunk"],
        "times": times,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="1 seed, few steps")
    parser.add_argument("--seeds", type=int, default=None)
    args = parser.parse_args()
    seeds = args.seeds or (1 if args.quick else 5)
    steps, tune_steps = (60, 20) if args.quick else (1500, 500)
    repeats = 5 if args.quick else 50

    results = []
    for seed in range(seeds):
        r = run_seed(seed, steps=steps, tune_steps=tune_steps, repeats=repeats)
        results.append(r)
        print(
            f"seed {seed}: dense {r['dense']:.2f}%  masked {r['masked']:.2f}%  "
            f"shrunk+tuned {r['shrunk+tuned']:.2f}%  speedup {r['speedup']:.2f}x"
        )

    r0 = results[0]
    print()
    print(
        f"digits CNN (16, 32 channels, hidden 64), 50% of every prunable channel group removed, "
        f"{seeds} seed(s), {steps} training + {tune_steps} fine-tuning steps"
    )
    print(f"new widths: {r0['widths']}")
    print("| model                 | test accuracy (%) | parameter bytes |")
    print("|-----------------------|-------------------|-----------------|")
    for key, label, b in (
        ("dense", "dense", r0["bytes"][0]),
        ("masked", "masked, no fine-tune", r0["bytes"][0]),
        ("shrunk+tuned", "shrunk + fine-tuned", r0["bytes"][1]),
    ):
        acc = np.array([r[key] for r in results])
        print(f"| {label:<21} | {acc.mean():6.2f} ± {acc.std():4.2f}     | {b:>15} |")
    speed = np.array([r["speedup"] for r in results])
    t = r0["times"]
    print(
        f"forward on {len(load_digits(seed=0).y_test)} test images (jit, CPU): masked dense "
        f"{1e3 * t['masked']:.3f} ms, shrunk {1e3 * t['shrunk']:.3f} ms; speedup "
        f"{speed.mean():.2f}x ± {speed.std():.2f} (median of {repeats} interleaved repeats; "
        "shared machine)"
    )


if __name__ == "__main__":
    main()
