"""``jcompress demo``: train, prune, distill, quantize, save and measure LeNet-300-100 on digits.

Every stage runs only when the jcompress piece it needs is installed, and the printout says
which stages ran and which were skipped: nothing is claimed that was not done.

1. Train the teacher, LeNet-300-100 (``MLP((300, 100, 10))``), on digits with Adam.
2. Prune a copy to 90% of its kernels with gradual magnitude pruning and one global threshold
   (Zhu & Gupta 2017: ``jc.pruning.prune`` with ``polynomial_schedule``, Adam 3e-3; the global
   threshold spares the small output layer) while distilling from the teacher
   (``jc.distillation.distillation_loss``, Hinton et al. 2015), or with cross-entropy alone.
3. Quantize the pruned student to int8 and int4 (per-channel scales, MSE-calibrated clipping),
   and to per-layer bit widths chosen by ``jc.budget`` for an eighth of the float bytes (the
   sensitivity table and the allocation are printed).
4. Save every variant with ``jc.checkpoint.save``, load it back and check the logits are
   identical; measure accuracy, bytes in memory and on disk, and inference time.
5. Print the table, write ``results.json``, ``tradeoff.png`` and ``layers.png`` into the
   output directory.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import re
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jcompress import _fs, checkpoint, report
from jcompress import tree as jtree
from jcompress.demo._data import Digits, load_digits
from jcompress.demo._models import MLP, accuracy
from jcompress.demo._train import cross_entropy_loss, fit, median_seconds

__all__ = ["DigitsTask", "Variant", "run"]


@dataclasses.dataclass
class Variant:
    """One row of the demo's table."""

    name: str
    params: Any
    accuracy: float = float("nan")
    memory_bytes: int = 0
    encoded_bytes: int = 0
    disk_bytes: int = 0
    sparsity: float = 0.0
    time_ms: float = float("nan")
    inference: str = ""
    reloaded_identical: bool | None = None

    def row(self) -> dict:
        return {
            f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "params"
        }


def _feature(module: str, *names: str) -> tuple[Any, ...] | None:
    """``getattr(jcompress.<module>, name)`` for each name, or ``None`` if any is missing."""
    import importlib

    try:
        mod = importlib.import_module(f"jcompress.{module}")
    except ImportError:
        return None
    found = tuple(getattr(mod, n, None) for n in names)
    return None if any(f is None for f in found) else found


def _progress(console):
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
    )

    return Progress(
        TextColumn("{task.description:<28}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[info]}"),
        TimeElapsedColumn(),
        console=console,
    )


# Compiled once per model (a hashable linen module) and shape, for every task and seed.
@functools.partial(jax.jit, static_argnums=0)
def _init(model: MLP, key: jax.Array, x: jax.Array) -> Any:
    return model.init(key, x)["params"]


@functools.partial(jax.jit, static_argnums=0)
def _apply(model: MLP, params: Any, x: jax.Array) -> jax.Array:
    return model.apply({"params": params}, x)


@dataclasses.dataclass(frozen=True)
class DigitsTask:
    """An :class:`MLP` on a seeded digits split (``DigitsTask.load``: LeNet-300-100,
    ``MLP((300, 100, 10))``).

    ``apply(params, x) -> logits (n, 10)``, ``loss(params, x, y)`` (mean cross-entropy) and
    ``accuracy(params)`` on the test split are plain functions of the ``params`` dict, ready for
    ``jax.jit``, ``jc.runtime.compressed`` and ``jc.distillation.distillation_loss``;
    ``init(seed)`` and ``accuracy`` compile once per model architecture, for every seed.

    >>> task = DigitsTask(load_digits(seed=0), MLP((300, 100, 10)))
    >>> task.data.x_test.shape, task.model.features
    ((539, 64), (300, 100, 10))
    """

    data: Digits
    model: MLP

    @classmethod
    def load(cls, *, seed: int) -> DigitsTask:
        return cls(load_digits(seed=seed), MLP((300, 100, 10)))

    def init(self, seed: int) -> Any:
        return _init(self.model, jax.random.key(seed), self.data.x_test[:1])

    def apply(self, params: Any, x: jax.Array) -> jax.Array:
        return self.model.apply({"params": params}, x)

    def loss(self, params: Any, x: jax.Array, y: jax.Array) -> jax.Array:
        return cross_entropy_loss(self.apply)(params, x, y)

    def accuracy(self, params: Any, apply: Callable | None = None) -> float:
        x = self.data.x_test
        logits = apply(params, x) if apply is not None else _apply(self.model, params, x)
        return float(accuracy(logits, self.data.y_test))


