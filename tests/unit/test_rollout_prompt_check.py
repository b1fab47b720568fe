"""The prompt pre-check every engine applies before sampling (engine.check_prompt_tokens)."""

from __future__ import annotations

import pytest

from aisrl.services.rollout.engine import PromptRejected, check_prompt_tokens


def test_a_prompt_that_fits_with_its_completion_passes():
    check_prompt_tokens([1, 5, 6], max_tokens=5, max_model_len=8, vocab_size=10)


@pytest.mark.parametrize(
    ("ids", "max_tokens", "fragment"),
    [
        ([], 4, "no tokens"),
        ([1, 10, 3], 4, "[10] are outside the model's vocabulary of 10"),
        ([1, -1], 4, "[-1] are outside"),
        ([1] * 9, 1, "has 9 tokens; with max_tokens=1 that exceeds the model's maximum length of 8"),
        ([1] * 5, 4, "has 5 tokens; with max_tokens=4"),  # fits alone, completions would be cut at the limit
    ],
)
def test_what_cannot_be_sampled_whole_is_refused_with_why(ids, max_tokens, fragment):
    with pytest.raises(PromptRejected) as info:
        check_prompt_tokens(ids, max_tokens=max_tokens, max_model_len=8, vocab_size=10)
    assert fragment in str(info.value)
    assert isinstance(info.value, ValueError)  # a job error for the worker (JOB_ERRORS)
