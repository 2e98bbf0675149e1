"""jc.budget: sensitivity per leaf and option, allocation to a budget, and applying the rules."""

import itertools
import re
from math import inf

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import rich.console
from hypothesis import given
from hypothesis import strategies as st

import jcompress as jc
from jcompress.budget import Sensitivity, allocate, compress, sensitivity
from jcompress.pruning import NM
from jcompress.quantization import QuantSpec, dequantize


def _mlp(seed=0):
    rng = np.random.default_rng(seed)
    params = {
        "Dense_0": {"kernel": jnp.asarray(rng.standard_normal((16, 32), np.float32) / 4)},
        "Dense_1": {"kernel": jnp.asarray(rng.standard_normal((32, 32), np.float32) / 6)},
        "Dense_2": {"kernel": jnp.asarray(rng.standard_normal((32, 10), np.float32) / 6)},
    }
    calls = []

    def fn(p, x):
        calls.append(1)
        h = jnp.tanh(x @ p["Dense_0"]["kernel"])
        h = jnp.tanh(h @ p["Dense_1"]["kernel"])
        return h @ p["Dense_2"]["kernel"]

    xs = [jnp.asarray(rng.standard_normal((8, 16), np.float32)) for _ in range(2)]
    return params, fn, xs, calls


QUANT = {"int8": QuantSpec(bits=8), "int4": QuantSpec(bits=4), "int2": QuantSpec(bits=2)}


def test_quantization_sensitivity_measures_each_leaf_alone_and_compiles_once():
    params, fn, xs, calls = _mlp()
    s = sensitivity(fn, params, xs, {**QUANT, "float": None}, quiet=True)
    assert s.kind == "quantization" and s.paths == (
        "Dense_0/kernel",
        "Dense_1/kernel",
        "Dense_2/kernel",
    )
    assert len(calls) == 1  # one trace of fn for the reference and every (leaf, option) pair
    for path in s.paths:
        inc, cost = s.increase[path], s.cost[path]
        assert inc["float"] == 0.0 and cost["float"] == s.float_bytes[path]
        assert inc["int2"] > inc["int4"] > inc["int8"] >= 0.0
        assert cost["int2"] < cost["int4"] < cost["int8"] < cost["float"]
    # the measured increase is the default metric (KL of softmax outputs) with that leaf alone
    path = "Dense_1/kernel"
    q = jc.quantization.quantize(params, QUANT["int4"], where=path)
    ref = [fn(params, x) for x in xs]
    got = [fn(dequantize(q), x) for x in xs]
    expected = np.mean([float(jc.budget.default_metric(g, r)) for g, r in zip(got, ref)])
    np.testing.assert_allclose(s.increase[path]["int4"], expected, rtol=1e-4, atol=1e-7)


def test_a_leaf_compression_does_not_change_gets_exactly_zero():
    params, fn, xs, _ = _mlp()
    # integers in [-127, 127] with an absmax of 127 per column: int8 per channel is exact
    grid = np.random.default_rng(1).integers(-127, 128, (32, 10)).astype(np.float32)
    grid[0] = 127.0
    params["Dense_2"]["kernel"] = jnp.asarray(grid / 128)  # scale 1/128: exact in float
    s = sensitivity(fn, params, xs, {"int8": QuantSpec(bits=8)}, quiet=True)
    assert s.increase["Dense_2/kernel"]["int8"] == 0.0
    assert s.increase["Dense_0/kernel"]["int8"] > 0.0


