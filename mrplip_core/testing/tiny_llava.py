"""Tiny random-weight LLaVA checkpoints, built offline, for tests and benchmarks.

:func:`build_tiny_original` writes a checkpoint in the *original* LLaVA release format (the
format of Quilt-LLaVA's release: ``LlavaLlamaForCausalLM`` with ``model.mm_projector.*``, an
``mm_vision_tower`` config key, sharded ``pytorch_model-*.bin``), next to a tiny HF CLIP
model folder that plays the vision tower (``CLIPModel`` layout, as QuiltNet's or OpenAI
CLIP's HF folders). :func:`build_tiny_hf` converts it with
:func:`~mrplip_core.convert_llava.convert_llava` into the HF
``LlavaForConditionalGeneration`` folder that vLLM and the ``transformers`` backend load.

Sizes respect vLLM's CPU kernels (attention head dim >= 32). Everything is seeded; the
tokenizer is a byte-level BPE trained on local text (the Python standard library's sources).

    python -m mrplip_core.testing.tiny_llava DST [--format hf|original] [--seed 0]
"""

from __future__ import annotations

import argparse
import glob
import json
import os
from pathlib import Path

IMAGE_PX = 32  # vision input size
PATCH_PX = 8  # vision patch size: 4 x 4 = 16 image tokens
HIDDEN = 64
HEAD_DIM = 32  # vLLM's CPU attention needs >= 32


