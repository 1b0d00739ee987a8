"""``mrplip convert-llava``: an original-format (Quilt-LLaVA release) checkpoint to HF LLaVA.

The checkpoint is a tiny random-weight LLaVA-1.5 built here in the release format
(LlavaLlamaForCausalLM, model.mm_projector.*, mm_vision_tower naming an HF CLIP folder,
sharded pytorch_model-*.bin). The converted model must load strictly in transformers and
compute what the original architecture computes: the LLaVA-1.5 forward pass is rebuilt
below from the original weights (CLIP hidden_states[select_layer] minus CLS -> Linear-GELU-
Linear -> spliced into the LLaMA input embeddings at the image position).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

from mrplip_core.convert_llava import ConversionError, convert_llava
from mrplip_core.testing.tiny_llava import build_tiny_original

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


@pytest.fixture(scope="module")
def original(tmp_path_factory):
    return build_tiny_original(tmp_path_factory.mktemp("tiny") / "quilt-llava-tiny")


@pytest.fixture(scope="module")
def converted(original, tmp_path_factory):
    dst = tmp_path_factory.mktemp("hf") / "tiny-hf"
    report = convert_llava(original, dst)
    return dst, report


def reference_llava(original):
    """The original LLaVA-1.5 architecture, assembled from the original-format files."""
    from safetensors.torch import load_file
    from transformers import CLIPVisionConfig, CLIPVisionModel, LlamaConfig, LlamaForCausalLM

    cfg = json.loads((original / "config.json").read_text())
    sd = {}
    for f in sorted(original.glob("pytorch_model-*.bin")):
        sd.update(torch.load(f, weights_only=True))
    lm = LlamaForCausalLM(LlamaConfig(**{k: v for k, v in cfg.items() if not k.startswith("mm_")
                                         and k not in ("architectures", "model_type")}))
    lm.load_state_dict({k: v for k, v in sd.items() if not k.startswith("model.mm_projector")}, strict=True)
    tower_dir = original / "vision_tower"
    vcfg = json.loads((tower_dir / "config.json").read_text())["vision_config"]
    tower = CLIPVisionModel(CLIPVisionConfig(**{k: v for k, v in vcfg.items() if k != "model_type"}))
    tsd = load_file(str(tower_dir / "model.safetensors"))
    tower.load_state_dict({k[len("vision_model."):]: v for k, v in tsd.items() if k.startswith("vision_model.")})
    n = cfg["mm_hidden_size"]
    proj = torch.nn.Sequential(torch.nn.Linear(n, cfg["hidden_size"]), torch.nn.GELU(),
                               torch.nn.Linear(cfg["hidden_size"], cfg["hidden_size"]))
    proj.load_state_dict({k[len("model.mm_projector."):]: v for k, v in sd.items() if k.startswith("model.mm_projector.")})
    layer = cfg["mm_vision_select_layer"]

    def logits(input_ids, pixel_values, image_id):
        feats = tower(pixel_values, output_hidden_states=True).hidden_states[layer][:, 1:]  # "patch"
        emb = lm.model.embed_tokens(torch.where(input_ids == image_id, 0, input_ids))
        emb[input_ids == image_id] = proj(feats).reshape(-1, emb.shape[-1])
        return lm(inputs_embeds=emb).logits

    for m in (lm, tower, proj):
        m.eval()
    return logits, lm


def prepared_inputs(dst, seed=0):
    from transformers import AutoProcessor

    proc = AutoProcessor.from_pretrained(dst)
    img = np.random.default_rng(seed).integers(0, 256, (48, 48, 3), dtype=np.uint8)
    msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe the tile."}]}]
    prompt = proc.apply_chat_template(msgs, add_generation_prompt=True)
    return prompt, proc(images=img, text=prompt, return_tensors="pt", add_special_tokens=False)


def test_report_and_files(converted):
    dst, report = converted
    assert report.image_size == 32 and report.patch_size == 8 and report.image_tokens == 16
    assert report.vocab_size % 64 == 0 and report.image_token_index >= 1024
    cfg = json.loads((dst / "config.json").read_text())
    assert cfg["architectures"] == ["LlavaForConditionalGeneration"]
    assert cfg["vision_config"]["image_size"] == 32 and cfg["vision_feature_layer"] == -2
    assert cfg["vision_feature_select_strategy"] == "default"
    from safetensors import safe_open

    with safe_open(str(dst / "model.safetensors"), "pt") as fh:
        keys = set(fh.keys())
    assert {k.split(".")[0] for k in keys} == {"language_model", "vision_tower", "multi_modal_projector"}
    assert "multi_modal_projector.linear_2.weight" in keys and "vision_tower.vision_model.post_layernorm.weight" in keys


def test_loads_strictly_and_computes_the_original_model(original, converted):
    from transformers import LlavaForConditionalGeneration

    dst, _ = converted
    model, info = LlavaForConditionalGeneration.from_pretrained(dst, output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys", "error_msgs")), info
    prompt, inputs = prepared_inputs(dst)
    # LLaVA-1.5 vicuna_v1 prompt, BOS written by the template (vLLM adds none to chat prompts)
    assert prompt.startswith("<s>A chat between a curious human") and prompt.endswith(
        "USER: <image>\nDescribe the tile. ASSISTANT:")
    ids = inputs["input_ids"]
    assert (ids == model.config.image_token_index).sum() == 16 and ids[0, 0] == 1 and (ids[0] == 1).sum() == 1
    ref, lm = reference_llava(original)
    with torch.no_grad():
        got = model(**inputs).logits
        want = ref(ids, inputs["pixel_values"], model.config.image_token_index)
    v = want.shape[-1]
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got[..., :v], want, rtol=1e-5, atol=1e-5)
    assert (got.argmax(-1) < v).all()  # the padded vocabulary rows are never the best token

    # greedy generation: HF generate() == the original architecture decoding step by step
    out = model.generate(**inputs, max_new_tokens=12, do_sample=False, temperature=None, top_p=None, top_k=None)
    new = out[0, ids.shape[1]:].tolist()
    seq = ids.clone()
    mine = []
    with torch.no_grad():
        for _ in range(len(new)):
            nxt = int(ref(seq, inputs["pixel_values"], model.config.image_token_index)[0, -1].argmax())
            mine.append(nxt)
            if nxt == lm.config.eos_token_id:
                break
            seq = torch.cat([seq, torch.tensor([[nxt]])], dim=1)
    assert new[: len(mine)] == mine


def test_weights_beyond_the_shard_size_are_written_in_shards_with_an_index(original, tmp_path):
    from transformers import LlavaForConditionalGeneration

    dst = tmp_path / "sharded"
    report = convert_llava(original, dst, max_shard_bytes=200_000)
    index = json.loads((dst / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    assert len(files) > 1 and all(f.endswith(f"-of-{len(files):05d}.safetensors") and (dst / f).exists() for f in files)
    assert len(index["weight_map"]) == report.mapped and not (dst / "model.safetensors").exists()
    _, info = LlavaForConditionalGeneration.from_pretrained(dst, output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys", "error_msgs")), info


def test_embedded_vision_tower_weights_take_precedence(tmp_path):
    src = build_tiny_original(tmp_path / "orig", embed_vision_tower=True, vision_tower="wisdomik/QuiltNet-B-32")
    # the tower config is still needed: a hub id that is not cached is refused ...
    with pytest.raises(ConversionError, match="pass --vision-tower DIR"):
        convert_llava(src, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    # ... and with its folder given, the weights come from the checkpoint itself
    shutil.copytree(src / "vision_tower", tmp_path / "tower")
    from safetensors.torch import load_file, save_file

    tw = load_file(str(tmp_path / "tower" / "model.safetensors"))
    save_file({k: torch.zeros_like(v) for k, v in tw.items()}, str(tmp_path / "tower" / "model.safetensors"))
    report = convert_llava(src, tmp_path / "out", vision_tower=tmp_path / "tower")
    assert report.vision_weights == "checkpoint"
    out = load_file(str(tmp_path / "out" / "model.safetensors"))
    assert out["vision_tower.vision_model.embeddings.patch_embedding.weight"].abs().sum() > 0


def edit_config(src, dst, **changes):
    shutil.copytree(src, dst)
    cfg = json.loads((dst / "config.json").read_text())
    cfg.update(changes)
    (dst / "config.json").write_text(json.dumps(cfg))
    return dst


@pytest.mark.parametrize("changes, message", [
    ({"mm_projector_type": "linear"}, "mm_projector_type 'linear' cannot be converted"),
    ({"mm_projector_type": "mlp3x_gelu"}, "exactly a Linear-GELU-Linear"),
    ({"mm_use_im_start_end": True}, "mm_use_im_start_end"),
    ({"image_aspect_ratio": "anyres"}, "LLaVA-NeXT"),
    ({"architectures": ["LlavaMptForCausalLM"]}, "architecture 'LlavaMptForCausalLM' is not supported"),
    ({"architectures": ["LlavaForConditionalGeneration"]}, "already in HF"),
    ({"mm_hidden_size": 1024}, "mm_hidden_size 1024 != vision tower hidden_size 64"),
    ({"mm_vision_tower": "openai/clip-vit-large-patch14-336"}, "not a local folder nor in the local HF cache"),
])
def test_refuses_what_it_cannot_convert(original, tmp_path, changes, message):
    src = edit_config(original, tmp_path / "src", **changes)
    with pytest.raises(ConversionError, match=message):
        convert_llava(src, tmp_path / "dst")
    assert not (tmp_path / "dst").exists()


def test_refuses_unknown_weights(original, tmp_path):
    src = tmp_path / "src"
    shutil.copytree(original, src)
    shard = src / "pytorch_model-00002-of-00002.bin"
    sd = torch.load(shard, weights_only=True)
    sd["model.image_newline"] = torch.zeros(64)  # a LLaVA-NeXT weight
    torch.save(sd, shard)
    index = json.loads((src / "pytorch_model.bin.index.json").read_text())
    index["weight_map"]["model.image_newline"] = shard.name
    (src / "pytorch_model.bin.index.json").write_text(json.dumps(index))
    with pytest.raises(ConversionError, match="'model.image_newline' has no counterpart"):
        convert_llava(src, tmp_path / "dst")


def test_cli_reports_refusal_clearly(original, tmp_path, repo_root):
    src = edit_config(original, tmp_path / "src", mm_projector_type="linear")
    p = subprocess.run([sys.executable, "-m", "mrplip_core", "convert-llava", str(src), str(tmp_path / "d")],
                       capture_output=True, text=True, cwd=repo_root)
    assert p.returncode == 2
    assert "cannot convert" in p.stderr and "mm_projector_type 'linear'" in p.stderr
