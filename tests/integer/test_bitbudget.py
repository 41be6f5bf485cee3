import itertools

import pytest

from integer import bitbudget

SIZES = {"a": 1000, "b": 100, "c": 10}


def test_memory_and_mean_bits_weigh_each_site_by_its_weights():
    bits = {"a": 4, "b": 8, "c": 2}
    assert bitbudget.memory_bits(SIZES, bits) == 4000 + 800 + 20
    assert bitbudget.mean_bits(SIZES, bits) == pytest.approx(4820 / 1110)


def test_allocation_meets_the_budget_and_lowers_the_cheapest_bits_first():
    # a is cheap to lower, b is expensive: the budget is met by lowering a before b
    cost = {("a", 4): 0.01, ("a", 3): 0.02, ("a", 2): 5.0,
            ("b", 4): 1.0, ("b", 3): 2.0, ("b", 2): 3.0, ("c", 4): 0.0, ("c", 3): 0.0, ("c", 2): 0.0}
    for budget in (7.0, 5.0, 4.0, 3.5, 3.0, 2.5):
        bits = bitbudget.allocate(SIZES, cost, 8, budget)
        assert bitbudget.mean_bits(SIZES, bits) <= budget
        assert set(bits.values()) <= {8, 4, 3, 2}
    bits = bitbudget.allocate(SIZES, cost, 8, 3.5)
    assert bits["a"] == 3 and bits["b"] == 8  # 3000 + 800 + 20 bits: 3.44 on average


def test_allocation_is_near_the_exhaustive_optimum_on_additive_costs():
    by_site = {"a": [0.3, 0.1, 0.05], "b": [2.0, 0.5, 0.2], "c": [0.4, 0.3, 0.1]}  # at 2, 3, 4 bits
    cost = {(s, b): c for s, row in by_site.items() for b, c in zip((2, 3, 4), row)}
    budget = 4.0
    greedy = bitbudget.allocate(SIZES, cost, 8, budget)
    total = sum(cost.get((s, b), 0.0) for s, b in greedy.items())
    feasible = [dict(zip(SIZES, choice)) for choice in itertools.product((2, 3, 4, 8), repeat=3)]
    feasible = [b for b in feasible if bitbudget.mean_bits(SIZES, b) <= budget]
    best = min(sum(cost.get((s, b), 0.0) for s, b in choice.items()) for choice in feasible)
    assert total <= best + 0.1  # greedy by price is near the exhaustive optimum here


def test_an_unreachable_budget_is_one_clear_error():
    with pytest.raises(ValueError, match="out of reach"):
        bitbudget.allocate(SIZES, {("a", 4): 0.0}, 8, 4.0)


def test_override_flags_name_only_the_lowered_sites():
    assert bitbudget.override_flags({"x/w": 8, "y/w": 3, "a/w": 2}, 8) == [
        "--quant_override=a/w=2", "--quant_override=y/w=3"]


def test_allocation_can_raise_a_sensitive_site_and_pay_with_insensitive_bits():
    # base 4: raising b to 8 helps a lot (a negative cost), a loses little at 3: within a 4-bit
    # mean the budget buys b's 8 bits with a's 3 (4000 bits saved on a, 400 spent on b)
    cost = {("a", 3): 0.01, ("a", 8): -0.001, ("b", 8): -0.5, ("b", 3): 1.0, ("c", 3): 0.0, ("c", 8): 0.0}
    bits = bitbudget.allocate(SIZES, cost, 4, 4.0)
    assert bits == {"a": 3, "b": 8, "c": 3}
    assert bitbudget.mean_bits(SIZES, bits) <= 4.0
    # without the wider rows the same table allocates at or below the base only
    narrow = {k: v for k, v in cost.items() if k[1] < 4}
    assert max(bitbudget.allocate(SIZES, narrow, 4, 4.0).values()) == 4
