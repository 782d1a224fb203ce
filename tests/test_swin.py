"""Swin Transformer (arXiv 2103.14030) for QAT-ViT: our forward equals timm's SwinTransformer given
the same weights in the official checkpoint layout (fused qkv, downsampling at the end of a stage,
index/mask buffers), converted for timm by timm's own filter of official checkpoints; quantized
Swin keeps the patch-merging weight at 8 bits (its input in FP, as the reference), and its integer export reloads to identical predictions."""
import pytest
import torch

from lightning_dd.methods.quantization.qat_vit.model import (calibrate, export_quantized, load_quantized, quantize_vit,
                                                quantizers)
from lightning_dd.nets.swin import Swin, relative_position_index, shifted_window_mask
from lightning_dd.nets.vit import load_vit_state
from test_qat_vit import quantizer_outputs

TINY = dict(patch_size=2, embed_dim=16, depths=(2, 2), num_heads=(2, 4), window_size=4)


def tiny_swin(seed=0):
    torch.manual_seed(seed)
    return Swin(3, 10, (32, 32), **TINY)


def official_state(net: Swin) -> dict:
    """``net``'s weights as the official code saves them: fused qkv plus the index / mask buffers."""
    state = dict(net.state_dict())
    for name, mod in net.named_modules():
        if hasattr(mod, "relative_position_bias_table"):
            for part in ("weight", "bias"):
                state[f"{name}.qkv.{part}"] = torch.cat([state.pop(f"{name}.{n}.{part}") for n in "qkv"])
            state[f"{name}.relative_position_index"] = relative_position_index(mod.window_size)
        if getattr(mod, "attn_mask", None) is not None:
            state[f"{name}.attn_mask"] = mod.attn_mask.clone()
    return state


def test_swin_equals_timm_loaded_from_the_official_layout():
    timm_swin = pytest.importorskip("timm.models.swin_transformer")
    ours = tiny_swin().eval()
    for p in ours.parameters():  # non-trivial LayerNorms and biases too
        p.data.add_(0.05 * torch.randn_like(p))
    off = official_state(ours)
    assert "layers.0.downsample.reduction.weight" in off and "layers.0.blocks.1.attn_mask" in off
    ref = timm_swin.SwinTransformer(img_size=32, in_chans=3, num_classes=10, drop_path_rate=0.0, **TINY).eval()
    ref.load_state_dict(timm_swin.checkpoint_filter_fn(off, ref), strict=True)
    again = load_vit_state(tiny_swin(1), {f"model.{k}": v for k, v in off.items()}).eval()
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        a, b, c = ours(x), ref(x), again(x)
    assert torch.allclose(a, b, atol=1e-5, rtol=1e-4), (a - b).abs().max()
    assert torch.equal(a, c)
    with pytest.raises(ValueError, match="does not fit"):
        load_vit_state(tiny_swin(1), {k: v for k, v in off.items() if k != "norm.weight"})


def test_shifted_window_mask_blocks_tokens_of_different_regions():
    m = shifted_window_mask(8, 8, 4, 2)
    assert m.shape == (4, 16, 16) and set(m.unique().tolist()) == {-100.0, 0.0}
    assert (m[0] == 0).all() and torch.equal(m, m.transpose(1, 2))  # the first window is one region
    assert (m[3] == 0).sum() == 4 * 4 + 4 * 4 + 4 * 4 + 4 * 4  # last window: four 2x2 regions


@pytest.mark.parametrize("bits", [2, 4])
def test_quantized_swin_tensors_take_at_most_2_to_the_b_values_and_merging_stays_8_bit(bits):
    model = calibrate(quantize_vit(tiny_swin(), bits), torch.randn(8, 3, 32, 32))
    seen = quantizer_outputs(model, torch.randn(4, 3, 32, 32))
    assert set(seen) == set(quantizers(model)) and len(seen) == 4 * (6 + 8) + 4 + 1  # q/k/v share one input quantizer; merging: weight only
    for name, (b, out) in seen.items():
        assert out.unique().numel() <= 2 ** b, name
        assert b == (8 if name.startswith(("patch_embed", "head")) or ".downsample." in name else bits), name


def test_quantized_swin_export_reloads_to_identical_predictions():
    model = calibrate(quantize_vit(tiny_swin(), 3), torch.randn(8, 3, 32, 32))
    cfg = {"_target_": "lightning_dd.nets.swin.Swin", **TINY}
    back = load_quantized(export_quantized(model, cfg, 3, 3, 8, "reference"), 3, 10, (32, 32))
    x = torch.randn(8, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(back(x), model.eval()(x))
