"""SegMetrics against a hand-computed confusion matrix, the ignore index, excluded classes, merge, torch input."""
import numpy as np
import pytest
import torch

from edgeseg.eval.metrics import SegMetrics, format_table, metrics_from_confusion

# K = 4, ignore 255. Class 3 is predicted only on an ignored pixel, so it is absent: excluded.
LABEL = np.array([[0, 0, 1, 1], [1, 2, 255, 0]])
PRED = np.array([[0, 1, 1, 1], [0, 2, 3, 0]])
# (gt, pred): (0,0) (0,1) (1,1) (1,1) (1,0) (2,2) [ignored] (0,0)
CONF = np.array([[2, 1, 0, 0],
                 [1, 2, 0, 0],
                 [0, 0, 1, 0],
                 [0, 0, 0, 0]])


def test_hand_computed():
    m = SegMetrics(4, 255)
    m.update(PRED, LABEL)
    np.testing.assert_array_equal(m.confusion, CONF)
    r = m.compute()
    # IoU0 = 2 / (3 + 3 - 2), IoU1 = 2 / (3 + 3 - 2), IoU2 = 1 / 1, class 3 excluded
    assert r["per_class_iou"][:3] == pytest.approx([0.5, 0.5, 1.0])
    assert r["per_class_iou"][3] is None
    assert r["excluded_classes"] == [3]
    assert r["miou"] == pytest.approx(2 / 3)
    assert r["aacc"] == pytest.approx(5 / 7)
    assert r["per_class_acc"][:3] == pytest.approx([2 / 3, 2 / 3, 1.0])
    assert r["per_class_acc"][3] is None
    assert r["macc"] == pytest.approx((2 / 3 + 2 / 3 + 1) / 3)
    assert r["fwiou"] == pytest.approx(3 / 7 * 0.5 + 3 / 7 * 0.5 + 1 / 7 * 1.0)
    assert r["num_pixels"] == 7
    assert r["confusion"] == CONF.tolist()


def test_predicted_but_never_labelled_counts_as_zero():
    m = SegMetrics(4, 255)
    m.update(np.array([3, 0]), np.array([0, 0]))
    r = m.compute()
    assert r["excluded_classes"] == [1, 2]
    assert r["per_class_iou"][3] == 0.0
    assert r["per_class_iou"][0] == pytest.approx(0.5)
    assert r["miou"] == pytest.approx(0.25)
    assert r["macc"] == pytest.approx(0.5)  # class 3 has no labelled pixel: no accuracy


def test_ignore_index_inside_class_range_shape():
    # CamVid style: ignore = K (11); pixels labelled 11 are never counted whatever the prediction
    m = SegMetrics(11, 11)
    m.update(np.array([5, 5, 3]), np.array([11, 11, 3]))
    assert m.confusion.sum() == 1 and m.confusion[3, 3] == 1


def test_merge_equals_single_pass_and_torch_equals_numpy():
    rng = np.random.default_rng(0)
    labels = [rng.integers(0, 6, (7, 9)) for _ in range(5)]
    preds = [rng.integers(0, 5, (7, 9)) for _ in range(5)]
    for lab in labels:
        lab[rng.random(lab.shape) < 0.2] = 255
    single = SegMetrics(5, 255)
    for p, lab in zip(preds, labels):
        lab = np.where(lab == 5, 255, lab)
        single.update(p, lab)
    a, b = SegMetrics(5, 255), SegMetrics(5, 255)
    for i, (p, lab) in enumerate(zip(preds, labels)):
        lab = np.where(lab == 5, 255, lab)
        (a if i % 2 else b).update(torch.from_numpy(p), torch.from_numpy(lab))
    a.merge(b)
    np.testing.assert_array_equal(a.confusion, single.confusion)
    assert a.compute() == single.compute()
    # naive loop
    naive = np.zeros((5, 5), np.int64)
    for p, lab in zip(preds, labels):
        for g, q in zip(lab.ravel(), p.ravel()):
            if g not in (5, 255):
                naive[g, q] += 1
    np.testing.assert_array_equal(single.confusion, naive)


def test_out_of_range_values_are_refused():
    m = SegMetrics(3, 255)
    with pytest.raises(ValueError):
        m.update(np.array([0]), np.array([3]))
    with pytest.raises(ValueError):
        m.update(np.array([7]), np.array([0]))
    with pytest.raises(ValueError):
        m.update(np.array([0, 1]), np.array([0]))
    with pytest.raises(ValueError):
        m.merge(SegMetrics(4, 255))


def test_empty_gives_none():
    r = SegMetrics(3, 255).compute()
    assert r["miou"] is None and r["aacc"] is None and r["excluded_classes"] == [0, 1, 2]


def test_format_table_names_excluded_classes():
    r = metrics_from_confusion(CONF)
    t = format_table(r, ["sky", "road", "car", "bus"])
    assert "66.67" in t.splitlines()[-1]  # mIoU in %
    assert "excluded" in t and "bus" in t.splitlines()[-1]
    assert "road" in t and "50.00" in t
    with pytest.raises(ValueError):
        format_table(r, ["a"])
