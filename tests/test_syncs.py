"""stsc.syncs: the host syncs a step would make on a GPU, counted on the CPU (the roots stand for the device)."""

import torch

from stsc.syncs import count_syncs


def kinds(count):
    return [(s.kind, s.op) for s in count.syncs]


def test_reads_shapes_and_copies_of_device_tensors_are_counted_where_they_are_made():
    x = torch.randn(4, 3)
    with count_syncs(x) as count:
        y = x * 2  # computed from a root: on the device
        y.sum().item()
        int(y[0, 0] > 0)
        y[y > 0]
        torch.arange(3, device=y.device).tolist()
        y[[0, 2]]
        torch.tensor([1, 2], device=y.device)
        y.cpu()
    assert kinds(count) == [("read", "Tensor.item"), ("read", "Tensor.__int__"), ("shape", "aten.index.Tensor"),
                            ("read", "Tensor.tolist"), ("copy", "Tensor.__getitem__"), ("copy", "torch.tensor"),
                            ("copy", "Tensor.cpu")]
    assert count.syncs[0].where.startswith("tests/test_syncs.py:")
    assert count.cuda_warnings is None  # no GPU: no cross-check


def test_host_tensors_make_no_sync():
    x = torch.randn(4, 3)
    generator = torch.Generator().manual_seed(0)
    steps = torch.tensor(3.0)  # made before, not from a root: an optimizer's step count on the host
    with count_syncs(x) as count:
        torch.rand(5, generator=generator).argsort().tolist()
        flags = torch.tensor([True, False])
        bool(flags[0])
        steps.item()
        torch.zeros(2, device="cpu")[torch.tensor([1, 0]) > 0]
        x.to(torch.float64)  # a dtype, no device
    assert count.total == 0


def test_value_dependent_shapes_in_the_backward_are_counted():
    """A boolean mask's backward indexes by it again; masked_scatter's backward (a Hugging Face-style merge of
    visual tokens) selects the gradient at the mask inside one aten op."""
    x = torch.randn(4, 3, requires_grad=True)
    with count_syncs(x) as count:
        x[x.detach() > 0].sum().backward()
        torch.zeros(4, 3).masked_scatter(torch.eye(4, 3, dtype=torch.bool), x).sum().backward()
    assert kinds(count) == [("shape", "aten.index.Tensor"), ("shape", "aten.index_put"),
                            ("shape", "aten.masked_scatter_backward")]
    assert [s.where for s in count.syncs[1:]] == ["backward: IndexBackward0", "backward: MaskedScatterBackward0"]


def test_a_list_index_syncs_once_per_list():
    x = torch.zeros(3, 4)
    with count_syncs(x) as count:
        x[[0, 1], [2, 3]] = 1.0
        x[1, 2:] = 5.0
    assert kinds(count) == [("copy", "Tensor.__setitem__")] * 2
