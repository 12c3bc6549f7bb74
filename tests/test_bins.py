"""GraphCut bins: the reference's golden output, a literal reference greedy, gradient embeddings."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from dq_ops.bins import bin_budgets, generate_bins, generate_class_bins
from dq_ops.errors import DQInputError
from dq_ops.features import DenseRows, GradientEmbedding, gradient_embedding

# The reference code's own bins on real Fashion-MNIST features (tests/data/README.md).
GOLDEN = Path(__file__).parent / "data" / "graphcut_reference.npz"
CASES = ["fmnist_pixels_classwise", "fmnist_pixels_unlabelled", "fmnist_pooled_classwise"]
# A budget this small (0.05 MB: no class Gram, 80-row blocks) forces the lazy path everywhere.
LAZY_MB = 0.05


@pytest.fixture(scope="module")
def golden() -> dict[str, np.ndarray]:
    with np.load(GOLDEN) as z:
        return {k: z[k] for k in z.files}


def case(golden: dict[str, np.ndarray], name: str) -> tuple[np.ndarray, np.ndarray | None, int, np.ndarray]:
    labels = golden[f"{name}__labels"]
    return (
        golden[f"{name}__features"],
        labels if labels.size else None,
        int(golden[f"{name}__num_bins"]),
        golden[f"{name}__bin_of_sample"],
    )


def bin_of_sample(bins: list[np.ndarray], n: int) -> np.ndarray:
    out = np.full(n, -1)
    for b, members in enumerate(bins):
        out[members] = b
    return out


def literal_bins(
    features: np.ndarray, labels: np.ndarray | None, num_bins: int, kernel: str = "cosine", dtype=np.float32
) -> np.ndarray:
    r"""docs/method.md stage 2 run the way the reference code runs it (float32 by default).

    Per class and bin: build the similarity matrix of the remaining samples R and its column
    sums, then, like the reference's GraphCut + NaiveGreedy, at every step recompute
    ``gain = -2·Σ_{s∈S} sim[s, x] + Σ_{i∈R} sim[i, x]`` for all x ∈ R \ S (indexing
    ``sim[np.ix_(S, R \ S)]``) and add the first maximum. Budget:
    round(round(N/K) / |remaining| · n_c_remaining). Returns bin_of_sample.
    """
    f = np.asarray(features, dtype=dtype)
    n = len(f)
    groups = [np.arange(n)] if labels is None else [np.flatnonzero(labels == c) for c in np.unique(labels)]
    out = np.full(n, num_bins - 1)
    avail = np.ones(n, dtype=bool)
    bin_size = round(n / num_bins)
    for b in range(num_bins - 1):
        fraction = bin_size / int(avail.sum())
        chosen = []
        for members in groups:
            r = members[avail[members]]
            x = f[r]
            if kernel == "cosine":
                norms = np.linalg.norm(x, axis=1)
                denom = norms[:, None] * norms[None, :]
                # An all-zero row has cosine 0 here (the reference would produce NaN).
                cos = np.divide(x @ x.T, denom, out=np.zeros_like(denom), where=denom > 0)
                sim = 0.5 + 0.5 * cos
            else:
                sim = x @ x.T
            column_sums = np.sum(sim, axis=0)
            selected = np.zeros(len(r), dtype=bool)
            gain = np.zeros(len(r))
            for _ in range(min(round(fraction * len(r)), len(r))):
                rest = ~selected
                gain[rest] = -2.0 * np.sum(sim[np.ix_(selected, rest)], axis=0) + column_sums[rest]
                best = int(gain.argmax())
                selected[best] = True
                gain[best] = -np.inf
            chosen.append(r[selected])
        picked = np.concatenate(chosen)
        out[picked] = b
        avail[picked] = False
    return out


@pytest.mark.parametrize("name", CASES)
@pytest.mark.parametrize("memory_budget_mb", [256.0, LAZY_MB], ids=["gram", "lazy"])
def test_reproduces_reference_golden_bins(golden, name, memory_budget_mb):
    features, labels, num_bins, expected = case(golden, name)
    bins = generate_bins(features, labels, num_bins, memory_budget_mb=memory_budget_mb)
    assert len(bins) == num_bins
    assert np.array_equal(bin_of_sample(bins, len(features)), expected)


@pytest.mark.parametrize("memory_budget_mb", [256.0, LAZY_MB], ids=["gram", "lazy"])
def test_reference_rule_follows_the_reference_rounding_for_classes_smaller_than_num_bins(golden, memory_budget_mb):
    """300 / 300 / 6 real samples in 10 bins: where the reference's round gives the small class 0
    it gives nothing (bins 0, 1, 2, 4, 6, 8 hold it), exactly as the literal reference."""
    features, labels, _, _ = case(golden, "fmnist_pooled_classwise")
    rows = np.concatenate([np.flatnonzero(labels == c)[:size] for c, size in zip(np.unique(labels)[:3], (300, 300, 6))])
    features, labels = features[rows], labels[rows]
    small = labels == np.unique(labels)[2]
    assert bin_budgets([300, 300, 6], 10)[2].tolist() == [1, 1, 1, 0, 1, 0, 1, 0, 1, 0]
    bins = generate_bins(features, labels, 10, memory_budget_mb=memory_budget_mb)
    ours = bin_of_sample(bins, len(features))
    assert sorted(ours[small].tolist()) == [0, 1, 2, 4, 6, 8]
    assert np.array_equal(ours, literal_bins(features, labels, 10))


def test_literal_reference_reproduces_golden(golden):
    # The test's own reference must itself match the reference code before it can judge anything.
    features, labels, num_bins, expected = case(golden, "fmnist_pooled_classwise")
    assert np.array_equal(literal_bins(features, labels, num_bins), expected)


@pytest.mark.parametrize("memory_budget_mb", [256.0, LAZY_MB], ids=["gram", "lazy"])
def test_agrees_with_literal_reference_on_other_bin_counts(golden, memory_budget_mb):
    features, labels, _, _ = case(golden, "fmnist_pooled_classwise")
    bins = generate_bins(features, labels, 7, memory_budget_mb=memory_budget_mb)
    assert np.array_equal(bin_of_sample(bins, len(features)), literal_bins(features, labels, 7))

    pixels, _, _, _ = case(golden, "fmnist_pixels_classwise")
    subset = pixels[:600]
    bins = generate_bins(subset, None, 4, memory_budget_mb=memory_budget_mb)
    assert np.array_equal(bin_of_sample(bins, len(subset)), literal_bins(subset, None, 4))


@pytest.mark.parametrize("memory_budget_mb", [256.0, LAZY_MB], ids=["gram", "lazy"])
def test_dot_kernel_agrees_with_literal_reference(golden, memory_budget_mb):
    # Centred features give negative dot products: the lazy bound must not assume gains only fall.
    features, labels, _, _ = case(golden, "fmnist_pooled_classwise")
    centred = (features - features.mean(axis=0)) / 255.0
    for f, y in [(features / 255.0, labels), (centred, labels), (centred[:700], None)]:
        bins = generate_bins(f, y, 5, kernel="dot", memory_budget_mb=memory_budget_mb)
        assert np.array_equal(bin_of_sample(bins, len(f)), literal_bins(f, y, 5, kernel="dot"))


def test_lazy_path_on_a_large_unlabelled_set_matches_gram_path(golden):
    # 2000 real samples as one class: many refreshes, block widening and block Gram runs.
    features, _, _, _ = case(golden, "fmnist_pooled_classwise")
    gram = generate_bins(features, None, 10, memory_budget_mb=256.0)
    for budget in [LAZY_MB, 2.0]:
        lazy = generate_bins(features, None, 10, memory_budget_mb=budget)
        assert all(np.array_equal(a, b) for a, b in zip(gram, lazy))


def test_zero_rows_count_as_cosine_zero(golden):
    features, _, _, _ = case(golden, "fmnist_pooled_classwise")
    f = features[:300].copy()
    f[[3, 150, 151]] = 0.0
    expected = literal_bins(f, None, 3)
    for budget in [256.0, LAZY_MB]:
        assert np.array_equal(bin_of_sample(generate_bins(f, None, 3, memory_budget_mb=budget), 300), expected)


@pytest.mark.parametrize("memory_budget_mb", [256.0, LAZY_MB], ids=["gram", "lazy"])
def test_ties_go_to_the_lowest_index(memory_budget_mb):
    # Identical rows: every gain ties at every step, so bins are consecutive index ranges (300
    # tied candidates also exceed the Gram path's near-tie limit, which forces exact rescoring).
    bins = generate_bins(np.ones((300, 4), dtype=np.float32), None, 3, memory_budget_mb=memory_budget_mb)
    assert [b.tolist() for b in bins] == [list(range(0, 100)), list(range(100, 200)), list(range(200, 300))]


def test_bins_are_sorted_disjoint_and_cover(golden):
    features, labels, _, _ = case(golden, "fmnist_pixels_classwise")
    bins = generate_bins(features, labels, 6)
    every = np.concatenate(bins)
    assert all(b.dtype == np.int64 and np.all(np.diff(b) > 0) for b in bins)
    assert np.array_equal(np.sort(every), np.arange(len(features)))


def test_bin_budgets_follow_the_reference_rule(golden):
    # Balanced: exactly n_c/K everywhere.
    assert np.array_equal(bin_budgets([500] * 10, 10), np.full((10, 10), 50))
    # The golden bins' own per-class, per-bin counts.
    for name in ["fmnist_pixels_classwise", "fmnist_pooled_classwise", "fmnist_pixels_unlabelled"]:
        _, labels, num_bins, expected = case(golden, name)
        labels = np.zeros(len(expected), dtype=int) if labels is None else labels
        counts = np.array([np.bincount(expected[labels == c], minlength=num_bins) for c in np.unique(labels)])
        assert np.array_equal(bin_budgets(np.bincount(labels), num_bins), counts)
    # Banker's rounding of round(B/|avail| · n_c): 25 samples in 10 bins: B = round(2.5) = 2.
    table = bin_budgets([25], 10)
    assert table[0, 0] == 2 and table.sum() == 25 and table[0, -1] == 25 - table[0, :-1].sum()


def test_class_bins_compose_to_generate_bins(golden):
    # The fan-out contract: per-class calls with the budget table rebuild generate_bins.
    features, labels, num_bins, expected = case(golden, "fmnist_pixels_classwise")
    classes = np.unique(labels)
    budgets = bin_budgets([np.sum(labels == c) for c in classes], num_bins)
    out = np.full(len(labels), -1)
    for c, row in zip(classes, budgets):
        members = np.flatnonzero(labels == c)
        local_bins = generate_class_bins(features[members], row)
        assert [len(b) for b in local_bins] == row.tolist()
        for b, local in enumerate(local_bins):
            out[members[local]] = b
    assert np.array_equal(out, expected)


def explicit_gradient_features(emb: GradientEmbedding) -> np.ndarray:
    """[g, g ⊗ e] materialised in DeepCore's layout (only possible on small data)."""
    g, e = emb.g.astype(np.float64), emb.e.astype(np.float64)
    return np.concatenate([g, (g[:, :, None] * e[:, None, :]).reshape(len(g), -1)], axis=1)


