"""Streaming CTR eval metrics in numpy: the jitted eval step returns probabilities and the eval loop feeds them here."""

from __future__ import annotations

import numpy as np

# tf.metrics.auc (TF1 metrics_impl.auc, which DeepRec inherits) uses two different epsilons:
_TF_THRESHOLD_EPSILON = 1e-7  # `kepsilon`: pushes the end thresholds just outside [0, 1].
_TF_RATE_EPSILON = 1e-6  # `epsilon`: added to tp and the denominators of tpr and fpr.

# Probabilities are clipped to [eps, 1 - eps] before the log, so a confident mistake costs -log(eps), not inf.
_LOGLOSS_EPSILON = 1e-7


def _positives(labels) -> np.ndarray:
    """Labels as booleans (0 is negative, anything else positive), the way TF casts labels for its AUC."""
    return np.asarray(labels).astype(bool)


def _correct_pairs_per_group(positive, scores, groups, num_groups):
    """Per group: the (positive, negative) pairs ranked correctly, ties as 1/2, plus its positive and negative counts.

    Sorted by (group, score), a run of equal (group, score) is a set of tied examples. A run's positives beat
    every negative in an earlier run of the same group and tie with the run's own negatives. Returns float64
    arrays [num_groups]: correct_pairs, num_positive, num_negative.
    """
    empty = np.zeros(num_groups)
    if positive.size == 0:
        return empty, empty, empty
    order = np.argsort(scores)  # the order within a run of tied scores does not matter
    order = order[np.argsort(groups[order], kind="stable")]  # by group, then score; a radix sort on the int codes
    positive, scores, groups = positive[order], scores[order], groups[order]
    run_starts = np.flatnonzero(np.r_[True, (groups[1:] != groups[:-1]) | (scores[1:] != scores[:-1])])
    run_positive = np.add.reduceat(positive.astype(np.int64), run_starts)  # [R]
    run_negative = np.diff(np.r_[run_starts, positive.size]) - run_positive  # [R]
    run_group = groups[run_starts]  # [R], ascending
    num_positive = np.bincount(run_group, weights=run_positive, minlength=num_groups)  # [G]
    num_negative = np.bincount(run_group, weights=run_negative, minlength=num_groups)  # [G]
    negatives_before_run = np.cumsum(run_negative) - run_negative  # all groups so far
    negatives_before_group = np.cumsum(num_negative) - num_negative
    negatives_below = negatives_before_run - negatives_before_group[run_group]  # within the run's group
    run_pairs = run_positive * (negatives_below + 0.5 * run_negative)
    correct_pairs = np.bincount(run_group, weights=run_pairs, minlength=num_groups)  # [G]
    return correct_pairs, num_positive, num_negative


def roc_auc(labels, scores) -> float:
    """Exact ROC AUC, the quantity the thresholded TF metric approximates.

    AUC = #{(p, n): s_p > s_n} + 1/2 #{(p, n): s_p == s_n}, divided by P * N, over all pairs of a positive p and a
    negative n; equal to the Mann-Whitney statistic with average ranks for ties. O(n log n) (one sort). Returns nan
    when only one class is present, where AUC is undefined.
    """
    positive = _positives(labels)
    groups = np.zeros(positive.size, np.int64)
    correct_pairs, num_positive, num_negative = _correct_pairs_per_group(positive, np.asarray(scores), groups, 1)
    if num_positive[0] == 0 or num_negative[0] == 0:
        return float("nan")
    return float(correct_pairs[0] / (num_positive[0] * num_negative[0]))


def thresholded_auc(labels, scores, num_thresholds: int = 1000) -> float:
    """ROC AUC as TF1 tf.metrics.auc(curve='ROC', summation_method='trapezoidal') computes it, for DeepRec parity.

    thresholds = [0 - 1e-7] + [(i + 1) / (num_thresholds - 1) for i in range(num_thresholds - 2)] + [1 + 1e-7];
    at each threshold t: tp = #(label=1, score > t), fn = #(label=1, score <= t), fp and tn likewise for label=0;
    tpr = (tp + eps) / (tp + fn + eps), fpr = fp / (fp + tn + eps) with eps = 1e-6 (TF's `epsilon`; the 1e-7
    `kepsilon` only shifts the end thresholds); auc = sum_i (fpr[i] - fpr[i+1]) * (tpr[i] + tpr[i+1]) / 2.
    Like TF, scores and thresholds are compared in float32; the counts and rates here are float64, so the result
    matches TF up to TF's float32 rounding of the counts and rates. Only one class present still gives a number,
    as in TF. Scores are bucketed between thresholds with one searchsorted, not compared to each threshold.
    """
    if num_thresholds < 2:
        raise ValueError(f"thresholded_auc needs num_thresholds >= 2 (the two end thresholds); got {num_thresholds}.")
    inner = [(i + 1) / (num_thresholds - 1) for i in range(num_thresholds - 2)]
    thresholds = np.array([0.0 - _TF_THRESHOLD_EPSILON] + inner + [1.0 + _TF_THRESHOLD_EPSILON], np.float32)
    positive = _positives(labels)
    # An example is predicted positive at thresholds[:k], k = #(thresholds < score).
    k = np.searchsorted(thresholds, np.asarray(scores).astype(np.float32), side="left")  # [N]
    num_positive, num_negative = positive.sum(), (~positive).sum()
    tp = num_positive - np.cumsum(np.bincount(k[positive], minlength=num_thresholds + 1))[:num_thresholds]
    fp = num_negative - np.cumsum(np.bincount(k[~positive], minlength=num_thresholds + 1))[:num_thresholds]
    tpr = (tp + _TF_RATE_EPSILON) / (num_positive + _TF_RATE_EPSILON)  # tp + fn == num_positive
    fpr = fp / (num_negative + _TF_RATE_EPSILON)  # fp + tn == num_negative
    return float(np.sum((fpr[:-1] - fpr[1:]) * (tpr[:-1] + tpr[1:]) / 2.0))