def test_sparsity_sensitivity_costs_are_pruned_counts():
    params, fn, xs, _ = _mlp()
    s = sensitivity(fn, params, xs, {"dense": None, "50%": 0.5, "2:4": NM(2, 4)}, quiet=True)
    assert s.kind == "sparsity"
    for path in s.paths:
        assert s.cost[path] == {"dense": 0, "50%": s.sizes[path] // 2, "2:4": s.sizes[path] // 2}
        assert s.increase[path]["dense"] == 0.0 and s.increase[path]["50%"] > 0.0


@pytest.mark.parametrize(
    "options, error, match",
    [
        ({}, ValueError, "non-empty dict"),
        ({"q": QuantSpec(bits=8), "s": 0.5}, ValueError, "must all be quantization options"),
        ({"q": "int8"}, TypeError, "must be a QuantSpec"),
        ({"s": 1.5}, ValueError, r"in \[0, 1\)"),
        ({"none": None}, ValueError, "only None"),
    ],
)
def test_bad_options(options, error, match):
    params, fn, xs, _ = _mlp()
    with pytest.raises(error, match=match):
        sensitivity(fn, params, xs, options, quiet=True)


def _ranks(values):
    return np.argsort(np.argsort(np.asarray(values)))


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize(
    "options",
    [
        {
            **QUANT,
            "int3": QuantSpec(bits=3),
            "g8int2": QuantSpec(bits=2, granularity=jc.quantization.PerGroup(8)),
        },
        {"30%": 0.3, "60%": 0.6, "90%": 0.9, "2:4": NM(2, 4)},
    ],
    ids=["quantization", "sparsity"],
)
def test_fisher_ranks_like_measure_and_is_on_the_metric_scale(seed, options):
    params, fn, _, calls = _mlp(seed)
    rng = np.random.default_rng(seed)
    xs = [jnp.asarray(rng.standard_normal((64, 16), np.float32)) for _ in range(4)]
    measured = sensitivity(fn, params, xs, options, quiet=True)
    calls.clear()
    fisher = sensitivity(fn, params, xs, options, quiet=True, method="fisher")
    assert len(calls) == 1  # one trace: the backward pass, reused for every batch
    assert fisher.cost == measured.cost and fisher.paths == measured.paths
    a = [measured.increase[p][n] for p in measured.paths for n in options]
    b = [fisher.increase[p][n] for p in measured.paths for n in options]
    # Spearman rank correlation over every (leaf, option) pair (measured 0.90-0.99)
    rho = np.corrcoef(_ranks(a), _ranks(b))[0, 1]
    assert rho >= 0.85, rho
    # an unbiased second-order estimate of the default metric: same scale (measured 0.7-1.6)
    ratio = np.asarray(b) / np.asarray(a)
    assert 0.75 <= np.median(ratio) <= 1.35 and ratio.min() > 0.4 and ratio.max() < 2.5, ratio


@pytest.mark.parametrize("head", ["logits", "value"])
def test_fisher_estimates_the_metric_hessian_diagonal(head):
    """Mean of squared sampled gradients == diag of the Hessian of the default metric (KL for
    logits, MSE for a scalar head) at the float model, up to Monte Carlo error."""
    from jcompress.budget._sensitivity import _fisher

    params, fn, xs, _ = _mlp(0)
    if head == "value":
        params["Dense_2"]["kernel"] = params["Dense_2"]["kernel"][:, :1]
    x = xs[0]
    ref = fn(params, x)

    def metric_of(p):
        return jc.budget.default_metric(fn(p, x), ref)

    flat, unravel = jax.flatten_util.ravel_pytree(params)
    hessian = jax.hessian(lambda v: metric_of(unravel(v)))(flat)
    expected = unravel(jnp.diag(hessian))
    originals = {p: v for p, v in jc.tree.leaves_with_paths(params)}
    got = _fisher(fn, params, [(x,)] * 400, None, tuple(originals), originals, jax.random.key(1))
    for path, leaf in jc.tree.leaves_with_paths(expected):
        # summed over a leaf (what the increase sums): within the Monte Carlo error of 400 draws
        np.testing.assert_allclose(float(jnp.sum(got[path])), float(jnp.sum(leaf)), rtol=0.12)
        assert np.corrcoef(np.ravel(got[path]), np.ravel(leaf))[0, 1] > 0.9


def test_fisher_is_deterministic_per_key_and_zero_where_nothing_changes():
    params, fn, xs, _ = _mlp()
    grid = np.random.default_rng(1).integers(-127, 128, (32, 10)).astype(np.float32)
    grid[0] = 127.0
    params["Dense_2"]["kernel"] = jnp.asarray(grid / 128)  # int8 per channel is exact
    opts = {"int8": QuantSpec(bits=8), "int4": QuantSpec(bits=4)}
    a = sensitivity(fn, params, xs, opts, method="fisher", quiet=True)
    b = sensitivity(fn, params, xs, opts, method="fisher", quiet=True)
    c = sensitivity(fn, params, xs, opts, method="fisher", quiet=True, key=jax.random.key(7))
    assert a.increase == b.increase and a.increase != c.increase
    assert a.increase["Dense_2/kernel"]["int8"] == 0.0 and a.increase["Dense_2/kernel"]["int4"] > 0


def test_unhashable_model_and_metric_callables():
    """An Equinox-style model object (a dataclass with eq: unhashable) as fn and as metric."""
    import dataclasses as dc

    params, fn, xs, _ = _mlp()

    @dc.dataclass(eq=True)
    class Call:
        scale: float = 1.0

        def __call__(self, p, x):
            return fn(p, x) * self.scale

    @dc.dataclass(eq=True)
    class Metric:
        def __call__(self, out, ref):
            return jc.budget.default_metric(out, ref)

    model = Call()
    for method in ("measure", "fisher"):
        s = sensitivity(model, params, xs, QUANT, metric=Metric(), method=method, quiet=True)
        assert s.increase["Dense_0/kernel"]["int2"] > 0


def test_fisher_with_a_custom_metric():
    params, fn, xs, _ = _mlp()
    labels = [jnp.arange(8) % 10 for _ in xs]

    def task_loss(out, _ref):  # cross-entropy on labels: its gradient is not zero
        y = labels[0]
        return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(out), y[:, None], axis=1))

    s = sensitivity(fn, params, xs, QUANT, metric=task_loss, method="fisher", quiet=True)
    for path in s.paths:
        assert s.increase[path]["int2"] > s.increase[path]["int4"] > s.increase[path]["int8"] > 0

    def divergence(out, ref):  # zero gradient at out == ref: nothing to estimate from
        return jnp.mean((out - ref) ** 2)

    with pytest.raises(ValueError, match=r"gradient.*zero.*method='measure'"):
        sensitivity(fn, params, xs, QUANT, metric=divergence, method="fisher", quiet=True)
    with pytest.raises(ValueError, match="'measure' or 'fisher'"):
        sensitivity(fn, params, xs, QUANT, method="hessian", quiet=True)


