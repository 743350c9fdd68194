"""Every registered merge (shared properties) and each merge against a hand computation."""

from __future__ import annotations

import pytest
import torch

from lightning_mtl.merging import TIES, TaskVector, create_merge, get_merge_class, kth_smallest_magnitude, list_merges
from tests.merging.official_ties import official_ties

# arguments under which each merge of a single task vector is that vector (TIES keeps every entry at k = 100 %)
IDENTITY_ARGS = {"ties": {"k": 100}}


def _vectors(num: int, seed: int = 0, shapes=((4, 3), (5,), ())) -> list[TaskVector]:
    generator = torch.Generator().manual_seed(seed)
    return [
        TaskVector({f"t{i}": torch.randn(shape, generator=generator) for i, shape in enumerate(shapes)})
        for _ in range(num)
    ]


def test_the_registry_lists_the_training_free_merges_and_rejects_unknown_names():
    assert {"task_arithmetic", "ties", "averaging"} <= set(list_merges())
    assert get_merge_class("TA") is get_merge_class("task_arithmetic")
    with pytest.raises(ValueError, match="unknown merge 'tie'; did you mean ties"):
        create_merge("tie")


@pytest.mark.parametrize("name", list_merges())
def test_one_vector_at_coef_one_reproduces_the_expert(name):
    base = {"a": torch.randn(4, 3), "b": torch.randn(5), "n": torch.tensor(7)}
    expert = {"a": base["a"] + torch.randn(4, 3), "b": base["b"] - 1.5, "n": torch.tensor(9)}
    tau = TaskVector.from_state_dicts(base, expert, dtype=torch.float64)
    merged = create_merge(name, **IDENTITY_ARGS.get(name, {}))([tau])
    out = merged.apply_to(base, 1.0)
    bound = 2 * torch.finfo(torch.float32).eps  # the merge works in float32: one rounding of tau
    for key in ("a", "b"):
        assert torch.allclose(out[key], expert[key], rtol=bound, atol=0), (name, key)
    assert out["n"] is base["n"]
    assert torch.equal(merged.apply_to(base, 0.0)["a"], base["a"])


@pytest.mark.parametrize("name", list_merges())
def test_merges_are_odd_and_refuse_mismatched_vectors(name):
    vectors = _vectors(3)
    merge = create_merge(name)
    plus, minus = merge(vectors), merge([-v for v in vectors])
    for key in plus:
        assert torch.equal(minus[key], -plus[key]), (name, key)
    broken = TaskVector({**dict(vectors[1]), "t0": torch.zeros(3, 4)})
    with pytest.raises(ValueError, match=r"'t0' has shape \(4, 3\) in task vector 0 and \(3, 4\) in task vector 1"):
        merge([vectors[0], broken])
    with pytest.raises(KeyError, match="'t1' is in task vector 0 but not in task vector 1"):
        merge([vectors[0], TaskVector({"t0": vectors[1]["t0"], "t2": vectors[1]["t2"]})])
    with pytest.raises(ValueError, match="at least one task vector"):
        merge([])


def test_task_arithmetic_sums_and_averaging_means():
    vectors = _vectors(3)
    summed, mean = create_merge("task_arithmetic")(vectors), create_merge("averaging")(vectors)
    for key in summed:
        expected = vectors[0][key] + vectors[1][key] + vectors[2][key]
        assert torch.allclose(summed[key], expected, atol=1e-6)
        assert torch.allclose(mean[key], expected / 3, atol=1e-6)
    # averaging at coef 1 is the uniform soup of the experts
    base = {key: torch.randn(v.shape) for key, v in vectors[0].items()}
    soup = mean.apply_to(base, 1.0)
    for key in base:
        experts = [vector.apply_to(base, 1.0)[key] for vector in vectors]
        assert torch.allclose(soup[key], sum(experts) / 3, atol=1e-5)


def test_ties_keeping_everything_without_sign_conflicts_is_the_mean():
    vectors = _vectors(4)
    signs = {key: torch.sign(value) for key, value in vectors[0].items()}
    agreeing = [TaskVector({k: v.abs() * signs[k] for k, v in vector.items()}) for vector in vectors]
    merged = TIES(k=100)(agreeing)
    for key in merged:
        mean = sum(vector[key] for vector in agreeing) / 4
        assert torch.allclose(merged[key], mean, atol=1e-6)


def _hand_vectors() -> list[TaskVector]:
    rows = [
        ([3.0, -1.0, 2.0, 2.0, 0.5], [-4.0]),  # two entries tie at the threshold 2: both kept
        ([-1.0, 5.0, -2.0, 1.0, 0.5], [4.0]),  # two entries tie at the threshold 1: both kept
        ([2.0, 1.0, 0.1, -3.0, 0.2], [0.25]),
    ]
    return [TaskVector({"w": torch.tensor(w), "b": torch.tensor(b)}) for w, b in rows]


