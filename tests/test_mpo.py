"""The MPO math on random shapes, checked against independent computations."""

from __future__ import annotations

import math
import random

import numpy as np
import pytest
import torch
from conftest import raises_exactly, reference_contract

from lora_over_trl.lora_over import mpo

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


def test_truncate_works_in_float64_and_returns_the_input_dtype():
    """Random float32 cores with bonds above the exact ones, truncated to the exact ones: nothing is lost, and in
    float64 (the old and the new contraction alike) the error is ~1e-16, where float32 arithmetic would leave
    ~1e-7; the cores come back in float32."""
    gen = torch.Generator().manual_seed(5)
    for p, q, k, aux in random_cases(6, 5):
        exact = mpo.choose_layout(p, q, num_cores=k, aux_size=aux)
        bigger = mpo.MpoLayout(exact.rows, exact.cols, tuple(b + 3 for b in exact.bonds), exact.central)
        grown = [torch.randn(shape, generator=gen) for shape in bigger.core_shapes()]  # float32, full bonds
        back, error = mpo.truncate(grown, exact, std=0.5, generator=gen)  # the exact bonds lose nothing
        assert all(c.dtype == torch.float32 for c in back)
        assert error < 1e-12


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


def test_the_default_auxiliary_size_is_16():
    # 17 x 64: with 16 the auxiliary core takes 1 x 16 columns; with 17 it would take the prime 17 rows
    assert mpo.choose_layout(17, 64) == mpo.MpoLayout((1, 17), (16, 4), (16,), 1)


def test_layout_checks_name_each_problem():
    assert mpo.MpoLayout((4,), (6,), (), 0).shape == (4, 6)  # one core: no bond, central 0
    cases = [
        (((2, 2), (3,), (4,), 0), "rows and cols need the same positive length, got (2, 2) and (3,)"),
        (((), (), (), 0), "rows and cols need the same positive length, got () and ()"),
        (((4,), (6,), (2,), 0), "1 cores need 0 bonds, got (2,)"),
        (((4,), (6,), (), 1), "`central` must index one of the 1 cores, got 1"),
        (((2, 2), (3, 3), (4,), 2), "`central` must index one of the 2 cores, got 2"),
        (((2, 2), (3, 3), (4,), -1), "`central` must index one of the 2 cores, got -1"),
        (
            ((2, 2), (3, 3), (), 5),
            "2 cores need 1 bonds, got (); `central` must index one of the 2 cores, got 5",  # every problem, joined
        ),
    ]
    for args, message in cases:
        raises_exactly("invalid MPO layout: " + message, mpo.MpoLayout, *args)


def test_fit_bonds_takes_a_budget_met_exactly():
    exact = mpo.choose_layout(16, 4096, num_cores=3)
    assert mpo.fit_bonds(exact, exact.aux_params()) == exact
    assert mpo.fit_bonds(exact, exact.aux_params() - 1) is None
    # a budget equal to what bonds of 1.5x the exact ones cost is met exactly (not one step below)
    middle = mpo.MpoLayout(exact.rows, exact.cols, tuple(math.ceil(1.5 * b) for b in exact.bonds), exact.central)
    fitted = mpo.fit_bonds(exact, middle.aux_params())
    assert fitted.aux_params() == middle.aux_params() and fitted.bonds == middle.bonds


def tt_svd_error(matrix: np.ndarray, layout: mpo.MpoLayout) -> float:
    """Relative error of the TT-SVD of ``matrix`` to ``layout.bonds`` (sequential truncated SVDs of the full
    tensor's unfoldings, Oseledets 2011), computed from the dense matrix alone."""
    rows, cols, k = layout.rows, layout.cols, layout.num_cores
    tensor = matrix.reshape(*rows, *cols).transpose([i for j in range(k) for i in (j, k + j)])
    approx, rest, left = [], tensor.reshape(1, -1), 1
    for j in range(k - 1):
        u, s, vh = np.linalg.svd(rest.reshape(left * rows[j] * cols[j], -1), full_matrices=False)
        keep = min(layout.bonds[j], s.size)
        approx.append(u[:, :keep])
        rest, left = s[:keep, None] * vh[:keep], keep
    result = approx[0]
    for factor in approx[1:]:
        result = (result @ factor.reshape(result.shape[1], -1)).reshape(-1, factor.shape[1])
    result = (result @ rest).reshape(tensor.shape)
    inverse = np.argsort([i for j in range(k) for i in (j, k + j)])
    dense = result.transpose(inverse).reshape(matrix.shape)
    return float(np.linalg.norm(dense - matrix) / np.linalg.norm(matrix))