def _names(s, rules):
    """The option name each rule of ``allocate`` chose, in path order."""
    name_of = {option: name for name, option in s.options.items()}
    assert [regex for regex, _ in rules] == [re.escape(p) for p in s.paths]
    return [name_of[option] for _, option in rules]


def _brute(s, budget_ok):
    names = list(s.options)
    best = None
    for combo in itertools.product(range(len(names)), repeat=len(s.paths)):
        picks = [names[k] for k in combo]
        if not budget_ok(picks):
            continue
        total = sum(s.increase[p][n] for p, n in zip(s.paths, picks))
        if best is None or total < best - 1e-12:
            best = total
    return best


def _random_sensitivity(kind, seed, n_leaves, n_options):
    rng = np.random.default_rng(seed)
    paths = tuple(f"l{i}/kernel" for i in range(n_leaves))
    names = [f"o{k}" for k in range(n_options)]
    sizes = {p: int(rng.integers(4, 64)) * 4 for p in paths}
    if kind == "quantization":
        options = {n: QuantSpec(bits=8 - k) for k, n in enumerate(names)}
        cost = {p: {n: int(rng.integers(1, 4 * sizes[p])) for n in names} for p in paths}
    else:
        options = {n: round(0.1 * (k + 1), 1) for k, n in enumerate(names)}
        cost = {p: {n: round(options[n] * sizes[p]) for n in names} for p in paths}
    inc = {p: {n: float(rng.random()) for n in names} for p in paths}
    return Sensitivity(kind, options, paths, inc, cost, {p: 4 * sizes[p] for p in paths}, sizes)


@given(st.integers(0, 2**16), st.integers(1, 6), st.integers(1, 4), st.floats(0.2, 1.0))
def test_allocate_equals_brute_force_bytes(seed, n_leaves, n_options, fraction):
    s = _random_sensitivity("quantization", seed, n_leaves, n_options)
    lowest = sum(min(s.cost[p].values()) for p in s.paths)
    highest = sum(max(s.cost[p].values()) for p in s.paths)
    budget = int(lowest + fraction * (highest - lowest))
    picks = _names(s, allocate(s, max_bytes=budget))
    assert sum(s.cost[p][n] for p, n in zip(s.paths, picks)) <= budget
    got = sum(s.increase[p][n] for p, n in zip(s.paths, picks))
    best = _brute(s, lambda picks: sum(s.cost[p][n] for p, n in zip(s.paths, picks)) <= budget)
    assert got == pytest.approx(best, abs=1e-9)


