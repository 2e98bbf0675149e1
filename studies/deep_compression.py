"""Deep Compression on LeNet-300-100 / digits: prune, quantize, Huffman-code, save.

Han, Mao & Dally, "Deep Compression: Compressing Deep Neural Networks with Pruning, Trained
Quantization and Huffman Coding", ICLR 2016. The three stages, with jcompress:

1. **Prune** a trained LeNet-300-100 to ``--sparsity`` (default 95%) with gradual magnitude
   pruning and one global threshold (``jc.pruning.prune`` + ``polynomial_schedule``), the dense
   model distilling into its pruned copy (``jc.distillation.distillation_loss``, T=4).
2. **Quantize** the survivors to ``--bits`` (default 4) with a frozen MSE-calibrated scale per
   kernel (``--per-channel``: one per output channel): quantization-aware fine-tuning
   (``jc.quantization.fake_quantize`` inside the distillation loss, ``prune(masks=...)`` keeping
   pruned weights at zero), then ``quantize`` to ``QArray`` s. (The paper shares weights through
   k-means codebooks; here the grid is uniform, zero kept exact.)
   Biases are quantized to int8 with one scale each.
3. **Huffman-code** each kernel: the positions of the survivors as gaps between them (the
   paper's relative indices) and their integer values, with canonical Huffman codes. The coded
   streams, code tables, scales and int8 biases are packed into four arrays, saved with
   ``jc.checkpoint.save``, loaded back and decoded; the decoded model must give identical logits.

Reported over ``--seeds`` seeds (mean ± std): accuracy of the dense, pruned and final models; the
**payload ratio** (dense float32 bytes / bytes of the coded streams, code tables, scales and
int8 biases) and the **on-disk ratio** (dense float32 bytes / the saved directory, orbax and JSON
metadata included).

    python studies/deep_compression.py [--quick] [--seeds 5] [--sparsity 0.95] [--bits 4]
    python studies/deep_compression.py --quick --out results.json  # a smoke run, results as JSON
"""

from __future__ import annotations

import argparse
import heapq
import json
import tempfile
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax

import jcompress.checkpoint as ckpt
from jcompress.demo import DigitsTask, fit
from jcompress.distillation import distillation_loss
from jcompress.pruning import masks_of, polynomial_schedule, prune
from jcompress.quantization import (
    MSE,
    PerChannel,
    PerTensor,
    QArray,
    QuantSpec,
    calibrate,
    dequantize,
    fake_quantize,
    quantize,
)

# ---- canonical Huffman coding -----------------------------------------------------------------


def huffman_lengths(counts: np.ndarray) -> np.ndarray:
    """Code length per symbol (0 for unused symbols) of a Huffman code for ``counts``."""
    used = np.flatnonzero(counts)
    lengths = np.zeros(len(counts), np.uint8)
    if len(used) == 1:
        lengths[used] = 1
        return lengths
    heap = [(int(counts[s]), i, [int(s)]) for i, s in enumerate(used)]
    heapq.heapify(heap)
    tie = len(heap)
    while len(heap) > 1:
        c1, _, s1 = heapq.heappop(heap)
        c2, _, s2 = heapq.heappop(heap)
        for s in s1 + s2:
            lengths[s] += 1
        heapq.heappush(heap, (c1 + c2, tie, s1 + s2))
        tie += 1
    return lengths


def _canonical(lengths: np.ndarray) -> dict[int, tuple[int, int]]:
    """``symbol -> (code, length)`` of the canonical code with these lengths."""
    order = sorted((int(n), int(s)) for s, n in enumerate(lengths) if n)
    codes, code, prev = {}, 0, order[0][0]
    for n, s in order:
        code <<= n - prev
        codes[s] = (code, n)
        code, prev = code + 1, n
    return codes


def huffman_encode(symbols: np.ndarray, lengths: np.ndarray) -> tuple[np.ndarray, int]:
    """``(packed bits as uint8, number of bits)``."""
    codes = _canonical(lengths)
    bits = []
    for s in symbols.tolist():
        code, n = codes[s]
        bits.extend((code >> (n - 1 - i)) & 1 for i in range(n))
    return np.packbits(np.asarray(bits, np.uint8)), len(bits)


def huffman_decode(packed: np.ndarray, nbits: int, lengths: np.ndarray) -> np.ndarray:
    """Inverse of :func:`huffman_encode`: every symbol in the first ``nbits`` bits."""
    table = {(n, code): s for s, (code, n) in _canonical(lengths).items()}
    bits = np.unpackbits(packed)[:nbits].tolist()
    out, code, n = [], 0, 0
    for b in bits:
        code, n = (code << 1) | b, n + 1
        s = table.get((n, code))
        if s is not None:
            out.append(s)
            code, n = 0, 0
    if n:
        raise ValueError("corrupted Huffman stream: it ends inside a code")
    return np.asarray(out, np.int64)


MAX_GAP = 32
"""Gap symbols ``0..MAX_GAP-1`` skip that many zeros then place a survivor; ``MAX_GAP`` skips
``MAX_GAP`` zeros and places nothing (the paper's filler zeros), so code tables stay small."""


