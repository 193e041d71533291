"""DICE influence: exact counterfactual replay (GT), first-order estimates (E), adjoint form.

Sign convention: influence = test loss with the data - without it; positive = harmful.
"""

from .common import Event, InfluenceResult, sample_events
from .estimate import estimate
from .ground_truth import ground_truth
from .wholerun import SampleScores, attribute_run, whole_run_ground_truth

__all__ = ["Event", "InfluenceResult", "SampleScores", "attribute_run", "estimate",
           "ground_truth", "sample_events", "whole_run_ground_truth"]
