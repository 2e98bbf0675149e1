"""Post-training quantization of a digits MLP to int8 / int4 / int3 / int2, and int2 QAT.

``MLP((256, 128, 10))`` on digits (64 inputs): Dense kernels ``(64, 256)``, ``(256, 128)``,
``(128, 10)``, so every contracting axis is divisible by the group size 32. The model is trained
in float32, then each configuration quantizes the three kernels with ``jc.quantization.quantize``
(biases stay float32) and is evaluated on ``dequantize(q)``. Bytes are the true stored bytes
(``jc.report.summarize(q).memory_bytes``: values packed at their container width: int2 = 2 bits,
int3 and int4 = 4 bits, int8 = 8 bits; float32 scales; zero points; plus the float leaves).

The last row is quantization-aware training: ``scales = calibrate(params, int2)`` once, then a
short ordinary optax loop (``jcompress.demo.fit``) on the float parameters whose loss runs the
model on ``fake_quantize(params, int2, scales=scales)`` (straight-through gradient, zero for
clipped weights), then ``quantize(params, int2, scales=scales)``.

    python examples/02_quantize_mlp.py           # 5 seeds, full training
    python examples/02_quantize_mlp.py --quick   # 1 seed, a few steps (smoke test)
"""

from __future__ import annotations

import argparse

import numpy as np
import optax

from jcompress.demo import MLP, DigitsTask, cross_entropy_loss, fit, load_digits
from jcompress.quantization import (
    MSE,
    PerChannel,
    PerGroup,
    QuantSpec,
    calibrate,
    dequantize,
    fake_quantize,
    quantize,
)
from jcompress.report import summarize

INT2 = QuantSpec(bits=2, granularity=PerGroup(32), calibration=MSE(), symmetric=False)
CONFIGS = {
    "int8 per-channel absmax": QuantSpec(bits=8, granularity=PerChannel()),
    "int4 PerGroup(32) absmax": QuantSpec(bits=4, granularity=PerGroup(32)),
    "int4 PerGroup(32) MSE": QuantSpec(bits=4, granularity=PerGroup(32), calibration=MSE()),
    "int3 PerGroup(32) MSE": QuantSpec(bits=3, granularity=PerGroup(32), calibration=MSE()),
    "int2 PerGroup(32) MSE asym": INT2,
}
QAT = "int2 + QAT (fake_quantize)"


def adamw(lr: float) -> optax.GradientTransformation:
    return optax.adamw(lr, weight_decay=1e-4)


def run_seed(seed: int, *, steps: int, qat_steps: int) -> dict[str, tuple[float, int]]:
    """``{config: (test accuracy %, true bytes)}`` for one seed."""
    task = DigitsTask(load_digits(seed=seed), MLP((256, 128, 10)))
    params, _ = fit(task.loss, adamw(3e-3), task.init(seed), task.data, steps=steps, seed=seed)

    def evaluate(p) -> tuple[float, int]:
        return 100 * task.accuracy(dequantize(p)), summarize(p).memory_bytes

    results = {"float32": evaluate(params)}
    for name, spec in CONFIGS.items():
        results[name] = evaluate(quantize(params, spec))

    # QAT: frozen int2 scales from the float model, then the same optax loop on a loss that
    # runs the model on fake-quantized parameters.
    scales = calibrate(params, INT2)
    qat_loss = cross_entropy_loss(lambda p, x: task.apply(fake_quantize(p, INT2, scales=scales), x))
    qat, _ = fit(qat_loss, adamw(1e-3), params, task.data, steps=qat_steps, seed=seed + 1000)
    results[QAT] = evaluate(quantize(qat, INT2, scales=scales))
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="1 seed, few steps")
    parser.add_argument("--seeds", type=int, default=None)
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--qat-steps", type=int, default=None)
    args = parser.parse_args()
    seeds = args.seeds or (1 if args.quick else 5)
    steps = args.steps or (60 if args.quick else 2000)
    qat_steps = args.qat_steps or (20 if args.quick else 400)

    per_seed = []
    for seed in range(seeds):
        res = run_seed(seed, steps=steps, qat_steps=qat_steps)
        per_seed.append(res)
        print(f"seed {seed}: " + "  ".join(f"{k}: {v[0]:.2f}%" for k, v in res.items()))

    names = list(per_seed[0])
    acc = {k: np.array([r[k][0] for r in per_seed]) for k in names}
    nbytes = {k: np.array([r[k][1] for r in per_seed]) for k in names}
    base = acc["float32"]

    print()
    print(f"MLP 64-256-128-10 on digits (539 test images), {seeds} seed(s), {steps} float steps,")
    print(f"{qat_steps} QAT steps; kernels quantized, biases float32")
    header = ("configuration", "test accuracy (%)", "vs float (pts)", "true bytes", "x smaller")
    widths = (26, 17, 14, 10, 9)
    print("| " + " | ".join(h.ljust(w) for h, w in zip(header, widths)) + " |")
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for k in names:
        gap = acc[k] - base
        print(
            f"| {k:<26} | {np.mean(acc[k]):6.2f} ± {np.std(acc[k]):4.2f}     | "
            f"{np.mean(gap):+6.2f} ± {np.std(gap):4.2f}  | {int(np.mean(nbytes[k])):>10} | "
            f"{np.mean(nbytes['float32']) / np.mean(nbytes[k]):9.2f} |"
        )
    lost = np.mean(base - acc["int2 PerGroup(32) MSE asym"])
    regained = np.mean(acc[QAT] - acc["int2 PerGroup(32) MSE asym"])
    print(f"\nint2 PTQ loses {lost:.2f} points; QAT recovers {regained:.2f} of them")


if __name__ == "__main__":
    main()