def gap_symbols(pos: np.ndarray) -> np.ndarray:
    gaps = np.diff(np.concatenate([[-1], pos])) - 1  # zeros skipped before each survivor
    escapes, rest = np.divmod(gaps, MAX_GAP)
    out = []
    for e, r in zip(escapes.tolist(), rest.tolist()):
        out += [MAX_GAP] * e + [r]
    return np.asarray(out, np.int64)


def positions(symbols: np.ndarray) -> np.ndarray:
    out, at = [], 0
    for s in symbols.tolist():
        if s == MAX_GAP:
            at += MAX_GAP
        else:
            out.append(at + s)
            at += s + 1
    return np.asarray(out, np.int64)


def code_kernel(q: QArray) -> dict:
    """Huffman-code a pruned, quantized kernel: survivor gaps and integer values."""
    values = np.asarray(q.values).astype(np.int64).reshape(-1)
    pos = np.flatnonzero(values)
    gaps = gap_symbols(pos)
    vsym = values[pos] + (1 << (q.bits - 1))  # non-negative symbols
    out = {"scale": np.asarray(q.scale), "count": len(pos)}
    for name, sym in (("gaps", gaps), ("values", vsym)):
        lengths = huffman_lengths(np.bincount(sym, minlength=1))
        packed, nbits = huffman_encode(sym, lengths)
        out[name] = {"code": packed, "nbits": nbits, "lengths": lengths}
    return out


def decode_kernel(c: dict, shape: tuple[int, ...], bits: int) -> QArray:
    pos = positions(huffman_decode(c["gaps"]["code"], c["gaps"]["nbits"], c["gaps"]["lengths"]))
    vsym = huffman_decode(c["values"]["code"], c["values"]["nbits"], c["values"]["lengths"])
    if len(pos) != c["count"] or len(vsym) != c["count"]:
        raise ValueError("corrupted stream: survivor counts differ")
    values = np.zeros(int(np.prod(shape)), np.int8)
    values[pos] = vsym - (1 << (bits - 1))
    store = jnp.int4 if bits <= 4 else jnp.int8
    scale = jnp.asarray(c["scale"], jnp.float32).reshape(1, -1)
    return QArray(jnp.asarray(values.reshape(shape), store), scale, bits=bits, dtype=jnp.float32)


def pack(q: dict) -> dict:
    """The whole model as four arrays: Huffman streams and code tables, an index, scales, biases.

    The decoder knows the architecture (layer names and shapes), as the paper's does.
    """
    streams, index, scales, biases = [], [], [], []
    for layer in q.values():
        k = code_kernel(layer["kernel"])
        g, v = k["gaps"], k["values"]
        streams += [g["code"], g["lengths"], v["code"], v["lengths"]]
        index.append([k["count"], g["nbits"], len(g["lengths"]), v["nbits"], len(v["lengths"])])
        scales += [k["scale"].reshape(-1), np.asarray(layer["bias"].scale).reshape(-1)]
        biases.append(np.asarray(layer["bias"].values))
    return {
        "index": np.asarray(index, np.int32),
        "streams": np.concatenate(streams).astype(np.uint8),
        "scales": np.concatenate(scales).astype(np.float32),
        "biases": np.concatenate(biases).astype(np.int8),
    }