def _quantize_per_layer(params, spec, quantize, progress, description):
    """Quantize each selected leaf in turn (one progress step per layer)."""
    paths = jtree.selected_paths(jtree.select(params))
    task = progress.add_task(description, total=len(paths), info="")
    done = {}
    for path in paths:
        progress.update(task, info=path)
        q = jax.jit(lambda p, path=path: quantize(p, spec, where=re.escape(path)))(params)
        done[path] = dict(jtree.leaves_with_paths(q))[path]
        progress.advance(task)
    progress.update(task, info="")
    return jtree.map_with_paths(lambda p, x: done.get(p, x), params)


def run(
    *,
    quick: bool = False,
    out: str | Path = "jcompress-demo",
    seed: int = 0,
    console: Any = None,
) -> dict:
    """Run the demo; returns the results written to ``out/results.json``.

    Args:
      quick: fewer epochs and timing repeats (a smoke run, for CI).
      out: output directory (checkpoints, ``results.json``, ``tradeoff.png``, ``layers.png``).
      seed: data split, initialisation and batch order.
      console: a ``rich.console.Console`` (default: a new one on stdout).
    """
    from rich.console import Console
    from rich.table import Table

    if console is None:
        console = Console()
        if not console.is_terminal:  # captured or piped: keep the tables unwrapped
            console = Console(width=max(console.width, 120))
    out = _fs.resolve(out, what="demo: out")
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    stages: dict[str, str] = {}
    epochs_teacher, epochs_student, repeats = (12, 16, 3) if quick else (40, 30, 30)

    task = DigitsTask.load(seed=seed)
    data, apply, ce = task.data, task.apply, task.loss
    x_test, y_test = jnp.asarray(data.x_test), jnp.asarray(data.y_test)
    teacher = task.init(seed)
    console.rule("[bold]jcompress demo: LeNet-300-100 on digits")
    variants: list[Variant] = []

    with _progress(console) as progress:
        teacher, _ = fit(
            ce,
            optax.adam(1e-3),
            teacher,
            data,
            epochs=epochs_teacher,
            seed=seed,
            progress=progress,
            description="train teacher",
        )
        variants.append(Variant("dense float32", teacher))
        stages["train"] = f"teacher trained {epochs_teacher} epochs (Adam 1e-3, batch 64)"

        student = teacher
        prune_api = _feature("pruning", "prune", "polynomial_schedule")
        distill_api = _feature("distillation", "distillation_loss")
        if prune_api is not None:
            prune, polynomial_schedule = prune_api
            steps = epochs_student * (len(data.x_train) // 64)
            schedule = polynomial_schedule(
                0.9, begin_step=0, end_step=int(0.6 * steps), update_every=max(1, steps // 30)
            )
            tx = prune(optax.adam(3e-3), schedule=schedule, scope="global")
            if distill_api is not None:
                loss_fn = distill_api[0](apply, apply, temperature=4.0, alpha=0.7)

                def student_loss(p, x, y, teacher=teacher):
                    return loss_fn(p, teacher, x, y)[0]

                how = "GMP to 90% (one global threshold) + distillation (T=4, alpha=0.7)"
            else:
                student_loss = ce
                how = "GMP to 90% (one global threshold) + cross-entropy (no jc.distillation)"
                stages["distill"] = "skipped: jcompress.distillation.distillation_loss missing"
            student, _ = fit(
                student_loss,
                tx,
                teacher,
                data,
                epochs=epochs_student,
                seed=seed + 1,
                progress=progress,
                description="prune + distill" if distill_api else "prune + fine-tune",
            )
            stages["prune"] = how
            if distill_api is not None:
                stages["distill"] = "distilled while pruning"
            variants.append(Variant("pruned 90% float32", student))
        else:
            stages["prune"] = "skipped: jcompress.pruning.prune not available in this install"
            stages["distill"] = "skipped: needs the pruned student"

        quant_api = _feature("quantization", "quantize", "QuantSpec", "MSE")
        if quant_api is not None:
            quantize, QuantSpec, MSE = quant_api
            base = variants[-1]
            prefix = "pruned " if base is not variants[0] else ""
            for bits in (8, 4):
                q = _quantize_per_layer(
                    base.params,
                    QuantSpec(bits=bits, calibration=MSE()),
                    quantize,
                    progress,
                    f"calibrate int{bits} (MSE)",
                )
                variants.append(Variant(f"{prefix}int{bits}", q))
            stages["quantize"] = "int8 and int4, per-channel scales, MSE-calibrated clipping"
            budget_api = _feature("budget", "sensitivity", "allocate", "compress")
            if budget_api is not None:
                sensitivity, allocate, compress = budget_api
                options = {f"int{b}": QuantSpec(bits=b, calibration=MSE()) for b in (8, 4, 2)}
                batch = [jnp.asarray(data.x_train[:256])]
                sens = sensitivity(apply, base.params, batch, options, quiet=True)
                rules = allocate(sens, ratio=8)
                variants.append(Variant(f"{prefix}mixed-precision", compress(base.params, rules)))
                console.print(sens.table())
                picked = {p: f"int{r[1].bits}" for p, r in zip(sens.paths, rules)}
                stages["budget"] = (
                    "per-layer bit widths for 1/8 of the float bytes (jc.budget: KL of the logits "
                    "per layer and option, exact knapsack): "
                    + ", ".join(f"{p} {b}" for p, b in picked.items())
                )
        else:
            stages["quantize"] = "skipped: jcompress.quantization.quantize not available"

    # ---- measure -----------------------------------------------------------------------------
    compressed_api = _feature("runtime", "compressed")
    dequantize_api = _feature("quantization", "dequantize")
    float_fn = jax.jit(apply)
    reference = variants[0].params
    ckpt_dir = out / "checkpoints"
    for v in variants:
        has_compressed = any(jtree.is_compressed(x) for _, x in jtree.leaves_with_paths(v.params))
        if not has_compressed:
            fn, v.inference = float_fn, "float (jit)"
        elif compressed_api is not None:
            fn, v.inference = compressed_api[0](apply), "jc.compressed"
        else:
            deq = dequantize_api[0]
            fn = jax.jit(lambda p, x, deq=deq: apply(deq(p), x))
            v.inference = "dequantize + float (jit)"
        logits = fn(v.params, x_test)
        v.accuracy = float(accuracy(logits, y_test))
        timed = {"fn": lambda fn=fn, p=v.params: fn(p, x_test)}
        v.time_ms = 1e3 * median_seconds(timed, repeats=repeats)["fn"]
        s = report.summarize(v.params, reference=reference)
        v.memory_bytes, v.encoded_bytes, v.sparsity = s.memory_bytes, s.encoded_bytes, s.sparsity
        path = ckpt_dir / v.name.replace(" ", "_").replace("%", "pct")
        checkpoint.save(path, v.params)
        v.disk_bytes = checkpoint.disk_bytes(path)
        reloaded = checkpoint.load(path)
        v.reloaded_identical = bool(np.array_equal(np.asarray(fn(reloaded, x_test)), logits))

    # ---- print -------------------------------------------------------------------------------
    dense = variants[0]
    table = Table(title="LeNet-300-100 on digits (539 test images)")
    for col in ("variant", "accuracy", "memory", "on disk", "ratio (mem / disk)", "inference"):
        table.add_column(col, justify="left" if col == "variant" else "right")
    for v in variants:
        table.add_row(
            v.name,
            f"{v.accuracy:.2%}",
            report.format_bytes(v.memory_bytes),
            report.format_bytes(v.disk_bytes),
            f"{dense.memory_bytes / v.memory_bytes:.1f}x / {dense.disk_bytes / v.disk_bytes:.1f}x",
            f"{v.time_ms:.2f} ms ({v.inference})",
        )
    console.print(table)
    if len(variants) > 1:
        console.print(
            report.summarize(variants[-1].params, reference=reference).table(
                title=f"per layer: {variants[-1].name}"
            )
        )
    for name, what in stages.items():
        console.print(f"[bold]{name}[/bold]: {what}")
    for v in variants:
        console.print(
            f"accuracy {v.name}: {v.accuracy:.4f}  (reloaded from {ckpt_dir.name}/: "
            f"{'identical logits' if v.reloaded_identical else 'LOGITS DIFFER'})"
        )

    results = {
        "quick": quick,
        "seed": seed,
        "stages": stages,
        "variants": [v.row() for v in variants],
        "layers": report.summarize(variants[-1].params, reference=reference).to_dict(),
    }
    try:
        from jcompress import plots

        plots.tradeoff(
            [(v.name, v.disk_bytes, v.accuracy) for v in variants],
            out / "tradeoff.png",
            xlabel="bytes on disk",
        )
        plots.layers(report.summarize(variants[-1].params), out / "layers.png")
        results["plots"] = ["tradeoff.png", "layers.png"]
    except ImportError as e:
        results["plots"] = []
        console.print(f"plots: skipped ({e}; pip install 'jcompress[demo]')")
    results["seconds"] = time.perf_counter() - t_start
    (out / "results.json").write_text(json.dumps(results, indent=1))
    console.print(f"wrote {out}/ (checkpoints/, results.json, plots) in {results['seconds']:.1f} s")
    return results