@pytest.fixture(scope="module")
def gradient_case(golden) -> tuple[GradientEmbedding, np.ndarray]:
    features, labels, _, _ = case(golden, "fmnist_pooled_classwise")
    e = features[:400] / 255.0
    y = labels[:400]
    return gradient_embedding(e, y, num_classes=10, seed=3), y


def test_gradient_embedding_products_match_explicit_features(gradient_case):
    emb, _ = gradient_case
    f = explicit_gradient_features(emb)
    rng = np.random.default_rng(0)
    v = rng.standard_normal(f.shape[1])
    assert emb.dim == f.shape[1]
    norms = np.linalg.norm(f, axis=1)
    gram, kappa = emb.approx_gram()
    assert gram.dtype == np.float32 and 0 < kappa < 1e-7
    assert np.all(np.abs(gram - f @ f.T) <= kappa * np.outer(norms, norms))
    np.testing.assert_allclose(emb.sq_norms(), np.einsum("ij,ij->i", f, f), rtol=1e-10)
    np.testing.assert_allclose(emb.dot(v), f @ v, rtol=1e-9, atol=1e-12)
    w = rng.random(len(f))
    np.testing.assert_allclose(emb.weighted_sum(w), w @ f, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(emb.row(7), f[7], rtol=1e-12)


def test_fast_float32_products_stay_within_their_error_bounds(golden):
    # Exactness rests on these bounds: float32 results are only trusted up to κ·|f_i|·|f|.
    features, _, _, _ = case(golden, "fmnist_pixels_classwise")
    rows = DenseRows(features[:500])
    exact = features[:500].astype(np.float64)
    norms = np.linalg.norm(exact, axis=1)
    gram, kappa = rows.approx_gram()
    assert gram.dtype == np.float32
    assert np.all(np.abs(gram - exact @ exact.T) <= kappa * np.outer(norms, norms))
    v = np.random.default_rng(0).standard_normal(exact.shape[1]) * 1e3
    approx, kappa = rows.approx_dot(v)
    assert kappa > 0 and np.all(np.abs(approx - exact @ v) <= kappa * norms * np.linalg.norm(v))


@pytest.mark.parametrize("kernel", ["cosine", "dot"])
@pytest.mark.parametrize("memory_budget_mb", [256.0, LAZY_MB], ids=["gram", "lazy"])
def test_gradient_embedding_selects_what_explicit_features_select(gradient_case, kernel, memory_budget_mb):
    emb, y = gradient_case
    explicit = explicit_gradient_features(emb)
    for labels in [y, None]:
        factorised = generate_bins(emb, labels, 4, kernel=kernel, memory_budget_mb=memory_budget_mb)
        dense = generate_bins(explicit, labels, 4, kernel=kernel, memory_budget_mb=memory_budget_mb)
        assert all(np.array_equal(a, b) for a, b in zip(factorised, dense))


def test_gradient_embedding_matches_torch_autograd(golden):
    torch = pytest.importorskip("torch")
    features, labels, _, _ = case(golden, "fmnist_pooled_classwise")
    e, y = features[:64].astype(np.float64) / 255.0, labels[:64]
    for targets in [y, None]:
        emb = gradient_embedding(e, targets, num_classes=10, seed=5)
        # The documented head: W, b ~ U(-1/√D, 1/√D) from default_rng(seed), W first.
        rng = np.random.default_rng(5)
        bound = 1 / np.sqrt(e.shape[1])
        w, b = rng.uniform(-bound, bound, (10, e.shape[1])), rng.uniform(-bound, bound, 10)
        logits = torch.tensor(e @ w.T + b, requires_grad=True)
        t = torch.tensor(y if targets is not None else (e @ w.T + b).argmax(1))
        # DeepCore: CrossEntropyLoss on softmax(outputs), i.e. softmax applied twice.
        loss = torch.nn.functional.cross_entropy(torch.softmax(logits, dim=1), t, reduction="sum")
        (grad,) = torch.autograd.grad(loss, logits)
        np.testing.assert_allclose(emb.g, grad.numpy(), rtol=1e-4, atol=1e-7)
        assert emb.e is e


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"features": np.zeros((0, 3))}, "empty"),
        ({"features": np.ones((10, 3)), "kernel": "rbf"}, "unknown kernel 'rbf'"),
        ({"features": np.ones((10, 3)), "num_bins": 0}, "num_bins"),
        ({"features": np.ones((10, 3)), "labels": np.zeros(9)}, "9 labels"),
    ],
)
def test_rejects_bad_input(kwargs, message):
    with pytest.raises(DQInputError, match=message.replace("(", r"\(").replace(")", r"\)")):
        generate_bins(**kwargs)


