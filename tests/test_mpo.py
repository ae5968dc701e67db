"""The MPO math on random shapes, checked against independent computations."""

from __future__ import annotations

import math
import random

import numpy as np
import pytest
import torch
from conftest import reference_contract

from lora_over_trl import mpo

REAL_DIMS = [4096, 11008, 14336, 576, 1536, 49152, 49157, 1, 7, 1000]
RANKS = [1, 8, 16, 64]


def real_shapes():
    """LoRA factor shapes of real models: A is r x n, B is m x r."""
    for n in REAL_DIMS:
        for r in RANKS:
            yield (r, n)
            yield (n, r)


@pytest.mark.parametrize("num_cores", [2, 3, 4])
def test_layout_covers_real_shapes(num_cores):
    for p, q in real_shapes():
        layout = mpo.choose_layout(p, q, num_cores=num_cores)
        assert layout.shape == (p, q)
        sizes = [a * b for a, b in zip(layout.rows, layout.cols, strict=True)]
        assert sizes[layout.central] == max(sizes), (p, q, layout)
        # the exact layout costs at most a few percent over the plain matrix for shapes of real size
        if p * q >= 8 * 4096:
            assert layout.aux_params() <= 0.02 * p * q, (p, q, layout)


def random_cases(count: int, seed: int):
    rng = random.Random(seed)
    for _ in range(count):
        p, q = rng.choice([1, 2, 3, 6, 8, 12, 13, 16]), rng.choice([1, 5, 16, 24, 64, 97, 128])
        yield p, q, rng.choice([2, 3, 4]), rng.choice([1, 2, 4, 16])