def group_auc(labels, scores, groups) -> float:
    """GAUC of the DIN paper: per-user AUC averaged with impression weights, so ranking is judged within each user.

    GAUC = sum_u n_u * AUC_u / sum_u n_u, with n_u the user's number of examples and AUC_u the exact ROC AUC
    (ties 1/2) of the user's examples. Users whose examples are all one class have no AUC and are left out of
    both sums; nan if no user has both classes. One global sort by (user, score), no loop over users.
    """
    _, codes = np.unique(np.asarray(groups), return_inverse=True)
    codes = codes.reshape(-1)
    num_groups = int(codes.max()) + 1 if codes.size else 0
    correct_pairs, num_positive, num_negative = _correct_pairs_per_group(
        _positives(labels), np.asarray(scores), codes, num_groups)
    has_both = (num_positive > 0) & (num_negative > 0)
    if not has_both.any():
        return float("nan")
    impressions = (num_positive + num_negative)[has_both]
    user_auc = correct_pairs[has_both] / (num_positive[has_both] * num_negative[has_both])
    return float(np.sum(impressions * user_auc) / np.sum(impressions))


def accuracy(labels, probs) -> float:
    """Fraction of examples whose predicted class equals the label, as DeepRec's tf.metrics.accuracy(round(prob)).

    Predicted class = round-half-to-even(prob) = 1 if prob > 0.5 else 0: tf.round(0.5) is 0, so a probability of
    exactly 0.5 predicts the negative class.
    """
    return float(np.mean((np.asarray(probs) > 0.5) == _positives(labels)))


def logloss(labels, probs) -> float:
    """Mean binary cross-entropy -[y log p + (1 - y) log(1 - p)], with p clipped to [1e-7, 1 - 1e-7] to stay finite."""
    y = np.asarray(labels, np.float64)
    p = np.clip(np.asarray(probs, np.float64), _LOGLOSS_EPSILON, 1.0 - _LOGLOSS_EPSILON)
    return float(-np.mean(y * np.log(p) + (1.0 - y) * np.log(1.0 - p)))


class StreamingMetrics:
    """Accumulates (label, probability, user, weight) over eval batches; compute() gives every metric."""

    def __init__(self) -> None:
        """Starts with no examples."""
        self._labels: list[np.ndarray] = []
        self._probs: list[np.ndarray] = []
        self._users: list[np.ndarray] = []

    def update(self, labels, probs, users, weights) -> None:
        """Keeps the rows of one batch (arrays [B]) whose weight is > 0; weight-0 rows are padding and are dropped.

        Weights act only as this padding mask: every kept row counts once in every metric.
        """
        labels, probs, users, weights = (np.asarray(a) for a in (labels, probs, users, weights))
        shapes = {"labels": labels.shape, "probs": probs.shape, "users": users.shape, "weights": weights.shape}
        if labels.ndim != 1 or len(set(shapes.values())) != 1:
            raise ValueError(f"StreamingMetrics.update expects four arrays of the same shape [B]; got {shapes}.")
        keep = weights > 0
        labels = labels[keep].astype(np.float64)
        if not np.all((labels == 0) | (labels == 1)):
            bad = np.unique(labels[(labels != 0) & (labels != 1)])[:5]
            raise ValueError(f"StreamingMetrics.update: labels of rows with weight > 0 must be 0 or 1; got {bad}.")
        self._labels.append(labels)
        self._probs.append(probs[keep].astype(np.float64))
        self._users.append(users[keep])

    def compute(self) -> dict[str, float]:
        """All metrics over every kept row so far: auc, auc_1000, gauc, accuracy, logloss, num_examples."""
        labels = np.concatenate(self._labels) if self._labels else np.zeros(0)
        if labels.size == 0:
            raise ValueError("StreamingMetrics.compute: no examples (update() never called, or every row had "
                             "weight 0); check that the eval data is not empty.")
        probs = np.concatenate(self._probs)
        users = np.concatenate(self._users)
        return {
            "auc": roc_auc(labels, probs),
            "auc_1000": thresholded_auc(labels, probs, num_thresholds=1000),
            "gauc": group_auc(labels, probs, users),
            "accuracy": accuracy(labels, probs),
            "logloss": logloss(labels, probs),
            "num_examples": int(labels.size),
        }
