"""``mrplip convert-llava``: :func:`register` adds the verb to the main parser.

    mrplip convert-llava SRC DST [--vision-tower DIR] [--dtype float16] [--overwrite]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def _cmd_convert_llava(a: argparse.Namespace) -> int:
    from mrplip_core.convert_llava import ConversionError, convert_llava

    template = Path(a.chat_template).read_text() if a.chat_template else None
    try:
        report = convert_llava(a.src, a.dst, vision_tower=a.vision_tower, dtype=a.dtype,
                               pad_vocab_multiple=a.pad_vocab_multiple, chat_template=template,
                               overwrite=a.overwrite)
    except ConversionError as exc:
        print(f"mrplip convert-llava: cannot convert {a.src}: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(report.to_dict(), indent=1))
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    """Add ``convert-llava``."""
    s = sub.add_parser("convert-llava", help="original-format LLaVA (Quilt-LLaVA) -> HF LlavaForConditionalGeneration")
    s.add_argument("src", help="original checkpoint folder (config.json with mm_vision_tower, weights)")
    s.add_argument("dst", help="output folder (HF format, servable by vLLM)")
    s.add_argument("--vision-tower", default=None, help="local HF CLIP folder, when mm_vision_tower is a hub id")
    s.add_argument("--dtype", default=None, choices=["float16", "bfloat16", "float32"],
                   help="output dtype (default: the checkpoint's)")
    s.add_argument("--pad-vocab-multiple", type=int, default=64, help="pad the vocabulary to a multiple of this")
    s.add_argument("--chat-template", default=None, help="Jinja chat template file (default: LLaVA-1.5 vicuna_v1)")
    s.add_argument("--overwrite", action="store_true", help="replace DST if it exists")
    s.set_defaults(func=_cmd_convert_llava)
