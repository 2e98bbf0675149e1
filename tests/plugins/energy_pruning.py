"""A toy calibrated method, written by following ARCHITECTURE.md "Add a calibrated method".

Prune the weights of smallest ``|w| * ||x||`` (magnitude weighted by the root energy of the input
channel it multiplies, pooled per layer), from statistics the calibration driver captures one
layer at a time.
"""

import jax.numpy as jnp

from jcompress import calibration
from jcompress.pruning import score_masks


def energy_prune(fn, params, batches, sparsity, *, where=None, roles=None, quiet=True):
    what = "energy pruning"
    chosen = calibration.select_layers(fn, params, batches, where=where, roles=roles, what=what)

    def compress(path, leaf, stats):
        lay = calibration.LeafMatrices.of(path, leaf.shape, chosen.roles[path])
        energy = jnp.sqrt(jnp.reshape(stats.sumsq, lay.dims[:2]))  # (S, C)
        scores = jnp.abs(lay.to_matrices(leaf)) * energy[:, :, None]  # (S, C, O)
        scores = lay.from_matrices(scores)
        masks = score_masks(
            {"w": leaf}, {"w": scores}, sparsity, where="w", roles={"w": chosen.roles[path]}
        )
        pruned = jnp.where(masks["w"], leaf, jnp.zeros((), leaf.dtype))
        return calibration.Layer(pruned, pruned, masks["w"])

    pruned, masks = calibration.calibrate(
        fn, params, batches, list(chosen.paths), compress, what=what, quiet=quiet
    )
    return pruned, masks
