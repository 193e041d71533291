"""Attribution.top / most_harmful / most_helpful return what their names say (positive =
harmful), never helpful samples under a "harmful" name."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from dice_influence.influence.adjoint import Attribution


def _attr(scores: torch.Tensor) -> Attribution:
    R, n, B = scores.shape
    index = torch.arange(R * n * B).reshape(R, n, B)
    return Attribution(rounds=list(range(10, 10 + R)), scores=scores, index=index,
                       target="horizon", readout="factual", hops=None)


def test_all_helpful_node_has_no_harmful_samples():
    A = _attr(-torch.rand(3, 2, 4) - 0.1)  # every score negative: every sample helped
    assert A.most_harmful(0, 5) == [] and A.top(0, 5) == [] and A.top(node=0, k=5) == []
    helpful = A.most_helpful(0, 5)
    assert len(helpful) == 5 and all(h["score"] < 0 and h["direction"] == "helpful"
                                     for h in helpful)
    assert A.top(0, 5, harmful=False) == helpful


def test_records_point_at_the_right_sample():
    s = torch.zeros(2, 2, 3)
    s[1, 1, 2] = 0.5
    s[0, 1, 0] = -0.25
    A = _attr(s)
    (h,) = A.most_harmful(1, 10)
    assert (h["round"], h["node"], h["batch_position"], h["score"]) == (11, 1, 2, 0.5)
    assert h["dataset_index"] == int(A.index[1, 1, 2])
    (g,) = A.most_helpful(1, 10)
    assert (g["round"], g["batch_position"], g["score"]) == (10, 0, -0.25)
    assert A.most_harmful(0, 3) == [] == A.most_helpful(0, 3)  # zeros are neither


@settings(max_examples=50, deadline=None)
@given(st.lists(st.floats(-1, 1, allow_nan=False), min_size=6, max_size=6),
       st.integers(1, 8))
def test_sign_and_order(vals, k):
    A = _attr(torch.tensor(vals, dtype=torch.float64).reshape(2, 1, 3))
    harm, help_ = A.most_harmful(0, k), A.most_helpful(0, k)
    assert [h["score"] for h in harm] == sorted([v for v in vals if v > 0], reverse=True)[:k]
    assert [h["score"] for h in help_] == sorted([v for v in vals if v < 0])[:k]
    assert A.top(0, k) == harm and A.top(0, k, harmful=False) == help_