def test_classes_smaller_than_num_bins_fill_their_first_bins():
    """Long-tailed data, per-class rule: a class of 3 in 10 bins gives one sample to each of bins
    0-2 and none later."""
    table = bin_budgets([997, 3, 6], 10, "per-class")
    assert table[1].tolist() == [1, 1, 1, 0, 0, 0, 0, 0, 0, 0]
    assert table[2].tolist() == [1, 1, 1, 1, 1, 1, 0, 0, 0, 0]
    assert table.sum(axis=1).tolist() == [997, 3, 6]
    features = np.random.default_rng(0).normal(size=(1006, 4))
    labels = np.array([0] * 997 + [1] * 3 + [2] * 6)
    bins = generate_bins(features, labels, 10, budget_rule="per-class")
    assert [int((labels[b] == 1).sum()) for b in bins] == table[1].tolist()
    assert sorted(np.concatenate(bins).tolist()) == list(range(1006))
    # Fewer samples than bins, no labels: the first bins hold one each, the rest are empty.
    assert [len(b) for b in generate_bins(np.ones((3, 2)), None, 5)] == [1, 1, 1, 0, 0]


def test_rejects_nonfinite_features_naming_the_sample():
    features = np.ones((20, 3), dtype=np.float32)
    features[13, 1] = np.nan
    features[17, 0] = np.inf
    with pytest.raises(ValueError, match="sample 13"):
        generate_bins(features, None, 2)
    emb = GradientEmbedding(np.ones((20, 2)), features)
    with pytest.raises(DQInputError, match="sample 13"):
        generate_bins(emb, None, 2)


