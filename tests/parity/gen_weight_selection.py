"""Parity fixture for weight selection (Xu et al., ICLR 2024, arXiv 2311.18823) from the authors' code.

Runs ``uniform_element_selection`` of ``weight_selection.py`` in OscarXZQ/weight-selection:
1. on seeded teacher tensors of 1 to 4 dimensions and smaller student shapes, both where the student's
   sizes divide the teacher's (every k-th element) and where they do not (rounded linspace);
2. the whole selection of the script's ``main`` (every student key but those containing "head", by name)
   from a teacher of the authors' timm-style ``VisionTransformer`` (fused ``attn.qkv``) to a narrower,
   shallower student of the same class, at a divisible width (24 -> 12) and a non-divisible one (24 -> 18,
   where selecting rows of the fused qkv differs from selecting each of q, k, v).

Usage: ``python tests/parity/gen_weight_selection.py --reference /tmp/ref/weight-selection``
"""
import argparse
import sys
import warnings

import torch

from fixture_io import add_reference_to_path, save_fixture

SHAPES = [((12,), (4,)), ((11,), (4,)), ((10, 6), (4, 3)), ((8, 7, 5), (3, 7, 2)), ((6, 3, 5, 5), (4, 3, 3, 2))]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--reference", required=True, help="checkout of OscarXZQ/weight-selection")
    args = p.parse_args()
    add_reference_to_path(args.reference)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import weight_selection as ref  # noqa: the authors' module (imports timm and their models)
        from models.vision_transformer import VisionTransformer

    g = torch.Generator().manual_seed(0)
    cases = {}
    for i, (t_shape, s_shape) in enumerate(SHAPES):
        t = torch.randn(t_shape, generator=g)
        cases[f"elements_{i}"] = {"teacher": t, "student_shape": list(s_shape),
                                  "selected": ref.uniform_element_selection(t, torch.Size(s_shape))}
    for name, width in (("vit_divisible", 12), ("vit_nondivisible", 18)):
        torch.manual_seed(1)
        teacher = VisionTransformer(img_size=16, patch_size=4, in_chans=3, num_classes=10, embed_dim=24, depth=3,
                                    num_heads=3)
        student = VisionTransformer(img_size=16, patch_size=4, in_chans=3, num_classes=7, embed_dim=width, depth=2,
                                    num_heads=3)
        t_state, s_state = teacher.state_dict(), student.state_dict()
        selected = {k: ref.uniform_element_selection(t_state[k], s_state[k].shape)
                    for k in s_state if "head" not in k}  # the loop of the authors' main()
        cases[name] = {"teacher": t_state, "width": width, "depth": 2, "selected": selected}
    save_fixture("weight_selection", cases, reference=args.reference, repo="OscarXZQ/weight-selection",
                 replaced="nothing; timm's pretrained teacher is replaced by a seeded VisionTransformer of the "
                          "authors' models/vision_transformer.py (no download)")


if __name__ == "__main__":
    sys.exit(main())
