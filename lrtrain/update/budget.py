"""A parameter budget across a param group's layers: the importance rule's directions, allocated jointly.

With ``budget`` b, the layers updated together (one param group's basis updates of a step) keep at most

    Σ_ℓ k_ℓ (m_ℓ + n_ℓ) + k_ℓ²  ≤  b · Σ_ℓ m_ℓ n_ℓ − (the active parameters of the group's other layers)

parameters (k_ℓ the new rank of an m_ℓ × n_ℓ layer). Each layer offers the directions the importance rule would keep
(:func:`lrtrain.update.importance.ranked_directions`), ordered by importance score s, and keeps at least min_rank.
The rest are admitted greedily across layers, always to the layer whose left-out importance is the largest share
of its own, t_ℓ(k) = ‖s_{ℓ, >k}‖ / ‖s_ℓ‖, while they fit (a layer's k-th direction costs m + n + 2k − 1): the
layers end with about equal relative tails, a global tolerance that the budget sets (AdaLoRA allocates a global
budget by importance too, Zhang et al. 2023; raw scores per parameter measured worse here, see README).
The budget holds from the first step on (a start above it is cut at once); min_rank wins over the budget.
"""
from __future__ import annotations

import heapq

import torch

from .importance import limited, ranked_directions
from .spec import LayerResult, LayerStep, core_svd, failed_update, finish_update

__all__ = ["allocate", "budget_update_layers", "layer_parameters"]


def layer_parameters(m: int, n: int, k: int) -> int:
    """Active parameters of an m×n factorized layer at rank k: k(m + n) + k²."""
    return k * (m + n) + k * k


def allocate(offers: list, sizes: list, floors: list, total: int) -> list:
    """Ranks k_ℓ (≤ len(offer)) with Σ layer_parameters ≤ total where the floors allow, equalizing the relative
    tails t_ℓ(k_ℓ) greedily (see the module docstring).

    offers: per layer the scores of its offered directions, descending (lists of floats); sizes: (m, n) per
    layer; floors: the rank each layer keeps whatever the budget."""
    ks = [min(f, len(o)) for f, o in zip(floors, offers)]
    used = sum(layer_parameters(m, n, k) for (m, n), k in zip(sizes, ks))
    tails = []  # tails[i][k]: the relative 2-norm of layer i's scores left out at rank k
    for o in offers:
        sq = [s * s for s in o]
        tot = sum(sq) or 1.0
        acc, t = 0.0, []
        for v in reversed(sq):
            acc += v
            t.append((acc / tot) ** 0.5)
        tails.append(t[::-1] + [0.0])
    heap = [(-tails[i][k], i) for i, (o, k) in enumerate(zip(offers, ks)) if k < len(o)]
    heapq.heapify(heap)
    while heap:
        _, i = heapq.heappop(heap)
        (m, n), k = sizes[i], ks[i]
        cost = layer_parameters(m, n, k + 1) - layer_parameters(m, n, k)
        if used + cost > total:
            continue  # this layer's next direction does not fit; a smaller layer's may
        ks[i], used = k + 1, used + cost
        if ks[i] < len(offers[i]):
            heapq.heappush(heap, (-tails[i][ks[i]], i))
    return ks


def budget_update_layers(items: list[LayerStep], lr: float, tau: float, min_rank: int, total: int) -> list[LayerResult]:
    """The reference updates of ``items`` (all with ``importance`` set) within ``total`` active parameters."""
    cores, offers, ranked, sizes, floors = [], [], [], [], []
    results: list = [None] * len(items)
    for i, item in enumerate(items):
        m, n = item.U.shape[0], item.V.shape[0]
        try:
            core = core_svd(item, lr)
        except torch.linalg.LinAlgError:
            results[i] = failed_update(item)
            total -= layer_parameters(m, n, item.U.shape[1])  # a skipped layer keeps its rank
            continue
        sigma = core[3]
        order, score = ranked_directions(sigma, core[2], core[4], item.importance, tau, item.spare)
        order = limited(order, sigma.shape[0], 0, item.max_rank)
        order = order[torch.argsort(score[order], descending=True, stable=True)]  # offered by score
        cores.append((i, core))
        ranked.append(order)
        offers.append(score[order].tolist())
        sizes.append((m, n))
        floors.append(min(min_rank, int(item.max_rank), sigma.shape[0]))
    ks = allocate(offers, sizes, floors, total)
    for (i, core), order, k in zip(cores, ranked, ks):
        item = items[i]
        keep = limited(order[:k], core[3].shape[0], min_rank, item.max_rank)
        results[i] = finish_update(item, core, keep)
    return results