def test_class_bins_reject_budgets_that_do_not_add_up():
    with pytest.raises(DQInputError, match="sum to the 10 rows"):
        generate_class_bins(np.ones((10, 2)), [3, 3, 3])


def test_per_class_budgets_depend_on_the_class_alone():
    from dq_ops.bins import bin_budgets

    table = bin_budgets([100, 57, 6], 10, rule="per-class")
    assert table.sum(axis=1).tolist() == [100, 57, 6]
    assert table[0].tolist() == [10] * 10
    assert (table[2] > 0).sum() < 10  # a class smaller than K fills fewer bins
    # Adding samples to one class leaves the other rows as they were (the reference rule does not promise that).
    assert (bin_budgets([100, 57, 9], 10, rule="per-class")[:2] == table[:2]).all()
    with pytest.raises(DQInputError, match="unknown budget rule"):
        bin_budgets([10], 2, rule="nope")


def test_join_bins_keeps_existing_rows_and_puts_rows_back_where_the_greedy_had_them():
    from dq_ops.bins import generate_class_bins, join_bins, join_boundaries, join_rows

    features = np.load(GOLDEN)["fmnist_pooled_classwise__features"][:400]
    bins = generate_class_bins(features, [100, 100, 100, 100])
    bin_of = np.empty(400, dtype=np.int32)
    for b, members in enumerate(bins):
        bin_of[members] = b
    # Take samples out of bins 0 and 1 and let them join again: existing rows never move, and
    # the taken samples (picked by the greedy into early bins) mostly join the same bins again.
    taken = np.concatenate([bins[0][::10], bins[1][::10]])
    partial = bin_of.copy()
    partial[taken] = -1
    joined = join_bins(features, partial, 4)
    kept = np.setdiff1d(np.arange(400), taken)
    assert (joined[kept] == bin_of[kept]).all() and (joined >= 0).all()
    assert (joined[taken] == bin_of[taken]).mean() >= 0.8
    assert (join_bins(features, joined, 4) == joined).all()  # nothing new: unchanged
    # What a refresh keeps of the bins (their boundaries) is all a join needs of the existing rows.
    boundaries = join_boundaries(features[kept], bin_of[kept], 4)
    assert boundaries.directions.shape == (3, features.shape[1]) and np.isfinite(boundaries.thresholds).all()
    assert (join_rows(features[taken], boundaries) == joined[taken]).all()
    assert np.isnan(join_boundaries(features, np.minimum(bin_of, 1), 4).thresholds[1:]).all()  # bins 2, 3 empty: no joins


