"""cl_bayes.metrics against matrices and probability tables worked out by hand."""

from __future__ import annotations

import math

import numpy as np
import pytest

from cl_bayes import metrics as M

# R[i][j]: accuracy on experience j after training on experience i.
R3 = [
    [0.90, 0.10, 0.20],
    [0.70, 0.80, 0.30],
    [0.60, 0.40, 0.95],
]
# average accuracy = (0.60 + 0.40 + 0.95) / 3 = 1.95 / 3 = 0.65
# curve          = [0.90, (0.70 + 0.80) / 2, (0.60 + 0.40 + 0.95) / 3] = [0.90, 0.75, 0.65]
# BWT            = mean(0.60 - 0.90, 0.40 - 0.80) = mean(-0.30, -0.40) = -0.35
# forgetting     = mean(max(0.90, 0.70) - 0.60, max(0.80) - 0.40) = mean(0.30, 0.40) = 0.35

R4 = [
    [0.50, 0.00, 0.10, 0.20],
    [0.70, 0.90, 0.20, 0.10],
    [0.60, 0.80, 0.70, 0.30],
    [0.40, 0.85, 0.60, 1.00],
]
# average accuracy = (0.40 + 0.85 + 0.60 + 1.00) / 4 = 2.85 / 4 = 0.7125
# curve = [0.50, (0.70 + 0.90) / 2 = 0.80, (0.60 + 0.80 + 0.70) / 3 = 0.70, 0.7125]
# BWT   = mean(0.40 - 0.50, 0.85 - 0.90, 0.60 - 0.70) = mean(-0.10, -0.05, -0.10) = -0.25 / 3
# forgetting: experience 0 peaked *after* its own training (0.70 at row 1), so forgetting != -BWT:
#   j=0: max(0.50, 0.70, 0.60) - 0.40 = 0.30
#   j=1: max(0.90, 0.80)       - 0.85 = 0.05
#   j=2: max(0.70)             - 0.60 = 0.10
#   mean = 0.45 / 3 = 0.15


def test_average_accuracy_is_the_mean_of_the_last_row():
    assert M.average_accuracy(R3) == pytest.approx(0.65)
    assert M.average_accuracy(R4) == pytest.approx(0.7125)


def test_accuracy_curve_averages_the_seen_experiences():
    assert M.accuracy_curve(R3) == pytest.approx([0.90, 0.75, 0.65])
    assert M.accuracy_curve(R4) == pytest.approx([0.50, 0.80, 0.70, 0.7125])


def test_backward_transfer_by_hand():
    assert M.backward_transfer(R3) == pytest.approx(-0.35)
    assert M.backward_transfer(R4) == pytest.approx(-0.25 / 3)


def test_forgetting_uses_the_best_earlier_accuracy_not_the_diagonal():
    assert M.forgetting(R3) == pytest.approx(0.35)
    assert M.forgetting(R4) == pytest.approx(0.15)
    assert M.forgetting(R4) != pytest.approx(-M.backward_transfer(R4))


def test_forgetting_excludes_the_final_row_from_the_maximum():
    # j=0: max over rows 0..T-2 = 0.50; final 0.80 -> forgetting 0.50 - 0.80 = -0.30 (it improved).
    # A maximum that wrongly included the final row would give 0.
    r = [[0.50, 0.10], [0.80, 0.90]]
    assert M.forgetting(r) == pytest.approx(-0.30)
    assert M.backward_transfer(r) == pytest.approx(0.30)


def test_entries_above_the_diagonal_do_not_matter_except_in_the_last_row():
    r = np.array(R4)
    r[0, 1:] = [0.99, 0.0, 0.5]
    r[1, 2:] = [0.0, 0.99]
    r[2, 3] = 0.0
    for fn in (M.average_accuracy, M.backward_transfer, M.forgetting, M.accuracy_curve):
        assert fn(r.tolist()) == pytest.approx(fn(R4))


def test_no_forgetting_gives_zero():
    r = [[0.9, 0.1, 0.1], [0.9, 0.8, 0.1], [0.9, 0.8, 0.7]]
    assert M.backward_transfer(r) == pytest.approx(0.0)
    assert M.forgetting(r) == pytest.approx(0.0)


