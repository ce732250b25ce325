"""The cluster split: which observed results feed l(x) and which feed g(x).

Pure numpy (plus scikit-learn's k-means): values in, index sets out. Nothing here knows about
Optuna trials; :func:`optuna_ctpe.sampler._grouping.complete_scores` turns trials into the
``scores`` used here.

Our interpretation of arXiv:2308.06422
--------------------------------------
The paper's abstracts say that the method "combines k-means clustering with tree-structured Parzen
estimation" and builds a "dual-threshold" estimator; they do not say what is clustered, how many
clusters are used or which clusters form each group. This module implements one reading, with the
choices exposed as parameters whose defaults were chosen by the benchmarks in ``benchmarks/``:

1. ``scores`` (lower is better) are optionally transformed: ``"log"`` compresses the long tail
   of bad results so that k-means separates the good region finely (see :func:`transform`),
   ``"rank"`` uses normalised ranks and ``"none"`` (the sampler's measured default) the raw
   values.
2. Exact 1-D k-means (Lloyd) with ``n_clusters`` clusters (or the silhouette-best of 2-5 with
   ``"auto"``) runs on the transformed finite scores, started from evenly spaced quantiles, so
   it is deterministic and independent of any random seed.
3. The first threshold is the upper edge of the best cluster: its members form the good group,
   capped at ``n_good_max`` by keeping the best of them; the members beyond the cap are the
   *near misses*. The second threshold is the lower edge of the worst cluster, which forms the
   bad group. The clusters in between are the *middle*. The sampler fits g(x) to the bad group
   plus the near misses and the middle with their own weights (by default near misses count
   fully, as they are the informative negatives next to l(x), and the middle is left out).
4. Whenever clustering is not meaningful (fewer distinct finite values than clusters, all values
   equal, too few points) the split falls back to TPE's quantile split: the ``n_good_max`` best
   scores are good and all others bad. The reason is reported in :attr:`Split.fallback_reason`.
"""

from __future__ import annotations

from typing import Literal
from typing import NamedTuple

import numpy as np


Transform = Literal["log", "rank", "none"]

TRANSFORMS: tuple[str, ...] = ("log", "rank", "none")
AUTO_CLUSTER_RANGE = (2, 5)
_SILHOUETTE_SAMPLE = 300
_MAX_LLOYD_ITERATIONS = 300


class Split(NamedTuple):
    """Result of :func:`cluster_split`.

    Attributes:
        good: Indices (into ``scores``) of the good group, the observations of l(x).
        bad: Indices of the worst cluster (beyond the second threshold), the core of g(x).
        near_miss: Members of the best cluster beyond the cap on the good group: the results
            closest to l(x) that did not make it. The sampler weights them in g(x) by
            ``near_miss_weight``.
        middle: Indices of the clusters between the best and the worst. The sampler weights
            them in g(x) by ``middle_weight``.
        n_clusters: Number of clusters used; 0 when the quantile fallback was used.
        threshold: Largest raw score in the good group (``nan`` when the group is empty).
        fallback_reason: Empty when clustering decided the split, else why it did not.
    """

    good: np.ndarray
    bad: np.ndarray
    near_miss: np.ndarray
    middle: np.ndarray
    n_clusters: int
    threshold: float
    fallback_reason: str


def transform(scores: np.ndarray, method: Transform, n_good: int) -> np.ndarray:
    """Map finite scores (lower is better) to the values that k-means clusters.

    ``"log"`` computes ``log1p((y - y_min) / s)`` where ``s`` is the gap between the best score
    and the ``n_good``-th best one (TPE's threshold). Scores inside TPE's good set therefore land
    in ``[0, log 2]`` while a long tail of bad scores is compressed, so k-means spends its
    clusters where the good results are instead of isolating a few catastrophic ones. When that
    gap is zero (ties at the top), the smallest positive gap is used instead.
    """
    if method == "none":
        return scores.astype(float)
    if method == "rank":
        # Average ranks keep ties together, so equal scores always share a cluster.
        order = np.argsort(scores, kind="stable")
        ranks = np.empty(len(scores), dtype=float)
        ranks[order] = np.arange(len(scores), dtype=float)
        _, inverse = np.unique(scores, return_inverse=True)
        sums = np.bincount(inverse, weights=ranks)
        counts = np.bincount(inverse)
        return (sums / counts)[inverse] / max(len(scores) - 1, 1)
    if method == "log":
        shifted = scores - scores.min()
        k = min(max(n_good, 1), len(scores)) - 1
        scale = np.partition(shifted, k)[k]
        if scale <= 0:
            positive = shifted[shifted > 0]
            scale = positive.min() if positive.size else 1.0
        return np.log1p(shifted / scale)
    raise ValueError(f"transform must be one of {TRANSFORMS}, got {method!r}.")