@given(st.integers(0, 2**16), st.integers(1, 6), st.integers(2, 4), st.floats(0.0, 0.35))
def test_allocate_equals_brute_force_sparsity(seed, n_leaves, n_options, target):
    s = _random_sensitivity("sparsity", seed, n_leaves, n_options)
    total = sum(s.sizes.values())
    needed = int(np.ceil(np.float32(target) * total - 1e-9))
    if needed > sum(max(s.cost[p].values()) for p in s.paths):
        with pytest.raises(ValueError, match="smallest feasible budget is sparsity="):
            allocate(s, sparsity=target)
        return
    picks = _names(s, allocate(s, sparsity=target))
    assert sum(s.cost[p][n] for p, n in zip(s.paths, picks)) >= needed
    got = sum(s.increase[p][n] for p, n in zip(s.paths, picks))
    best = _brute(s, lambda ps: sum(s.cost[p][n] for p, n in zip(s.paths, ps)) >= needed)
    assert got == pytest.approx(best, abs=1e-9)


def test_infeasible_budget_names_the_smallest():
    s = _random_sensitivity("quantization", 0, 3, 2)
    lowest = sum(min(s.cost[p].values()) for p in s.paths)
    with pytest.raises(ValueError, match=f"max_bytes={lowest}"):
        allocate(s, max_bytes=lowest - 1)
    with pytest.raises(ValueError, match="exactly one of max_bytes= and ratio="):
        allocate(s, max_bytes=10, ratio=2)
    sp = _random_sensitivity("sparsity", 0, 3, 2)
    with pytest.raises(ValueError, match="smallest feasible budget is sparsity="):
        allocate(sp, sparsity=0.9)


def test_end_to_end_quantization_to_a_ratio():
    params, fn, xs, _ = _mlp()
    s = sensitivity(fn, params, xs, {**QUANT, "float": None}, quiet=True)
    rules = allocate(s, ratio=8)
    budget = sum(s.float_bytes.values()) / 8
    q = compress(params, rules)
    leaves = dict(jc.tree.leaves_with_paths(q))
    assert sum(int(leaves[p].nbytes) for p in s.paths) <= budget  # true packed bytes
    # the allocation beats every uniform choice that meets the same budget
    picks = _names(s, rules)
    chosen = sum(s.increase[p][n] for p, n in zip(s.paths, picks))
    for name in s.options:
        if sum(s.cost[p][name] for p in s.paths) <= budget:
            assert chosen <= sum(s.increase[p][name] for p in s.paths) + 1e-12
    gq = compress(params, rules, fn=fn, batches=[(x,) for x in xs])
    assert jax.tree.structure(gq, is_leaf=jc.is_compressed) == jax.tree.structure(
        q, is_leaf=jc.is_compressed
    )


def test_end_to_end_sparsity_meets_the_global_target():
    params, fn, xs, _ = _mlp()
    s = sensitivity(
        fn, params, xs, {"dense": None, "50%": 0.5, "75%": 0.75, "90%": 0.9}, quiet=True
    )
    rules = allocate(s, sparsity=0.6)
    pruned = compress(params, rules)
    zeros = sum(int(np.sum(np.asarray(pruned[k]["kernel"]) == 0)) for k in pruned)
    total = sum(s.sizes.values())
    assert zeros >= np.ceil(0.6 * total)
    assert zeros <= 0.6 * total + max(s.sizes.values())  # up to one layer's rounding