def test_joint_single_row_has_no_bwt_or_forgetting():
    joint = [[0.90, 0.80, 0.70]]
    assert M.backward_transfer(joint) is None
    assert M.forgetting(joint) is None
    assert M.average_accuracy(joint) == pytest.approx(0.80)
    assert M.accuracy_curve(joint) == pytest.approx([0.80])
    assert M.matrix_metrics(joint) == {
        "average_accuracy": pytest.approx(0.80), "backward_transfer": None, "forgetting": None,
    }


def test_single_experience_and_partial_matrices_have_no_bwt():
    assert M.backward_transfer([[0.7]]) is None
    assert M.forgetting([[0.7]]) is None
    assert M.accuracy_curve([[0.7]]) == pytest.approx([0.7])
    partial = [[0.9, 0.1, 0.2], [0.6, 0.8, 0.3]]  # stopped after 2 of 3 experiences: not square
    assert M.backward_transfer(partial) is None
    assert M.forgetting(partial) is None
    assert M.accuracy_curve(partial) == pytest.approx([0.9, 0.7])


def test_matrix_metrics_matches_the_single_functions():
    assert M.matrix_metrics(R4) == {
        "average_accuracy": pytest.approx(0.7125),
        "backward_transfer": pytest.approx(-0.25 / 3),
        "forgetting": pytest.approx(0.15),
    }


@pytest.mark.parametrize(
    "bad",
    [
        [],  # empty
        [[]],  # no experiences
        [0.5, 0.5],  # 1-D
        [[0.5], [0.5]],  # more rows than experiences
        [[0.5, 1.2], [0.5, 0.5]],  # above 1
        [[0.5, -0.1], [0.5, 0.5]],  # below 0
        [[0.5, float("nan")], [0.5, 0.5]],
        [[0.5, float("inf")], [0.5, 0.5]],
        [[0.5, 0.5], [0.5]],  # ragged
    ],
)
@pytest.mark.parametrize("fn", [M.average_accuracy, M.accuracy_curve, M.backward_transfer, M.forgetting])
def test_invalid_matrices_are_rejected(fn, bad):
    with pytest.raises(ValueError):
        fn(bad)


# --- calibration ---------------------------------------------------------------


def test_nll_by_hand():
    probs = [[0.5, 0.5], [0.2, 0.8], [1.0, 0.0]]
    labels = [0, 1, 0]
    # -(ln 0.5 + ln 0.8 + ln 1) / 3
    assert M.nll(probs, labels) == pytest.approx(-(math.log(0.5) + math.log(0.8)) / 3)


def test_nll_of_a_zero_probability_is_large_but_finite():
    value = M.nll([[1.0, 0.0]], [1])
    assert value == pytest.approx(-math.log(1e-12))
    assert math.isfinite(value)


def test_nll_uses_the_true_label_not_the_argmax():
    assert M.nll([[0.2, 0.5, 0.3]], [2]) == pytest.approx(-math.log(0.3))


# Four examples, 10 bins (b/10, (b+1)/10]:
#   [0.95, 0.05] label 0: confidence 0.95 -> bin 9, correct
#   [1.00, 0.00] label 1: confidence 1.00 -> bin 9 (right-closed: 1.0 is in the last bin), wrong
#   [0.35, 0.65] label 1: confidence 0.65 -> bin 6, correct
#   [0.55, 0.45] label 1: confidence 0.55 -> bin 5, wrong
# bin 9: n=2, acc 0.5, conf 0.975, gap 0.475; bin 6: n=1, acc 1, conf 0.65, gap 0.35;
# bin 5: n=1, acc 0, conf 0.55, gap 0.55; bins 0-4, 7, 8 empty (they add nothing).
# ECE = (2 * 0.475 + 0.35 + 0.55) / 4 = 1.85 / 4 = 0.4625.
# With the default 15 bins the grouping is the same ((14/15, 1], (0.6, 2/3], (8/15, 0.6]).
ECE_PROBS = [[0.95, 0.05], [1.0, 0.0], [0.35, 0.65], [0.55, 0.45]]
ECE_LABELS = [0, 1, 1, 1]