def _kmeans_1d(values: np.ndarray, n_clusters: int) -> np.ndarray:
    """Lloyd's k-means on 1-D values; labels ordered by centroid (0 = lowest), without gaps.

    In one dimension every cluster is an interval, so an assignment step is a ``searchsorted``
    against the midpoints between sorted centroids. That is exact, whereas scikit-learn's
    ``KMeans`` expands ``|x - c|^2`` and loses small differences next to values of 1e8 or more
    (seen with objective values spanning that range). Starting from evenly spaced quantiles
    makes it deterministic; empty clusters (ties) are dropped.
    """
    x = np.sort(values)
    centres = np.unique(np.quantile(x, (np.arange(n_clusters) + 0.5) / n_clusters))
    for _ in range(_MAX_LLOYD_ITERATIONS):
        labels = np.searchsorted((centres[:-1] + centres[1:]) / 2, x, side="right")
        counts = np.bincount(labels, minlength=len(centres))
        sums = np.bincount(labels, weights=x, minlength=len(centres))
        updated = np.unique(sums[counts > 0] / counts[counts > 0])
        if np.array_equal(updated, centres):
            break
        centres = updated
    labels = np.searchsorted((centres[:-1] + centres[1:]) / 2, values, side="right")
    return np.unique(labels, return_inverse=True)[1]


def _choose_clustering(values: np.ndarray, n_clusters: int | Literal["auto"]) -> np.ndarray:
    if n_clusters != "auto":
        return _kmeans_1d(values, n_clusters)
    # The silhouette (unlike Calinski-Harabasz, which keeps rising as tight groups are split
    # further) peaks at the natural number of groups. A fixed subsample keeps it O(n) and
    # deterministic.
    # Imported here: scikit-learn's import costs each worker process about a second, and only
    # n_clusters="auto" needs it.
    from sklearn.metrics import silhouette_score

    n_distinct = len(np.unique(values))
    column = values.reshape(-1, 1)
    best_labels, best_score = None, -np.inf
    for k in range(AUTO_CLUSTER_RANGE[0], min(AUTO_CLUSTER_RANGE[1], n_distinct) + 1):
        labels = _kmeans_1d(values, k)
        n_used = int(labels.max()) + 1
        if not 2 <= n_used < len(values):
            continue
        # Manhattan equals Euclidean in 1-D and avoids the expanded form's cancellation.
        score = silhouette_score(
            column,
            labels,
            metric="manhattan",
            sample_size=min(len(values), _SILHOUETTE_SAMPLE),
            random_state=0,
        )
        if best_labels is None or score > best_score:
            best_labels, best_score = labels, score
    if best_labels is None:
        return _kmeans_1d(values, AUTO_CLUSTER_RANGE[0])
    return best_labels


def quantile_split(scores: np.ndarray, n_good: int, reason: str) -> Split:
    """TPE's split: the ``n_good`` best scores are good, all others bad (stable for ties)."""
    order = np.argsort(scores, kind="stable")
    n_good = min(max(n_good, 0), len(scores))
    good = np.sort(order[:n_good])
    threshold = float(scores[order[n_good - 1]]) if n_good > 0 else float("nan")
    empty = np.empty(0, dtype=int)
    return Split(good, np.sort(order[n_good:]), empty, empty, 0, threshold, reason)


def cluster_split(
    scores: np.ndarray,
    *,
    n_clusters: int | Literal["auto"],
    transform_method: Transform,
    n_good_max: int,
) -> Split:
    """Split scores (lower is better) into good, middle and bad groups by k-means.

    Args:
        scores: One score per observation; ``+inf`` is worse than any finite score and
            ``-inf`` better. NaN is not allowed (the sampler never passes it).
        n_clusters: Number of k-means clusters (``>= 2``), or ``"auto"``.
        transform_method: ``"log"``, ``"rank"`` or ``"none"``; see :func:`transform`.
        n_good_max: Upper bound on the size of the good group.

    Returns:
        The :class:`Split`; every index is in exactly one of its three groups.
    """
    scores = np.asarray(scores, dtype=float)
    if np.isnan(scores).any():
        raise ValueError("scores must not contain NaN.")
    n_good_max = max(int(n_good_max), 1)
    finite = np.flatnonzero(np.isfinite(scores))
    k_min = AUTO_CLUSTER_RANGE[0] if n_clusters == "auto" else int(n_clusters)

    n_distinct = len(np.unique(scores[finite]))
    if n_distinct < k_min or n_distinct < 2:
        return quantile_split(scores, n_good_max, f"{n_distinct} distinct finite values")

    values = transform(scores[finite], transform_method, n_good_max)
    labels = _choose_clustering(values, n_clusters)
    n_used = int(labels.max()) + 1
    if n_used < 2:
        return quantile_split(scores, n_good_max, "k-means found a single cluster")

    # -inf scores are better than any cluster, +inf scores worse than any.
    neg_inf = np.flatnonzero(scores == -np.inf)
    pos_inf = np.flatnonzero(scores == np.inf)
    best_cluster = np.concatenate([neg_inf, finite[labels == 0]])
    best_cluster = best_cluster[np.argsort(scores[best_cluster], kind="stable")]
    good = np.sort(best_cluster[:n_good_max])

    near_miss = np.sort(best_cluster[n_good_max:])
    bad = np.sort(np.concatenate([finite[labels == n_used - 1], pos_inf]))
    middle = np.flatnonzero((labels > 0) & (labels < n_used - 1))
    middle = np.sort(finite[middle])
    return Split(good, bad, near_miss, middle, n_used, float(scores[good].max()), "")