# k = 60 % of P = 6 entries: the threshold is the (6 - int(3.6)) = 3rd smallest magnitude of each task vector.
#   trimmed tau_1 = w [3, 0, 2, 2, 0]   b [-4]    (threshold 2)
#   trimmed tau_2 = w [-1, 5, -2, 1, 0] b [4]     (threshold 1)
#   trimmed tau_3 = w [2, 1, 0, -3, 0]  b [0.25]  (threshold 0.25)
#   sums          = w [4, 6, 0, 0, 0]   b [0.25] -> signs [+, +, 0, 0, 0 | +]; w[2], w[3] sum to exactly zero
#   and take the majority of the elected signs (+); w[4] has no entry left.
HAND_MODEL = {
    "mean": {"w": [2.5, 3.0, 2.0, 1.5, 0.0], "b": [2.125]},
    "sum": {"w": [5.0, 6.0, 2.0, 3.0, 0.0], "b": [4.25]},
    "max": {"w": [3.0, 5.0, 2.0, 2.0, 0.0], "b": [4.0]},
}
# scope "tensor": per tensor, w's threshold is the (5 - int(3)) = 2nd smallest (1, 1, 0.2), b's its own entry;
# now tau_1's -1 and tau_3's 0.2 survive: w[1] stays (5 + 1) / 2 (the -1 disagrees), w[4] becomes 0.2.
HAND_TENSOR = {"w": [2.5, 3.0, 2.0, 1.5, 0.2], "b": [2.125]}


@pytest.mark.parametrize("merge_func", ["mean", "sum", "max"])
def test_ties_on_hand_made_vectors_equals_the_hand_computation(merge_func):
    merged = TIES(k=60, merge_func=merge_func)(_hand_vectors())
    for key, expected in HAND_MODEL[merge_func].items():
        assert torch.allclose(merged[key], torch.tensor(expected), atol=1e-7), (key, merged[key])
    # the negated vectors elect the negative majority for the zero sums: the exact mirror image
    mirrored = TIES(k=60, merge_func=merge_func)([-v for v in _hand_vectors()])
    for key, expected in HAND_MODEL[merge_func].items():
        assert torch.allclose(mirrored[key], -torch.tensor(expected), atol=1e-7), key


def test_ties_tensor_scope_counts_the_top_k_per_tensor():
    merged = TIES(k=60, scope="tensor")(_hand_vectors())
    for key, expected in HAND_TENSOR.items():
        assert torch.allclose(merged[key], torch.tensor(expected), atol=1e-7), (key, merged[key])


def test_ties_zero_sum_with_zero_majority_keeps_the_official_negative_selection():
    # signs [+, -, 0] sum to 0: the official code leaves sign 0, and its selection then keeps the negatives
    vectors = [TaskVector({"w": torch.tensor([1.0, -1.0, 1.0])}), TaskVector({"w": torch.tensor([1.0, -1.0, -1.0])})]
    merged = TIES(k=100)(vectors)
    assert torch.equal(merged["w"], torch.tensor([1.0, -1.0, -1.0]))
    reference, _ = official_ties(vectors, k=100)
    assert torch.equal(merged["w"], reference["w"])


@pytest.mark.parametrize("k", [5, 20, 50, 99, 100])
@pytest.mark.parametrize("merge_func", ["mean", "sum", "max"])
def test_ties_model_scope_equals_the_official_matrix_algorithm(k, merge_func):
    generator = torch.Generator().manual_seed(k)
    shapes = {"conv": (8, 3, 3, 3), "bias": (8,), "fc": (10, 32), "scale": ()}
    # quarter-integers from a small range: many exact duplicates (ties at the threshold) and exact zero sums,
    # and every sum is exact in float32, so the two must agree bit for bit
    discrete = [
        TaskVector({key: torch.randint(-6, 7, shape, generator=generator).float() / 4 for key, shape in shapes.items()})
        for _ in range(5)
    ]
    merged, (reference, thresholds) = TIES(k=k, merge_func=merge_func)(discrete), official_ties(discrete, k, merge_func)
    for key in shapes:
        assert torch.equal(merged[key], reference[key]), key
    if thresholds is not None:
        ours = [t["conv"] for t in TIES(k=k).thresholds(discrete)]
        assert torch.equal(torch.stack(ours), thresholds.squeeze(1))
    continuous = _vectors(6, seed=k, shapes=tuple(shapes.values()))
    merged, (reference, _) = TIES(k=k, merge_func=merge_func)(continuous), official_ties(continuous, k, merge_func)
    for key in merged:
        assert torch.allclose(merged[key], reference[key], atol=1e-6), key


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_kth_smallest_magnitude_equals_kthvalue_of_the_concatenation(dtype):
    generator = torch.Generator().manual_seed(0)
    tensors = [torch.randn(shape, generator=generator).to(dtype) for shape in [(50, 7), (3,), (), (200,)]]
    tensors[1] = torch.tensor([-0.0, 0.0, 1.5], dtype=dtype)  # signed zeros and a duplicate magnitude
    tensors[3][:40] = -tensors[0].reshape(-1)[:40]
    flat = torch.cat([t.reshape(-1) for t in tensors]).abs()
    for k in [1, 2, 3, 100, 299, flat.numel()]:
        assert kth_smallest_magnitude(tensors, k).item() == flat.kthvalue(k).values.item(), k
    with pytest.raises(ValueError, match=r"k must lie in \[1, 554\]"):
        kth_smallest_magnitude(tensors, 0)


def test_ties_argument_errors():
    with pytest.raises(ValueError, match=r"percentage of entries kept and must lie in \(0, 100\], got 0"):
        TIES(k=0)
    with pytest.raises(ValueError, match="scope must be 'model' or 'tensor', got 'layer'"):
        TIES(scope="layer")  # type: ignore[arg-type]