def test_sparsity_rules_with_fn_and_batches_run_sparsegpt():
    params, fn, xs, _ = _mlp()
    rules = [("Dense_0/kernel", 0.5), ("Dense_1/kernel", 0.75), ("Dense_2/kernel", None)]
    batches = [(x,) for x in xs]
    got = compress(params, rules, fn=fn, batches=batches)
    want, _ = jc.pruning.sparsegpt(fn, params, batches, rules, quiet=True)
    for k in params:
        np.testing.assert_array_equal(got[k]["kernel"], want[k]["kernel"])
    magnitude = compress(params, rules)
    # the same zeros per layer, but SparseGPT updates the kept weights
    assert int(np.sum(np.asarray(got["Dense_1"]["kernel"]) == 0)) == 32 * 32 * 3 // 4
    assert not np.array_equal(got["Dense_1"]["kernel"], magnitude["Dense_1"]["kernel"])
    np.testing.assert_array_equal(got["Dense_2"]["kernel"], params["Dense_2"]["kernel"])
    with pytest.raises(ValueError, match="both fn= and batches="):
        compress(params, rules, fn=fn)


def test_an_option_that_does_not_fit_a_leaf_is_skipped_for_that_leaf():
    params, fn, xs, _ = _mlp()  # Dense_0 (16, 32), Dense_1 (32, 32), Dense_2 (32, 10)
    g32 = QuantSpec(bits=2, granularity=jc.quantization.PerGroup(32))  # 16 inputs: no fit
    opts = {"int8": QuantSpec(bits=8), "int4": QuantSpec(bits=4), "g32": g32}
    s = sensitivity(fn, params, xs, opts, quiet=True)
    assert list(s.skipped) == ["Dense_0/kernel"] and "g32" in s.skipped["Dense_0/kernel"]
    assert "Dense_0/kernel" in s.skipped["Dense_0/kernel"]["g32"]  # the reason names the leaf
    assert s.cost["Dense_0/kernel"]["g32"] is None and s.increase["Dense_0/kernel"]["g32"] == inf
    assert s.cost["Dense_1/kernel"]["g32"] > 0
    console = rich.console.Console(record=True, width=200)
    console.print(s.table())
    assert re.search(r"Dense_0/kernel .* n/a", console.export_text())
    rules = allocate(s, ratio=7)  # int8 everywhere does not fit
    assert dict(rules)["Dense_0/kernel"] != g32  # never the option that does not fit
    compress(params, rules)  # and the rules apply
    # an option that fits no leaf is a mistake: its own error
    with pytest.raises(ValueError, match="PerGroup"):
        g7 = QuantSpec(bits=4, granularity=jc.quantization.PerGroup(7))
        sensitivity(fn, params, xs, {"g7": g7}, quiet=True)
    # a leaf that no option fits: named, with the fix
    with pytest.raises(ValueError, match="Dense_0/kernel: no option fits this leaf"):
        sensitivity(fn, params, xs, {"g32": g32}, quiet=True)


def test_table_and_plot(tmp_path, monkeypatch):
    params, fn, xs, _ = _mlp()
    s = sensitivity(
        fn, params, xs, {"int8": QuantSpec(bits=8), "int4": QuantSpec(bits=4)}, quiet=True
    )
    assert s.table().row_count == 3
    monkeypatch.chdir(tmp_path)
    out = s.plot("plots/sens.png")  # a relative path, from the working directory
    assert out == tmp_path / "plots" / "sens.png" and out.stat().st_size > 0


def test_cli_budget(tmp_path, monkeypatch, capsys):
    from jcompress.cli import main

    monkeypatch.chdir(tmp_path)
    params, _, _, _ = _mlp()
    jc.checkpoint.save("model", params)
    assert main(["budget", "model", "pruned", "--sparsity", "0.6", "--levels", "0.5,0.9"]) == 0
    out = jc.checkpoint.load("pruned")
    zeros = sum(int(np.sum(np.asarray(out[k]["kernel"]) == 0)) for k in out)
    total = sum(int(np.size(params[k]["kernel"])) for k in params)
    assert zeros >= np.ceil(0.6 * total)
    assert "allocation:" in capsys.readouterr().out
    assert main(["budget", "model", "q", "--max-bytes", "4000", "--bits", "8,4"]) == 0
    q = jc.checkpoint.load("q")
    assert sum(int(x.nbytes) for _, x in jc.tree.leaves_with_paths(q)) <= 4000
    assert main(["budget", "model", "x", "--ratio", "4", "--sparsity", "0.5"]) == 2
    assert "exactly one of --ratio" in capsys.readouterr().err
    assert main(["budget", "model", "x", "--max-bytes", "10"]) == 2
    assert "smallest feasible budget is max_bytes=" in capsys.readouterr().err
