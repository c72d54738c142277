"""The architectures the test matrix (and the README's supported list) covers."""

TIMM = [
    "deit_tiny_patch16_224", "deit_small_patch16_224", "deit_tiny_distilled_patch16_224",
    "vit_small_patch16_224.dino", "vit_small_patch14_dinov2", "vit_small_patch14_reg4_dinov2",
    "deit3_small_patch16_224", "flexivit_small", "vit_relpos_small_patch16_224",
    "vit_medium_patch16_reg4_gap_256", "vit_base_patch16_clip_224", "eva02_tiny_patch14_224",
    "beit_base_patch16_224", "cait_xxs24_224", "xcit_nano_12_p16_224", "pit_ti_224",
    "levit_128s", "convit_tiny", "crossvit_tiny_240", "twins_svt_small", "pvt_v2_b0",
    "mvitv2_tiny", "davit_tiny", "coat_lite_tiny", "nest_tiny", "gcvit_xxtiny", "hiera_tiny_224",
    "tiny_vit_5m_224", "fastvit_t8", "volo_d1_224", "swin_tiny_patch4_window7_224",
    "swinv2_tiny_window8_256", "maxvit_tiny_tf_224", "efficientvit_m0",
]
OPEN_CLIP = ["ViT-B-32", "ViT-B-16"]
TORCHVISION = ["vit_b_16", "swin_t"]
# Hugging Face transformers (random weights from the config class, shrunk by MODEL_KWARGS)
HF = ["google/vit-base-patch16-224", "facebook/deit-small-patch16-224",
      "microsoft/beit-base-patch16-224", "facebook/dinov2-small", "openai/clip-vit-base-patch32",
      "google/siglip-base-patch16-224", "microsoft/swin-tiny-patch4-window7-224"]

MATRIX = ([f"timm:{n}" for n in TIMM] + ["timm:vit_base_patch16_siglip_224"]
          + [f"open_clip:{n}" for n in OPEN_CLIP]
          + [f"torchvision:{n}" for n in TORCHVISION] + [f"hf:{n}" for n in HF])

_TINY_HF = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                image_size=32, patch_size=8)
# constructor / config arguments per model (the attention-pooled and HF models are shrunk so the
# matrix stays fast; the full-size ones are measured with `fxdecomp coverage`)
MODEL_KWARGS = {
    "timm:vit_base_patch16_siglip_224": dict(depth=3, embed_dim=64, num_heads=4, img_size=32,
                                             patch_size=8),
    **{f"hf:{n}": _TINY_HF for n in HF},
    "hf:facebook/dinov2-small": {k: v for k, v in dict(_TINY_HF, mlp_ratio=2).items()
                                 if k != "intermediate_size"},
    "hf:openai/clip-vit-base-patch32": dict(_TINY_HF, projection_dim=48),
    "hf:microsoft/swin-tiny-patch4-window7-224": dict(embed_dim=16, depths=[1, 1], num_heads=[2, 2],
                                                      image_size=32, patch_size=4, window_size=4),
}

# representation per model where the default (pre_logits) is not the one to decompose
OUTPUT = {
    # MaxViT's pre_logits ends in its head's Linear + Tanh: one nonlinear value of everything.
    # The pooled, normed features before that hidden MLP are what gets decomposed.
    "timm:maxvit_tiny_tf_224": "pooled",
    # FastViT's features end in final_conv (conv-BN-GELU after the last stage), which again leaves
    # nothing linear; its last stage's output, mean-pooled, is what gets decomposed.
    "timm:fastvit_t8": "stages",
}

# models whose stage transitions end in a nonlinear op on the stream, so the earlier stages'
# blocks are absorbed into that op's component (decomposed with allow_collapse=True; the README
# says so): spec -> the op
PARTIAL = {
    "timm:levit_128s": "attention downsampling (hardswish before its projection)",
    "timm:fastvit_t8": "GELU at the end of each downsampling layer",
    "timm:tiny_vit_5m_224": "GELU in the patch-merging convs",
    "timm:efficientvit_m0": "ReLU in the patch-merging downsampling",
}

# models without attention (FastViT-T8 mixes tokens with RepMixer convolutions only)
NO_ATTENTION = {"timm:fastvit_t8"}

# spec -> precise reason it cannot pass (strict xfail: an unexpected pass fails the suite)
XFAIL: dict[str, str] = {}
