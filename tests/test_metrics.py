"""Specifications of the streaming eval metrics, each checked against an independent (slow, obvious) computation."""

from __future__ import annotations

import math

import numpy as np
import pytest

from din_jax.metrics import StreamingMetrics, accuracy, group_auc, logloss, roc_auc, thresholded_auc


def brute_force_auc(labels, scores) -> float:
    """AUC by counting every (positive, negative) pair: 1 if the positive scores higher, 1/2 on a tie."""
    pos = scores[labels == 1]
    neg = scores[labels == 0]
    wins = (pos[:, None] > neg[None, :]).sum() + 0.5 * (pos[:, None] == neg[None, :]).sum()
    return wins / (len(pos) * len(neg))


def tf_auc_loop(labels, scores, num_thresholds=1000) -> float:
    """tf.metrics.auc (TF1, ROC, trapezoidal) written as the plain loop over thresholds in metrics_impl.py."""
    kepsilon, epsilon = 1e-7, 1.0e-6
    thresholds = [(i + 1) * 1.0 / (num_thresholds - 1) for i in range(num_thresholds - 2)]
    thresholds = [0.0 - kepsilon] + thresholds + [1.0 + kepsilon]
    preds = scores.astype(np.float32)
    tpr, fpr = [], []
    for t in thresholds:
        above = preds > np.float32(t)
        tp = np.sum(above & (labels == 1))
        fn = np.sum(~above & (labels == 1))
        fp = np.sum(above & (labels == 0))
        tn = np.sum(~above & (labels == 0))
        tpr.append((tp + epsilon) / (tp + fn + epsilon))
        fpr.append(fp / (fp + tn + epsilon))
    return sum((fpr[i] - fpr[i + 1]) * (tpr[i] + tpr[i + 1]) / 2 for i in range(num_thresholds - 1))


def random_eval_set(rng, n, num_users):
    """Labels, tie-heavy scores (rounded to 2 decimals) and user ids for n examples."""
    labels = rng.integers(0, 2, n).astype(np.float64)
    scores = np.round(rng.random(n), 2)
    users = rng.integers(0, num_users, n)
    return labels, scores, users


def test_roc_auc_hand_example():
    assert roc_auc(np.array([0, 0, 1, 1]), np.array([0.1, 0.4, 0.35, 0.8])) == 0.75


def test_roc_auc_counts_ties_as_half():
    # Pairs: (0.5 vs 0.5) tie = 1/2, (0.5 vs 0.2) win = 1, (0.9 vs 0.5) win, (0.9 vs 0.2) win -> 3.5 / 4.
    assert roc_auc(np.array([1, 1, 0, 0]), np.array([0.5, 0.9, 0.5, 0.2])) == 3.5 / 4


def test_roc_auc_matches_brute_force_pair_count_with_ties():
    rng = np.random.default_rng(0)
    for n in (2, 7, 300, 2000):
        labels, scores, _ = random_eval_set(rng, n, 1)
        labels[:2] = [0, 1]
        assert abs(roc_auc(labels, scores) - brute_force_auc(labels, scores)) < 1e-12


def test_roc_auc_is_nan_with_one_class():
    assert math.isnan(roc_auc(np.ones(5), np.linspace(0, 1, 5)))
    assert math.isnan(roc_auc(np.zeros(5), np.linspace(0, 1, 5)))
    assert math.isnan(roc_auc(np.zeros(0), np.zeros(0)))


def test_thresholded_auc_matches_tf_loop_over_thresholds():
    rng = np.random.default_rng(1)
    # The ends, scores on a threshold, and one just above 500/999 in float64 but equal to it in float32 (TF: not above).
    on_edges = [0.0, 1.0, 0.5, 1 / 3, 500 / 999, np.float32(1 / 999), np.nextafter(500 / 999, 1.0)]
    for n in (7, 50, 3000):
        labels = rng.integers(0, 2, n).astype(np.float64)
        labels[:2] = [0, 1]
        scores = np.concatenate([on_edges, rng.random(n - 7)])
        assert abs(thresholded_auc(labels, scores) - tf_auc_loop(labels, scores)) < 1e-9


def test_thresholded_auc_matches_tf_loop_with_one_class():
    scores = np.random.default_rng(2).random(100)
    for labels in (np.zeros(100), np.ones(100)):
        assert abs(thresholded_auc(labels, scores) - tf_auc_loop(labels, scores)) < 1e-9


def test_thresholded_auc_uses_tf_rate_epsilon():
    # Perfect separation: the only fpr drop is 1/(1+eps) -> 0 at tpr 1, so the AUC is 1/(1+eps) with eps = 1e-6.
    assert thresholded_auc(np.array([0, 1]), np.array([0.25, 0.75])) == pytest.approx(1 / (1 + 1e-6), abs=1e-15)


def test_thresholded_auc_cannot_separate_scores_in_one_bucket():
    # 0.5 and 0.5004 both lie between thresholds 499/999 and 500/999: the curve jumps straight from (1, 1) to (0, 0).
    eps = 1e-6
    expected = 1 / (1 + eps) * (1 + eps / (1 + eps)) / 2
    assert thresholded_auc(np.array([0, 1]), np.array([0.5, 0.5004])) == pytest.approx(expected, abs=1e-15)


def test_thresholded_auc_is_close_to_exact_auc_on_continuous_scores():
    rng = np.random.default_rng(3)
    labels = rng.integers(0, 2, 20000)
    scores = 1 / (1 + np.exp(-(rng.normal(size=20000) + labels)))
    assert abs(thresholded_auc(labels, scores) - roc_auc(labels, scores)) < 1e-3


