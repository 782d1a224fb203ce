"""Weight selection equals the authors' ``uniform_element_selection`` and their selection loop
(OscarXZQ/weight-selection, fixture ``weight_selection``): exact equality (selection copies elements)."""
import pytest
import torch

from fixture_io import load_fixture
from lightning_dd.nets.vit import ViT, split_fused_qkv
from lightning_dd.nets.weight_selection import select_elements, weight_selection

pytestmark = pytest.mark.parity
CASES = load_fixture("weight_selection")["cases"]


@pytest.mark.parametrize("name", [k for k in CASES if k.startswith("elements_")])
def test_element_selection_equals_the_reference(name):
    """Every-k-th elements where sizes divide, a rounded linspace where not, in every dimension
    (mutation checked: ``linspace(...).floor()`` instead of ``round()`` fails the non-divisible cases)."""
    case = CASES[name]
    assert torch.equal(select_elements(case["teacher"], case["student_shape"]), case["selected"])


@pytest.mark.parametrize("name", ["vit_divisible", "vit_nondivisible"])
def test_a_vit_student_selected_from_a_teacher_equals_the_reference(name):
    """The authors' ViT (fused qkv) teacher -> our ViT student with separate q/k/v, as QAT-ViT's
    ``method.fp_init_from`` does it: every tensor but the head equals the reference's selection. The
    non-divisible width (24 -> 18) pins that rows are selected from the fused ``(3D, D)`` qkv, not from
    each of q, k, v (mutation checked: selecting after the split fails it)."""
    case = CASES[name]
    student = ViT(3, 7, (16, 16), 4, embed_dim=case["width"], depth=case["depth"], num_heads=3)
    head = student.head.weight.detach().clone()
    weight_selection(student, case["teacher"])
    ours, ref = student.state_dict(), split_fused_qkv(case["selected"])
    assert set(ours) - set(ref) == {"head.weight", "head.bias"}
    for k, v in ref.items():
        assert torch.equal(ours[k], v), k
    assert torch.equal(student.head.weight, head)