@pytest.mark.parametrize("seed", range(3))
def test_contract_matches_kronecker_reference(seed):
    gen = torch.Generator().manual_seed(seed)
    for p, q, k, aux in random_cases(8, seed):
        base = mpo.choose_layout(p, q, num_cores=k, aux_size=aux)
        bonds = tuple(b + int(torch.randint(0, 3, (), generator=gen)) for b in base.bonds)
        layout = mpo.MpoLayout(base.rows, base.cols, bonds, base.central)
        cores = [torch.randn(s, generator=gen, dtype=torch.float64) for s in layout.core_shapes()]
        np.testing.assert_allclose(mpo.contract(cores).numpy(), reference_contract(cores), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("seed", range(3))
def test_decompose_round_trip_is_bitwise(seed):
    gen = torch.Generator().manual_seed(100 + seed)
    for p, q, k, aux in random_cases(10, seed):
        layout = mpo.fit_bonds(mpo.choose_layout(p, q, num_cores=k, aux_size=aux), 3 * p * q + 400)
        for matrix in (torch.randn(p, q, generator=gen), torch.zeros(p, q)):
            cores = mpo.decompose(matrix, layout, std=0.3, generator=gen)
            assert [tuple(c.shape) for c in cores] == layout.core_shapes()
            assert torch.equal(mpo.contract(cores), matrix)


def test_grow_keeps_the_function_and_truncate_undoes_it():
    gen = torch.Generator().manual_seed(7)
    for p, q, k, aux in random_cases(12, 7):
        exact = mpo.choose_layout(p, q, num_cores=k, aux_size=aux)
        matrix = torch.randn(p, q, generator=gen, dtype=torch.float64)
        cores = mpo.decompose(matrix, exact, std=0.5, generator=gen)
        bigger = mpo.MpoLayout(exact.rows, exact.cols, tuple(b + 3 for b in exact.bonds), exact.central)
        grown = mpo.grow(cores, bigger, std=0.5, generator=gen)
        assert torch.equal(mpo.contract(grown), matrix)
        back, error = mpo.truncate(grown, exact, std=0.5, generator=gen)
        assert [tuple(c.shape) for c in back] == exact.core_shapes()
        independent = np.linalg.norm(reference_contract(back) - matrix.numpy()) / np.linalg.norm(matrix.numpy())
        assert error < 1e-12 and independent < 1e-12


def unfolding(matrix: torch.Tensor, layout: mpo.MpoLayout) -> np.ndarray:
    """The (p_1 q_1) x (p_2 q_2) unfolding of a two-core layout, built from the matrix alone."""
    (p1, p2), (q1, q2) = layout.rows, layout.cols
    return matrix.reshape(p1, p2, q1, q2).permute(0, 2, 1, 3).reshape(p1 * q1, p2 * q2).numpy()


def test_two_core_truncation_error_is_eckart_young():
    gen = torch.Generator().manual_seed(11)
    for p, q in [(16, 64), (64, 16), (8, 128), (12, 97)]:
        exact = mpo.choose_layout(p, q, num_cores=2, aux_size=16)
        matrix = torch.randn(p, q, generator=gen, dtype=torch.float64)
        cores = mpo.decompose(matrix, exact, std=0.1, generator=gen)
        sigma = np.linalg.svd(unfolding(matrix, exact), compute_uv=False)
        for keep in range(1, exact.bonds[0]):
            small = mpo.MpoLayout(exact.rows, exact.cols, (keep,), exact.central)
            new, error = mpo.truncate(cores, small, std=0.1, generator=gen)
            optimal = math.sqrt((sigma[keep:] ** 2).sum()) / np.linalg.norm(matrix.numpy())
            measured = np.linalg.norm(reference_contract(new) - matrix.numpy()) / np.linalg.norm(matrix.numpy())
            assert error == pytest.approx(optimal, rel=1e-9, abs=1e-12)
            assert measured == pytest.approx(error, rel=1e-9, abs=1e-12)


@pytest.mark.parametrize("num_cores", [2, 3])
@pytest.mark.parametrize("zero", [False, True], ids=["random-F", "zero-F"])
def test_every_core_receives_gradient_within_two_steps(num_cores, zero):
    gen = torch.Generator().manual_seed(3)
    p, q = 16, 96
    layout = mpo.fit_bonds(mpo.choose_layout(p, q, num_cores=num_cores, aux_size=8), p * q)
    matrix = torch.zeros(p, q) if zero else torch.randn(p, q, generator=gen) / 10
    cores = [c.requires_grad_() for c in mpo.decompose(matrix, layout, std=0.1, generator=gen)]
    target = torch.randn(p, q, generator=gen)
    seen = [False] * len(cores)
    for _ in range(2):
        loss = ((mpo.contract(cores) - target) ** 2).sum()
        grads = torch.autograd.grad(loss, cores)
        seen = [s or bool(g.abs().max() > 0) for s, g in zip(seen, grads, strict=True)]
        with torch.no_grad():
            for c, g in zip(cores, grads, strict=True):
                c -= 1e-2 * g
    assert all(seen)


def test_fit_bonds_respects_the_budget_and_is_maximal():
    for p, q in [(16, 4096), (4096, 16), (8, 11008), (16, 49157)]:
        exact = mpo.choose_layout(p, q)
        for ratio in (0.01, 0.25, 1.0, 3.0):
            budget = int(ratio * p * q)
            layout = mpo.fit_bonds(exact, budget)
            if exact.aux_params() > budget:
                assert layout is None
                continue
            assert layout.aux_params() <= budget
            one_more = mpo.MpoLayout(exact.rows, exact.cols, tuple(b + 1 for b in layout.bonds), exact.central)
            assert one_more.aux_params() > budget


def test_invalid_layouts_and_inputs_are_clear_errors():
    with pytest.raises(ValueError, match="2 cores need 1 bonds"):
        mpo.MpoLayout((2, 2), (3, 3), (), 1)
    with pytest.raises(ValueError, match="must be >= 1"):
        mpo.MpoLayout((2, 0), (3, 3), (4,), 1)
    layout = mpo.choose_layout(8, 32)
    with pytest.raises(ValueError, match="does not fit layout shape"):
        mpo.decompose(torch.ones(8, 31), layout, std=1.0)
    small = mpo.MpoLayout(layout.rows, layout.cols, (1,), layout.central)
    with pytest.raises(ValueError, match="below the exact bonds"):
        mpo.decompose(torch.ones(8, 32), small, std=1.0)


PINNED_LAYOUTS = {  # (p, q, num_cores, aux_size): the layout DESIGN.md's rule gives (the README's example first)
    (16, 4096, 2, 16): ((4, 4), (4, 1024), (16,), 1),
    (4096, 16, 2, 16): ((4, 1024), (4, 4), (16,), 1),
    (16, 11008, 3, 16): ((4, 1, 4), (4, 688, 4), (16, 16), 1),
    (11008, 16, 4, 16): ((2, 2, 688, 4), (2, 2, 1, 4), (4, 16, 16), 2),
    (16, 49157, 3, 16): ((16, 1, 1), (1, 49157, 1), (16, 1), 1),
    (8, 576, 4, 4): ((1, 1, 4, 2), (2, 2, 72, 2), (2, 4, 4), 2),
    (64, 1536, 3, 64): ((4, 2, 8), (8, 32, 6), (32, 48), 1),
    (7, 7, 2, 16): ((1, 7), (7, 1), (7,), 1),
}


@pytest.mark.parametrize("case", list(PINNED_LAYOUTS))
def test_layouts_are_the_specified_ones(case):
    """Pinned so that a change of the layout rule is deliberate: the central core sits at ``num_cores // 2``,
    auxiliary cores take the largest divisors within ``aux_size`` per side, bonds are the exact ones."""
    p, q, num_cores, aux_size = case
    assert mpo.choose_layout(p, q, num_cores=num_cores, aux_size=aux_size) == mpo.MpoLayout(*PINNED_LAYOUTS[case])


@pytest.mark.parametrize("bad", [(0, 8, 2, 16), (8, 0, 2, 16), (8, 8, 1, 16), (8, 8, 2, 0)])
def test_choose_layout_refuses_each_bad_argument(bad):
    p, q, num_cores, aux_size = bad
    with pytest.raises(ValueError, match=r"choose_layout needs p, q, aux_size >= 1 and num_cores >= 2, got "):
        mpo.choose_layout(p, q, num_cores=num_cores, aux_size=aux_size)


@pytest.mark.parametrize("num_cores", [2, 3, 4])
def test_grow_puts_the_random_half_toward_the_central_core_and_is_seeded(num_cores):
    """A new bond slot is zero in the core farther from the central one and N(0, std^2) in the nearer one, in the
    cores' dtype, drawn from the generator (the same seed gives the same cores, another seed others)."""
    exact = mpo.choose_layout(16, 96, num_cores=num_cores, aux_size=16)
    matrix = torch.randn(16, 96, generator=torch.Generator().manual_seed(1))
    cores = mpo.decompose(matrix, exact, std=0.5, generator=torch.Generator().manual_seed(2))
    bigger = mpo.MpoLayout(exact.rows, exact.cols, tuple(b + 8 for b in exact.bonds), exact.central)
    grown = mpo.grow(cores, bigger, std=3.0, generator=torch.Generator().manual_seed(3))
    for j, old in enumerate(exact.bonds):
        left, right = grown[j][..., old:], grown[j + 1][old:]  # the new slots, on each side of bond j
        near, far = (right, left) if j < exact.central else (left, right)
        assert far.abs().max() == 0
        assert near.dtype == matrix.dtype and 2.0 < near.double().std() < 4.0  # std 3, not the decomposition's
    again = mpo.grow(cores, bigger, std=3.0, generator=torch.Generator().manual_seed(3))
    other = mpo.grow(cores, bigger, std=3.0, generator=torch.Generator().manual_seed(4))
    assert all(torch.equal(a, b) for a, b in zip(grown, again, strict=True))
    assert not all(torch.equal(a, b) for a, b in zip(grown, other, strict=True))
    halves = mpo.grow([c.to(torch.bfloat16) for c in cores], bigger, std=3.0)  # padding in the cores' own dtype
    assert {c.dtype for c in halves} == {torch.bfloat16}
    if num_cores > 2:  # a bond left as it is does not stop the ones after it from growing
        bonds = (exact.bonds[0], *(b + 8 for b in exact.bonds[1:]))
        later = mpo.MpoLayout(exact.rows, exact.cols, bonds, exact.central)
        assert [c.shape for c in mpo.grow(cores, later, std=3.0)] == [torch.Size(s) for s in later.core_shapes()]
    with pytest.raises(ValueError, match=r"grow: bond 0 would shrink from \d+ to 1; use truncate\(\)"):
        mpo.grow(grown, mpo.MpoLayout(exact.rows, exact.cols, (1,) * len(exact.bonds), exact.central), std=1.0)
