"""Weight memory in bits, and a bit allocation that spends a budget where it hurts least.

Memory: sum over the weight sites of (number of weights x bits); the mean weight bits is that sum
over the number of weights (so a large table at 3 bits counts for more than a small matrix).

Allocation (greedy, on a sensitivity table from scripts/sensitivity.py): every weight site starts
at its widest width — `base_bits`, or a wider one the table measured (raising a site: a negative
cost where it helps) — and while the mean is above the budget, the site whose next lower width
(measured, or base_bits) costs the least dev-loss increase per bit of memory saved is lowered,

    price(site, b -> b') = max(cost(site, b') - cost(site, b), 0) / (n_weights(site) (b - b')),

where cost(site, b) is the dev-loss change when that site alone is at b bits (0 at base_bits).
So the budget can buy a few sensitive matrices above base_bits with insensitive ones below it.
It assumes the costs of different sites add up, which the QAT of the allocation then checks.
"""

from __future__ import annotations

from collections.abc import Mapping


def weight_sizes(model) -> dict[str, int]:
    """Number of weights behind each weight site of a model (model.Transformer.weight_sites)."""
    return {site.site_name: int(w.shape.num_elements()) for site, w in model.weight_sites()}


def memory_bits(sizes: Mapping[str, int], bits: Mapping[str, int]) -> int:
    """Total weight memory in bits."""
    return sum(n * bits[name] for name, n in sizes.items())


def mean_bits(sizes: Mapping[str, int], bits: Mapping[str, int]) -> float:
    """Weight memory over the number of weights."""
    return memory_bits(sizes, bits) / sum(sizes.values())


def allocate(sizes: Mapping[str, int], cost: Mapping[tuple[str, int], float], base_bits: int,
             budget_mean_bits: float) -> dict[str, int]:
    """Bits per weight site with mean_bits <= budget_mean_bits (see the module docstring); `cost`
    maps (site, bits) to the measured dev-loss change (any width, above base_bits too).
    ValueError when even every site at its lowest width is over the budget."""
    widths = {name: {base_bits} for name in sizes}
    for site, w in cost:
        if site in widths:  # a table row of a site without weights (an activation) has no say
            widths[site].add(w)
    bits = {name: max(w) for name, w in widths.items()}
    while mean_bits(sizes, bits) > budget_mean_bits:
        offers = []
        for name, b in bits.items():
            lower = [w for w in widths[name] if w < b]
            if lower:
                w = max(lower)
                extra = max(cost.get((name, w), 0.0) - cost.get((name, b), 0.0), 0.0)
                offers.append((extra / (sizes[name] * (b - w)), name, w))
        if not offers:
            raise ValueError(f"a mean of {budget_mean_bits} weight bits is out of reach: every site at "
                             f"its lowest measured width gives {mean_bits(sizes, bits):.3f}")
        _, name, w = min(offers)
        bits[name] = w
    return bits


def override_flags(bits: Mapping[str, int], base_bits: int) -> list[str]:
    """The --quant_override flags that turn a --wbits base_bits model into `bits`."""
    return [f"--quant_override={name}={b}" for name, b in sorted(bits.items()) if b != base_bits]
