"""Benchmark MR-PLIP pretraining: steps/s, bags/s and image-text pairs/s, with each step's
time split into data wait (blocked on the DataLoader, plus the host-to-device copy) and
compute (forward, backward, optimizer; CUDA-synchronised).

The corpus is synthetic, in the exact artifact formats (per-slide Parquet + HDF5), so the
DataLoader does the real work: index lookup, LRU slide cache, HDF5 row reads by patch id,
caption tokenisation, MLM masking, collation.

Presets:

``cpu``    (default without a GPU) tiny model (32-d random BERT), 192-d features, 4 bags
           x 7 patches per step: measures the pipeline mechanics on a laptop/CI core.
``demo``   the demo's real model: MiniLM-L6 text encoder (22M parameters), 192-d
           tiny-vit-random features, 8 bags x 7 patches, fp32 on CPU.
``paper``  (default with a GPU) UNI-sized 1024-d image features, 512-d QuiltNet keyword
           features, MiniLM-L6 text encoder, 128 bags x 7 patches = 896 image-text pairs
           per step per GPU, captions of ~80 tokens, bf16 autocast, 8 loader workers.
           The paper gives no batch size; 896 pairs per GPU is this project's choice.

    .venv/bin/python bench/pretrain.py                       # preset by device
    .venv/bin/python bench/pretrain.py --preset paper --steps 60 --out bench/results/pretrain_h100.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

PRESETS = {
    "cpu": {
        "corpus": {"image_dim": 192, "keyword_dim": 384, "slides": 6, "bags_per_slide": 8, "caption_sentences": 1},
        "pretrain": {
            "data": {"batch_size": 4, "num_workers": 1, "max_caption_tokens": 32},
            "model": {"text_encoder": "random", "text_config": {"hidden_size": 32, "num_hidden_layers": 1,
                      "num_attention_heads": 2, "intermediate_size": 64}, "embed_dim": 16,
                      "fusion_layers": 1, "keyword_fusion_layers": 1, "decoder_layers": 1},
            "train": {"threads": 1},
        },
    },
    "demo": {
        "corpus": {"image_dim": 192, "keyword_dim": 384, "slides": 6, "bags_per_slide": 8, "caption_sentences": 3},
        "pretrain": {"data": {"batch_size": 8, "num_workers": 1, "max_caption_tokens": 64}, "train": {"threads": 1}},
    },
    "paper": {
        "corpus": {"image_dim": 1024, "keyword_dim": 512, "slides": 48, "bags_per_slide": 20, "caption_sentences": 6},
        "pretrain": {
            "data": {"batch_size": 128, "num_workers": 8, "prefetch_factor": 4, "max_caption_tokens": 96},
            "train": {"precision": "bf16"},
        },
    },
}


def build_corpus(root: Path, spec: dict) -> Path:
    from mrplip_core.testing.synthetic_corpus import write_synthetic_corpus

    slides = [(f"bench_{i:03d}", 40.0 if i % 4 else 20.0) for i in range(spec["slides"])]
    return write_synthetic_corpus(root, slides=slides, bags_per_slide=spec["bags_per_slide"], image_dim=spec["image_dim"],
                                  keyword_dim=spec["keyword_dim"], n_classes=8, caption_sentences=spec["caption_sentences"],
                                  failed_slide=False)


def main() -> int:
    import torch

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=sorted(PRESETS), default=None, help="default: paper with a GPU, cpu without")
    p.add_argument("--steps", type=int, default=40, help="timed optimizer steps")
    p.add_argument("--skip", type=int, default=5, help="first steps left out of the averages (start-up)")
    p.add_argument("--batch-size", type=int, default=None, help="bags per step (override the preset)")
    p.add_argument("--num-workers", type=int, default=None, help="DataLoader workers (override the preset)")
    p.add_argument("--cache", type=Path, default=None, help="keep the synthetic corpus here between runs")
    p.add_argument("--out", type=Path, default=None, help="also write the result as JSON")
    a = p.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    preset = a.preset or ("paper" if torch.cuda.is_available() else "cpu")
    spec = PRESETS[preset]

    from mrplip_core.testing.synthetic_corpus import write_synthetic_tokenizer  # noqa: F401  (import check)
    from mrplip_core.train import PretrainConfig, pretrain
    from mrplip_core.train.config import deep_merge

    with tempfile.TemporaryDirectory() as tmp:
        root = a.cache or Path(tmp) / "results"
        name = f"{preset}_{spec['corpus']['image_dim']}"
        corpus = root / name
        t0 = time.perf_counter()
        if not (corpus / "slides.parquet").exists():
            build_corpus(corpus, spec["corpus"])
        corpus_s = time.perf_counter() - t0
        settings = deep_merge(spec["pretrain"], {
            "run": f"bench_{preset}",
            "data": {"results": str(corpus), "val_fraction": 0.0},
            "optim": {"warmup_steps": 2},
            "train": {"steps": a.steps + a.skip, "log_every": 1, "save_every": 10**9, "resume": "never",
                      "tensorboard": False},
        })
        if a.batch_size:
            settings["data"]["batch_size"] = a.batch_size
        if a.num_workers is not None:
            settings["data"]["num_workers"] = a.num_workers
        config = PretrainConfig.from_dict(settings)
        summary = pretrain(config, Path(tmp) / "run")

    rows = summary["history"][a.skip :]
    data_s = sum(r["data_s"] for r in rows) / len(rows)
    compute_s = sum(r["compute_s"] for r in rows) / len(rows)
    step_s = data_s + compute_s
    result = {
        "preset": preset,
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else f"cpu ({os.cpu_count()} cores, {platform.processor() or platform.machine()})",
        "torch": torch.__version__,
        "precision": "bf16" if config.train.precision == "bf16" or (config.train.precision == "auto" and torch.cuda.is_available()) else "fp32",
        "bags_per_step": summary["bags_per_step"],
        "pairs_per_step": summary["pairs_per_step"],
        "timed_steps": len(rows),
        "step_s": round(step_s, 4),
        "steps_per_s": round(1 / step_s, 3),
        "bags_per_s": round(summary["bags_per_step"] / step_s, 1),
        "pairs_per_s": round(summary["pairs_per_step"] / step_s, 1),
        "data_wait_s": round(data_s, 4),
        "compute_s": round(compute_s, 4),
        "data_wait_fraction": round(data_s / step_s, 4),
        "num_workers": config.data.num_workers,
        "corpus_build_s": round(corpus_s, 1),
        "final_loss": round(summary["history"][-1]["loss"], 4),
        "peak_gpu_mem_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2) if torch.cuda.is_available() else None,
    }
    print(json.dumps(result, indent=2))
    print(f"\n{preset}: {result['steps_per_s']} steps/s, {result['bags_per_s']} bags/s, {result['pairs_per_s']} pairs/s; "
          f"data wait {100 * result['data_wait_fraction']:.1f}% of the step ({result['data_wait_s'] * 1000:.1f} ms of "
          f"{result['step_s'] * 1000:.1f} ms)")
    if a.out:
        a.out.parent.mkdir(parents=True, exist_ok=True)
        a.out.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