def test_reliability_table_by_hand():
    table = M.reliability(ECE_PROBS, ECE_LABELS, bins=10)
    assert table["count"] == [0, 0, 0, 0, 0, 1, 1, 0, 0, 2]
    assert table["accuracy"] == pytest.approx([0, 0, 0, 0, 0, 0.0, 1.0, 0, 0, 0.5])
    assert table["confidence"] == pytest.approx([0, 0, 0, 0, 0, 0.55, 0.65, 0, 0, 0.975])


def test_ece_by_hand_with_confidence_one_and_empty_bins():
    assert M.ece(ECE_PROBS, ECE_LABELS, bins=10) == pytest.approx(0.4625)
    assert M.ece(ECE_PROBS, ECE_LABELS) == pytest.approx(0.4625)  # 15 bins, same grouping
    assert M.ece_from_reliability(M.reliability(ECE_PROBS, ECE_LABELS, bins=10)) == pytest.approx(0.4625)


def test_bins_are_right_closed_at_exact_boundaries():
    # 4 bins: (0, .25], (.25, .5], (.5, .75], (.75, 1]; 0.5 and 0.75 are exact in binary.
    table = M.reliability([[0.5, 0.5], [0.75, 0.25], [1.0, 0.0]], [0, 0, 0], bins=4)
    assert table["count"] == [0, 1, 1, 1]


def test_bin_width_changes_ece():
    # [0.62, 0.38] label 0 (right), [0.68, 0.32] label 1 (wrong).
    # 10 bins: both in (0.6, 0.7]: acc 0.5, conf 0.65 -> ECE 0.15.
    # 15 bins: (0.6, 0.667] holds 0.62 (gap |1 - 0.62| = 0.38), (0.667, 0.733] holds 0.68 (gap 0.68)
    #          -> ECE (0.38 + 0.68) / 2 = 0.53.
    probs, labels = [[0.62, 0.38], [0.68, 0.32]], [0, 1]
    assert M.ece(probs, labels, bins=10) == pytest.approx(0.15)
    assert M.ece(probs, labels, bins=15) == pytest.approx(0.53)


def test_calibrated_and_overconfident_predictions():
    # Confidence 0.75 everywhere, 3 of 4 right: perfectly calibrated.
    assert M.ece([[0.75, 0.25]] * 4, [0, 0, 0, 1]) == pytest.approx(0.0)
    # Confidence 0.9 everywhere, half right: ECE = |0.5 - 0.9| = 0.4.
    assert M.ece([[0.9, 0.1]] * 4, [0, 1, 0, 1]) == pytest.approx(0.4)
    # Exactly 1.0 and always right: ECE 0.
    assert M.ece([[0.0, 1.0, 0.0]] * 3, [1, 1, 1]) == pytest.approx(0.0)


def test_ece_uses_the_max_probability_as_confidence():
    # Three classes: confidence is 0.5 (class 1), the label is 2 -> wrong; ECE = |0 - 0.5|.
    assert M.ece([[0.2, 0.5, 0.3]], [2]) == pytest.approx(0.5)


@pytest.mark.parametrize(
    "probs, labels",
    [
        ([0.5, 0.5], [0]),  # probs not 2-D
        ([[0.5, 0.5]], [[0]]),  # labels not 1-D
        ([[0.5, 0.5], [0.5, 0.5]], [0]),  # lengths differ
        (np.zeros((0, 2)), []),  # empty
    ],
)
@pytest.mark.parametrize("fn", [M.nll, M.ece, M.reliability])
def test_invalid_probabilities_are_rejected(fn, probs, labels):
    with pytest.raises(ValueError):
        fn(probs, labels)


def test_ece_of_an_empty_reliability_table_is_an_error():
    with pytest.raises(ValueError):
        M.ece_from_reliability({"count": [0, 0], "accuracy": [0, 0], "confidence": [0, 0]})