@pytest.mark.parametrize("memory_budget_mb", [256.0, LAZY_MB], ids=["gram", "lazy"])
def test_coordinates_no_row_uses_change_no_bin(golden, memory_budget_mb):
    # The greedy drops them (FeatureRows.compact): ReLU features leave most of them zero.
    features, labels, num_bins, expected = case(golden, "fmnist_pooled_classwise")
    rng = np.random.default_rng(0)
    padded = np.zeros((len(features), features.shape[1] + 64), dtype=features.dtype)
    keep = np.sort(rng.choice(padded.shape[1], features.shape[1], replace=False))
    padded[:, keep] = features
    assert DenseRows(padded).compact().dim == (features != 0).any(axis=0).sum()
    bins = generate_bins(padded, labels, num_bins, memory_budget_mb=memory_budget_mb)
    np.testing.assert_array_equal(bin_of_sample(bins, len(features)), expected)


def test_compact_gradient_embedding_keeps_every_product(gradient_case):
    emb, _ = gradient_case
    e = np.zeros((len(emb), emb.e.shape[1] + 5))
    e[:, 5:] = emb.e
    padded = GradientEmbedding(emb.g, e)
    compact = padded.compact()
    assert compact.dim == emb.g.shape[1] * (1 + int((e != 0).any(axis=0).sum()))
    np.testing.assert_allclose(compact.sq_norms(), padded.sq_norms(), rtol=1e-12)
    np.testing.assert_allclose(compact.approx_gram()[0], padded.approx_gram()[0], rtol=1e-6)
