"""The kept teacher distributions of causal-LM distillation: what rounding to float16 costs, and the cache."""

import torch

from unilora.training.distill import kl_per_row
from unilora.training.teacher_outputs import TeacherCache, stored


def test_stored_log_probabilities_give_the_kl_and_its_gradient():
    generator = torch.Generator().manual_seed(0)
    teacher = torch.randn(16, 3000, generator=generator) * 4  # logits of an LM's spread
    student = (torch.randn(16, 3000, generator=generator) * 4).requires_grad_(True)
    for temperature in (1.0, 2.0):
        kept = stored(teacher, temperature)
        assert kept.dtype == torch.float16
        value = kl_per_row(student / temperature, kept.float())
        (grad,) = torch.autograd.grad(value, student)
        exact = kl_per_row(student / temperature, teacher / temperature)
        (expected,) = torch.autograd.grad(exact, student)
        torch.testing.assert_close(value, exact, rtol=2e-3, atol=1e-4)
        torch.testing.assert_close(grad, expected, rtol=1e-2, atol=1e-6)
        assert float(kl_per_row(teacher / temperature, kept.float())) < 1e-5  # the teacher against itself


def test_the_cache_keeps_entries_up_to_its_budget():
    first, second = stored(torch.randn(1, 5)), stored(torch.randn(2, 5))
    cache = TeacherCache(budget=first.nbytes + 1)
    assert cache.add(0, first) and not cache.add(1, second)  # does not fit: not kept
    assert cache.missing([0, 1, 2]) == [1, 2] and cache.get(0) is first and cache.used == first.nbytes
