"""The segmenter's image-level rule is written once (`segmentation_metrics.image_decisions`) and read the same by
the metrics' tally, the attacks' decision and the root causes' errors: exact answers on hand-made masks."""

from __future__ import annotations

import numpy as np
import torch

from trustcase.robustness.segmentation_attacks import decision
from trustcase.tasks.segmentation_metrics import SegmentationTally, image_decisions

# three 2x3 predictions: 2 defect pixels (classes 1 and 2), none, 1 defect pixel
PRED = np.array([[[0, 1, 0], [2, 0, 0]], [[0, 0, 0], [0, 0, 0]], [[0, 0, 0], [0, 0, 2]]])


def test_defective_from_the_given_number_of_defect_pixels_on_numpy_and_torch_alike():
    for rule, want in ((1, [True, False, True]), (2, [True, False, False]), (3, [False, False, False])):
        assert image_decisions(PRED, rule).tolist() == want
        assert image_decisions(torch.from_numpy(PRED), rule).tolist() == want
    assert image_decisions(PRED[:0], 1).tolist() == []  # an empty batch decides nothing


def test_the_tally_and_the_attacks_decide_by_that_rule():
    tally = SegmentationTally(["good", "crack", "blob"], 2, "performance", 0)
    masks = [np.zeros((2, 3), np.int64)] * 3
    assert tally.update(PRED, masks, ["a", "b", "c"]).tolist() == [1, 0, 0]
    assert tally.predicted == [True, False, False]
    logits = torch.nn.functional.one_hot(torch.from_numpy(PRED), 3).permute(0, 3, 1, 2).float()  # arg max = PRED
    assert decision(logits, 2).tolist() == [1, 0, 0] and decision(logits, 1).tolist() == [1, 0, 1]