def test_group_auc_matches_per_user_loop_and_skips_single_class_users():
    rng = np.random.default_rng(4)
    labels, scores, users = random_eval_set(rng, 3000, 200)
    users = np.concatenate([users, [1000, 1000, 1001]])  # two single-class users
    labels = np.concatenate([labels, [1, 1, 0]])
    scores = np.concatenate([scores, [0.9, 0.1, 0.3]])
    numerator = denominator = 0.0
    for u in np.unique(users):
        mine = users == u
        if labels[mine].min() == labels[mine].max():
            continue
        numerator += mine.sum() * brute_force_auc(labels[mine], scores[mine])
        denominator += mine.sum()
    assert abs(group_auc(labels, scores, users) - numerator / denominator) < 1e-12


def test_group_auc_hand_example():
    # User 7: auc 1 over 3 examples; user 3: auc 0 over 2; user 5: one class, excluded -> (3 * 1 + 2 * 0) / 5.
    labels = np.array([0, 1, 1, 1, 0, 1, 1])
    scores = np.array([0.1, 0.2, 0.3, 0.1, 0.9, 0.5, 0.6])
    users = np.array([7, 7, 7, 3, 3, 5, 5])
    assert group_auc(labels, scores, users) == 0.6


def test_group_auc_with_one_pair_per_user_is_fraction_of_users_ranked_correctly():
    # The DIEN Amazon test set has one (negative, positive) pair per user.
    rng = np.random.default_rng(5)
    num_users = 1000
    neg_scores = np.round(rng.random(num_users), 2)
    pos_scores = np.round(rng.random(num_users), 2)
    users = np.repeat(rng.permutation(num_users) * 17, 2)
    labels = np.tile([0, 1], num_users)
    scores = np.stack([neg_scores, pos_scores], axis=1).reshape(-1)
    fraction = np.mean((pos_scores > neg_scores) + 0.5 * (pos_scores == neg_scores))
    assert abs(group_auc(labels, scores, users) - fraction) < 1e-12


def test_group_auc_is_nan_when_no_user_has_both_classes():
    assert math.isnan(group_auc(np.array([1, 0]), np.array([0.3, 0.4]), np.array([1, 2])))


def test_accuracy_predicts_negative_at_exactly_one_half():
    # round-half-to-even: predicted [0, 0, 1, 0, 1] -> correct [1, 1, 1, 0, 1] (prob >= 0.5 would give 0.4).
    labels = np.array([0, 0, 1, 1, 1])
    probs = np.array([0.5, 0.5, 0.7, 0.2, 0.50001])
    assert accuracy(labels, probs) == 0.8


def test_logloss_hand_values_and_clipping():
    assert logloss(np.array([1, 0]), np.array([0.8, 0.4])) == pytest.approx(-(math.log(0.8) + math.log(0.6)) / 2)
    assert logloss(np.array([1, 0]), np.array([0.0, 1.0])) == pytest.approx(-math.log(1e-7), rel=1e-9)


def test_streaming_metrics_ignores_padding_rows():
    rng = np.random.default_rng(6)
    labels, probs, users = random_eval_set(rng, 500, 40)
    reference = StreamingMetrics()
    reference.update(labels, probs, users, np.ones(500))
    padded = StreamingMetrics()
    pad_labels = rng.integers(0, 2, 100) * 1.0
    padded.update(np.concatenate([labels, pad_labels]), np.concatenate([probs, rng.random(100)]),
                  np.concatenate([users, rng.integers(0, 60, 100)]), np.concatenate([np.ones(500), np.zeros(100)]))
    padded.update(np.full(8, 7.0), np.full(8, 0.5), np.arange(8), np.zeros(8))  # a batch of pure padding
    assert padded.compute() == reference.compute()
    assert padded.compute()["num_examples"] == 500


def test_streaming_over_several_updates_equals_one_update():
    rng = np.random.default_rng(7)
    labels, probs, users = random_eval_set(rng, 1000, 50)
    weights = (rng.random(1000) > 0.1).astype(np.float32)
    whole = StreamingMetrics()
    whole.update(labels, probs, users, weights)
    pieces = StreamingMetrics()
    for chunk in np.array_split(np.arange(1000), [128, 256, 700]):
        pieces.update(labels[chunk], probs[chunk], users[chunk], weights[chunk])
    assert pieces.compute() == whole.compute()


def test_streaming_metrics_compute_gives_each_metric():
    rng = np.random.default_rng(8)
    labels, probs, users = random_eval_set(rng, 400, 30)
    metrics = StreamingMetrics()
    metrics.update(labels, probs.astype(np.float32), users, np.ones(400))
    assert metrics.compute() == {
        "auc": roc_auc(labels, probs.astype(np.float32)),
        "auc_1000": thresholded_auc(labels, probs.astype(np.float32)),
        "gauc": group_auc(labels, probs.astype(np.float32), users),
        "accuracy": accuracy(labels, probs.astype(np.float32)),
        "logloss": logloss(labels, probs.astype(np.float32)),
        "num_examples": 400,
    }


def test_streaming_metrics_rejects_bad_input():
    metrics = StreamingMetrics()
    with pytest.raises(ValueError, match="same shape"):
        metrics.update(np.zeros(3), np.zeros(4), np.zeros(3), np.ones(3))
    with pytest.raises(ValueError, match="must be 0 or 1"):
        metrics.update(np.array([0.0, 2.0]), np.zeros(2), np.zeros(2), np.ones(2))
    with pytest.raises(ValueError, match="no examples"):
        metrics.compute()
