import torch
from hypothesis import given, settings

from tests.lif_cases import check_case, lif_cases


@given(lif_cases(linear=False, backward="exact"))
def test_lif_exact_backward_matches_reference_float64(case):
    check_case(case)


@given(lif_cases(linear=False, backward="sparse"))
def test_lif_sparse_backward_matches_windowed_reference_float64(case):
    check_case(case)


@settings(max_examples=settings.default.max_examples // 2)
@given(lif_cases(linear=False, dtype=torch.float32))
def test_lif_float32_matches_float64_reference(case):
    check_case(case)