def test_truncate_of_three_cores_is_the_tt_svd_of_the_matrix():
    """TT-rounding (orthogonalize right to left, then truncated SVDs) of an exact MPO gives what TT-SVD gives on
    the dense matrix: the same error to 1e-9, for every smaller pair of bonds."""
    gen = torch.Generator().manual_seed(13)
    exact = mpo.choose_layout(16, 96, num_cores=3, aux_size=16)
    matrix = torch.randn(16, 96, generator=gen, dtype=torch.float64)
    cores = mpo.decompose(matrix, exact, std=0.1, generator=gen)
    for bonds in [(b1, b2) for b1 in range(1, exact.bonds[0]) for b2 in (1, exact.bonds[1] // 2, exact.bonds[1])]:
        small = mpo.MpoLayout(exact.rows, exact.cols, bonds, exact.central)
        new, error = mpo.truncate(cores, small, std=0.1, generator=gen)
        expected = tt_svd_error(matrix.numpy(), small)
        measured = np.linalg.norm(reference_contract(new) - matrix.numpy()) / np.linalg.norm(matrix.numpy())
        assert error == pytest.approx(expected, rel=1e-9, abs=1e-12), bonds
        assert measured == pytest.approx(error, rel=1e-9, abs=1e-12)


def test_truncate_error_is_relative_and_absolute_for_zero():
    gen = torch.Generator().manual_seed(17)
    exact = mpo.choose_layout(8, 32)
    small = mpo.MpoLayout(exact.rows, exact.cols, (1,), exact.central)
    matrix = torch.randn(8, 32, generator=gen, dtype=torch.float64)
    errors = [mpo.truncate(mpo.decompose(m, exact, std=0.1), small, std=0.1)[1] for m in (matrix, 1e-3 * matrix)]
    assert errors[0] == pytest.approx(errors[1], rel=1e-9) and errors[0] > 0.1  # relative: the scale cancels
    zero = mpo.decompose(torch.zeros(8, 32, dtype=torch.float64), exact, std=0.1)
    assert mpo.truncate(zero, small, std=0.1)[1] == 0.0  # nothing to lose: absolute, not 0 / 0


def test_truncate_to_larger_bonds_pads_like_grow():
    """Bonds above what the unfolding needs are padded as ``grow`` pads: seeded by the generator, scaled by
    ``std``, and the function is unchanged."""
    exact = mpo.choose_layout(8, 32)
    matrix = torch.randn(8, 32, generator=torch.Generator().manual_seed(19), dtype=torch.float64)
    cores = mpo.decompose(matrix, exact, std=0.1)
    bigger = mpo.MpoLayout(exact.rows, exact.cols, (exact.bonds[0] + 4,), exact.central)

    def padded(seed: int, std: float) -> list[torch.Tensor]:
        new, error = mpo.truncate(cores, bigger, std=std, generator=torch.Generator().manual_seed(seed))
        assert error < 1e-12 and [tuple(c.shape) for c in new] == bigger.core_shapes()
        return new

    first, again, other, wider = padded(1, 0.5), padded(1, 0.5), padded(2, 0.5), padded(1, 1.0)
    assert all(torch.equal(a, b) for a, b in zip(first, again, strict=True))
    assert not all(torch.equal(a, b) for a, b in zip(first, other, strict=True))
    # the new slots sit in the central core's leading bond (the outer core's side is zero): N(0, std^2) draws
    kept = exact.bonds[0]
    assert first[0][..., kept:].abs().max() == 0 and first[1][kept:].abs().min() > 0
    assert torch.equal(wider[1][kept:], 2 * first[1][kept:]) and torch.equal(wider[1][:kept], first[1][:kept])


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


PINNED_LAYOUTS = {  # (p, q, num_cores, aux_size): the layout choose_layout's rule gives, worked out by hand
    (16, 4096, 2, 16): ((4, 4), (4, 1024), (16,), 1),
    (4096, 16, 2, 16): ((4, 1024), (4, 4), (16,), 1),
    (16, 11008, 3, 16): ((4, 1, 4), (4, 688, 4), (16, 16), 1),
    (11008, 16, 4, 16): ((2, 2, 688, 4), (2, 2, 1, 4), (4, 16, 16), 2),
    (16, 49157, 3, 16): ((16, 1, 1), (1, 49157, 1), (16, 1), 1),
    (8, 576, 4, 4): ((1, 1, 4, 2), (2, 2, 72, 2), (2, 4, 4), 2),
    (64, 1536, 3, 64): ((4, 2, 8), (8, 32, 6), (32, 48), 1),
    (7, 7, 2, 16): ((1, 7), (7, 1), (7,), 1),
    # two cores on the left share 8: the outer one (filled first) gets sqrt(8) -> 2, the inner one what is left, 4
    (16, 4096, 4, 8): ((1, 2, 4, 2), (2, 2, 256, 4), (2, 8, 8), 2),
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