def build_tokenizer(vocab_size: int = 1024):
    """A byte-level BPE LLaMA-style tokenizer (<unk>, <s>, </s>; pad is <unk>, as in LLaVA-1.5).

    It has no ``<image>`` token: original LLaVA marks the image with the placeholder id -200
    inside ``input_ids``; the converter adds the token.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    files = sorted(glob.glob(os.path.join(os.path.dirname(os.__file__), "*.py")))[:60]
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<unk>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train(files, trainer)
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", tok.token_to_id("<s>"))])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                   pad_token="<unk>", model_max_length=512)


def _vision_configs():
    from transformers import CLIPConfig, CLIPTextConfig, CLIPVisionConfig

    vision = CLIPVisionConfig(hidden_size=HIDDEN, intermediate_size=2 * HIDDEN, num_hidden_layers=2,
                              num_attention_heads=HIDDEN // HEAD_DIM, image_size=IMAGE_PX, patch_size=PATCH_PX,
                              projection_dim=HIDDEN)
    text = CLIPTextConfig(hidden_size=HIDDEN, intermediate_size=2 * HIDDEN, num_hidden_layers=1,
                          num_attention_heads=HIDDEN // HEAD_DIM, vocab_size=100, max_position_embeddings=16,
                          projection_dim=HIDDEN, bos_token_id=0, eos_token_id=1, pad_token_id=1)
    return CLIPConfig(text_config=text.to_dict(), vision_config=vision.to_dict(), projection_dim=HIDDEN)


def build_tiny_vision_tower(dst: str | Path, seed: int = 0) -> Path:
    """A tiny HF ``CLIPModel`` folder (config.json, model.safetensors, preprocessor_config.json).

    Weights are saved with the classic ``vision_model.*`` / ``text_model.*`` key names that
    published CLIP folders use.
    """
    import torch
    from safetensors.torch import save_file
    from transformers import CLIPModel

    try:
        from transformers import CLIPImageProcessorPil as ImageProcessor  # no torchvision needed
    except ImportError:  # pragma: no cover - older transformers
        from transformers import CLIPImageProcessor as ImageProcessor

    dst = Path(dst)
    dst.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    cfg = _vision_configs()
    model = CLIPModel(cfg).eval()
    sd = {k: v.contiguous() for k, v in model.state_dict().items()}
    sd = {("vision_model." + k[len("vision_model."):] if k.startswith("vision_model.") else k): v for k, v in sd.items()}
    save_file(sd, str(dst / "model.safetensors"), metadata={"format": "pt"})
    cfg.architectures = ["CLIPModel"]
    cfg.save_pretrained(dst)
    ImageProcessor(size={"shortest_edge": IMAGE_PX}, crop_size={"height": IMAGE_PX, "width": IMAGE_PX}).save_pretrained(dst)
    return dst


def build_tiny_original(dst: str | Path, *, vision_tower: str | None = None, embed_vision_tower: bool = False,
                        projector_type: str = "mlp2x_gelu", seed: int = 0) -> Path:
    """A tiny checkpoint in the original LLaVA-1.5 release format.

    Parameters
    ----------
    dst: output folder; the vision tower is written to ``dst/vision_tower`` unless given.
    vision_tower: value of ``mm_vision_tower`` (default: the absolute path of ``dst/vision_tower``;
        pass a hub id such as ``wisdomik/QuiltNet-B-32`` to mimic a release that names one).
    embed_vision_tower: also store the tower's weights inside the checkpoint as
        ``model.vision_tower.vision_tower.vision_model.*`` (releases trained with an unfrozen tower).
    projector_type: ``mm_projector_type`` (``mlp2x_gelu`` or ``linear``; the latter is there to
        test that the converter refuses it).
    """
    import torch
    from safetensors.torch import load_file
    from transformers import LlamaConfig, LlamaForCausalLM

    dst = Path(dst)
    dst.mkdir(parents=True, exist_ok=True)
    tower_dir = build_tiny_vision_tower(dst / "vision_tower", seed=seed + 1)
    tok = build_tokenizer()
    torch.manual_seed(seed)
    text_cfg = LlamaConfig(
        vocab_size=len(tok), hidden_size=HIDDEN, intermediate_size=2 * HIDDEN, num_hidden_layers=2,
        num_attention_heads=HIDDEN // HEAD_DIM, num_key_value_heads=HIDDEN // HEAD_DIM, head_dim=HEAD_DIM,
        max_position_embeddings=512, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id, tie_word_embeddings=False, rms_norm_eps=1e-5,
    )
    lm = LlamaForCausalLM(text_cfg).eval()
    sd = {k: v.contiguous() for k, v in lm.state_dict().items()}
    # the multimodal projector, named as LLaVA's builder.py names it
    mm_hidden = HIDDEN
    if projector_type == "mlp2x_gelu":
        proj = torch.nn.Sequential(torch.nn.Linear(mm_hidden, HIDDEN), torch.nn.GELU(), torch.nn.Linear(HIDDEN, HIDDEN))
    elif projector_type == "linear":
        proj = torch.nn.Sequential(torch.nn.Linear(mm_hidden, HIDDEN))
    else:
        raise ValueError(f"unsupported projector_type {projector_type!r}")
    for k, v in proj.state_dict().items():
        sd[f"model.mm_projector.{k}"] = v.contiguous()
    if embed_vision_tower:
        tower = load_file(str(tower_dir / "model.safetensors"))
        for k, v in tower.items():
            if k.startswith("vision_model."):
                sd[f"model.vision_tower.vision_tower.{k}"] = v
    # sharded pytorch_model-*.bin with an index, as the Quilt-LLaVA release
    keys = sorted(sd)
    shards = [keys[: len(keys) // 2], keys[len(keys) // 2 :]]
    weight_map = {}
    for i, names in enumerate(shards, 1):
        fname = f"pytorch_model-{i:05d}-of-{len(shards):05d}.bin"
        torch.save({k: sd[k] for k in names}, dst / fname)
        weight_map.update({k: fname for k in names})
    total = sum(v.numel() * v.element_size() for v in sd.values())
    (dst / "pytorch_model.bin.index.json").write_text(json.dumps({"metadata": {"total_size": total},
                                                                  "weight_map": weight_map}, indent=1))
    config = {
        "_name_or_path": "tiny-vicuna",
        "architectures": ["LlavaLlamaForCausalLM"],
        "model_type": "llava",
        **{k: v for k, v in text_cfg.to_dict().items()
           if k in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                    "num_key_value_heads", "head_dim", "max_position_embeddings", "bos_token_id", "eos_token_id",
                    "pad_token_id", "tie_word_embeddings", "rms_norm_eps", "hidden_act", "initializer_range",
                    "rope_theta", "attention_bias", "mlp_bias", "pretraining_tp")},
        "rope_scaling": None,
        "torch_dtype": "float32",
        "use_cache": True,
        "transformers_version": "4.31.0",
        # LLaVA-1.5 multimodal keys
        "mm_vision_tower": vision_tower or str(tower_dir.resolve()),
        "mm_hidden_size": mm_hidden,
        "mm_projector_type": projector_type,
        "mm_vision_select_layer": -2,
        "mm_vision_select_feature": "patch",
        "mm_use_im_start_end": False,
        "mm_use_im_patch_token": False,
        "mm_patch_merge_type": "flat",
        "image_aspect_ratio": "pad",
        "freeze_mm_mlp_adapter": False,
        "tune_mm_mlp_adapter": False,
        "unfreeze_mm_vision_tower": embed_vision_tower,
        "use_mm_proj": True,
        "tokenizer_model_max_length": 512,
        "tokenizer_padding_side": "right",
    }
    config.setdefault("rope_theta", 10000.0)
    (dst / "config.json").write_text(json.dumps(config, indent=2))
    tok.save_pretrained(dst)
    (dst / "generation_config.json").write_text(json.dumps(
        {"bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id, "pad_token_id": tok.pad_token_id}))
    return dst


def build_tiny_hf(dst: str | Path, *, workdir: str | Path | None = None, seed: int = 0) -> Path:
    """A tiny HF-format LLaVA: :func:`build_tiny_original`, then ``convert_llava`` into ``dst``."""
    from mrplip_core.convert_llava import convert_llava

    dst = Path(dst)
    src = Path(workdir) if workdir else dst.with_name(dst.name + "-original")
    build_tiny_original(src, seed=seed)
    convert_llava(src, dst, pad_vocab_multiple=64)
    return dst


def main(argv: list[str] | None = None) -> int:
    """Write a tiny LLaVA to DST (``hf``: servable folder, built as original then converted)."""
    p = argparse.ArgumentParser(prog="python -m mrplip_core.testing.tiny_llava", description=main.__doc__)
    p.add_argument("dst")
    p.add_argument("--format", choices=["hf", "original"], default="hf",
                   help="hf: servable folder (built as original, then converted); original: release format")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    out = build_tiny_original(a.dst, seed=a.seed) if a.format == "original" else build_tiny_hf(a.dst, seed=a.seed)
    print(f"tiny random-weight LLaVA ({a.format} format) -> {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