def unpack(packed: dict, like: dict, bits: int) -> dict:
    """Inverse of :func:`pack`; ``like`` gives the layer names and shapes."""
    out, pos, spos, bpos = {}, 0, 0, 0
    for (name, layer), row in zip(like.items(), packed["index"].tolist()):
        count, gbits, glen, vbits, vlen = row
        parts = []
        for size in (-(-gbits // 8), glen, -(-vbits // 8), vlen):
            parts.append(packed["streams"][pos : pos + size])
            pos += size
        shape = layer["kernel"].shape
        nscale = int(np.prod(layer["kernel"].scale.shape))
        kscale = packed["scales"][spos : spos + nscale]
        bscale = packed["scales"][spos + nscale : spos + nscale + 1]
        spos += nscale + 1
        coded = {
            "count": count,
            "scale": kscale,
            "gaps": {"code": parts[0], "nbits": gbits, "lengths": parts[1]},
            "values": {"code": parts[2], "nbits": vbits, "lengths": parts[3]},
        }
        nb = shape[-1]
        bias = QArray(
            jnp.asarray(packed["biases"][bpos : bpos + nb]),
            jnp.asarray(bscale, jnp.float32),
            bits=8,
            dtype=jnp.float32,
        )
        bpos += nb
        out[name] = {"kernel": decode_kernel(coded, shape, bits), "bias": bias}
    return out


# ---- training -----------------------------------------------------------------------------------


def run_seed(seed: int, args, tmp: Path) -> dict:
    task = DigitsTask.load(seed=seed)
    data, apply, ce = task.data, task.apply, task.loss

    e = args.epochs
    dense, _ = fit(ce, optax.adam(1e-3), task.init(seed), data, epochs=e, seed=seed)

    ep = args.prune_epochs or round(1.5 * e)
    steps = ep * (len(data.x_train) // 64)
    schedule = polynomial_schedule(
        args.sparsity, begin_step=0, end_step=int(0.6 * steps), update_every=max(1, steps // 40)
    )
    kd = distillation_loss(apply, apply, temperature=4.0, alpha=0.7)

    def kd_loss(p, x, y):  # the dense model teaches its pruned copy (Hinton et al. 2015)
        return kd(p, dense, x, y)[0]

    tx = prune(optax.adam(3e-3), schedule=schedule, scope="global")
    pruned, state = fit(kd_loss, tx, dense, data, epochs=ep, seed=seed + 1)
    masks = masks_of(state)

    granularity = PerChannel() if args.per_channel else PerTensor()
    spec = QuantSpec(bits=args.bits, granularity=granularity, calibration=MSE())
    scales = calibrate(pruned, spec)

    def qat_loss(p, x, y):
        return kd_loss(fake_quantize(p, spec, scales=scales), x, y)

    tx = prune(optax.adam(1e-4), masks=masks)
    tuned, _ = fit(qat_loss, tx, pruned, data, epochs=max(1, e // 4), seed=seed + 2)
    q = quantize(tuned, spec, scales=scales)
    q = quantize(q, QuantSpec(bits=8, granularity=PerTensor()), where=".*/bias")

    packed = pack(q)
    path = tmp / f"seed{seed}"
    ckpt.save(path, packed)
    decoded = unpack(ckpt.load(path), q, args.bits)
    fn = jax.jit(apply)
    ref = dequantize(q)
    identical = bool(np.array_equal(fn(dequantize(decoded), data.x_test), fn(ref, data.x_test)))
    dense_bytes = sum(int(x.size) * 4 for x in jax.tree.leaves(dense))
    kernels = [layer["kernel"] for layer in pruned.values()]
    return {
        "seed": seed,
        "acc_dense": task.accuracy(dense, fn),
        "acc_pruned": task.accuracy(pruned, fn),
        "acc_final": task.accuracy(ref, fn),
        "sparsity": float(
            sum(int(jnp.sum(k == 0)) for k in kernels) / sum(int(k.size) for k in kernels)
        ),
        "dense_bytes": dense_bytes,
        "payload_bytes": sum(int(x.nbytes) for x in packed.values()),
        "disk_bytes": ckpt.disk_bytes(path),
        "decoded_identical": identical,
    }


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="one seed, few epochs (smoke test)")
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--sparsity", type=float, default=0.95)
    parser.add_argument("--bits", type=int, default=4, choices=(4, 5, 6))
    parser.add_argument("--epochs", type=int, default=40)
    parser.add_argument(
        "--prune-epochs",
        type=int,
        default=None,
        help="pruning + distillation epochs (1.5 x --epochs)",
    )
    parser.add_argument(
        "--per-channel", action="store_true", help="per-channel kernel scales (default: per tensor)"
    )
    parser.add_argument("--out", default=None, help="write the results as JSON here")
    args = parser.parse_args(argv)
    if args.quick:
        args.seeds, args.epochs = 1, 4
    with tempfile.TemporaryDirectory() as tmp:
        rows = [run_seed(s, args, Path(tmp)) for s in range(args.seeds)]

    def ms(key, scale=1.0):
        v = np.asarray([r[key] for r in rows]) * scale
        return f"{v.mean():.2f} ± {v.std():.2f}"

    for r in rows:
        r["payload_ratio"] = r["dense_bytes"] / r["payload_bytes"]
        r["disk_ratio"] = r["dense_bytes"] / r["disk_bytes"]
    print(
        f"Deep Compression, LeNet-300-100 on digits: {args.seeds} seed(s), {args.epochs} epochs, "
        f"target sparsity {args.sparsity:.0%}, {args.bits}-bit survivors, Huffman-coded"
    )
    print(f"  accuracy dense      {ms('acc_dense', 100)} %")
    sparsity = ms("sparsity", 100)
    print(f"  accuracy pruned     {ms('acc_pruned', 100)} %  (kernel sparsity {sparsity} %)")
    print(f"  accuracy final      {ms('acc_final', 100)} %")
    drop = np.asarray([r["acc_dense"] - r["acc_final"] for r in rows]) * 100
    print(f"  accuracy lost       {drop.mean():.2f} ± {drop.std():.2f} points")
    print(f"  dense float32       {rows[0]['dense_bytes']:,} bytes")
    print(f"  payload             {ms('payload_bytes')} bytes -> {ms('payload_ratio')} x smaller")
    print(f"  on disk (saved)     {ms('disk_bytes')} bytes -> {ms('disk_ratio')} x smaller")
    print(f"  decoded == quantized logits: {all(r['decoded_identical'] for r in rows)}")
    if args.quick:
        print("  (--quick: a smoke test; too few epochs for the accuracies to mean anything)")
    result = {"args": vars(args), "seeds": rows}
    if args.out:
        Path(args.out).expanduser().write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
