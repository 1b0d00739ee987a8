"""The ``transformers`` backend: in-process ``generate()`` of an HF LLaVA model directory.

It builds each prompt exactly as vLLM's chat-completions endpoint does: the model's chat
template with the image before the text, tokenized without adding special tokens (vLLM adds
no BOS to chat prompts; a template that wants one writes ``{{ bos_token }}`` itself, as the
one written by ``mrplip convert-llava`` does). Images go through the same resize and encoding
as requests to a server, so greedy decoding gives the same text as the ``openai`` backend
served by vLLM with the same model.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from mrplip_core.captions.backends import CaptionResult, Emit, bounded_map, generation_params_json
from mrplip_core.captions.patches import PatchTask, SlideReader, decode_image, encode_image, iter_chunks, resize_for_model
from mrplip_core.captions.settings import CaptionSettings

log = logging.getLogger(__name__)


def chat_prompt(processor, text: str) -> str:
    """The model's chat template applied to one user turn (image, then ``text``)."""
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": text}]}]
    return processor.apply_chat_template(messages, add_generation_prompt=True)


class TransformersBackend:
    """Batched greedy or sampled generation with ``LlavaForConditionalGeneration``."""

    backend = "transformers"

    def __init__(self, settings: CaptionSettings) -> None:
        self.settings = settings
        self.model = str(settings.model)
        self._model = None
        self._processor = None

    def params_json(self) -> str:
        return generation_params_json(self.settings)

    def __enter__(self) -> TransformersBackend:
        import torch
        from transformers import AutoProcessor, LlavaForConditionalGeneration

        t = self.settings.transformers
        device = t.device
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        dtype = t.dtype
        if dtype == "auto":
            dtype = "bfloat16" if device.startswith("cuda") else "float32"
        self.device = device
        self._processor = AutoProcessor.from_pretrained(self.model)
        self._processor.tokenizer.padding_side = "left"  # batched generation
        self._model = LlavaForConditionalGeneration.from_pretrained(self.model, dtype=getattr(torch, dtype)).to(device).eval()
        log.info("loaded %s on %s (%s)", self.model, device, dtype)
        return self

    def __exit__(self, *exc: object) -> None:
        self._model = None
        self._processor = None

    def _image(self, reader: SlideReader, task: PatchTask) -> np.ndarray:
        """What a server would decode from our request: resized, encoded, decoded."""
        rgb = resize_for_model(reader.read(task), self.settings.image)
        data, _ = encode_image(rgb, self.settings.image)
        return decode_image(data)

    def generate(self, images: list[np.ndarray], prompts: list[str]) -> list[str]:
        """Captions for a batch of RGB images with their (already templated) prompts."""
        import torch

        g = self.settings.generation
        inputs = self._processor(images=images, text=prompts, return_tensors="pt", padding=True,
                                 add_special_tokens=False).to(self.device)
        if "pixel_values" in inputs:
            inputs["pixel_values"] = inputs["pixel_values"].to(self._model.dtype)
        kwargs = {"max_new_tokens": g.max_tokens, "do_sample": g.temperature > 0}
        if g.temperature > 0:
            torch.manual_seed(g.seed)
            kwargs.update(temperature=g.temperature, top_p=g.top_p)
        else:
            kwargs.update(temperature=None, top_p=None, top_k=None)
        with torch.inference_mode():
            out = self._model.generate(**inputs, **kwargs)
        new = out[:, inputs["input_ids"].shape[1]:]
        return [t.strip() for t in self._processor.batch_decode(new, skip_special_tokens=True)]

    def run(self, tasks: Iterable[PatchTask], reader: SlideReader, emit: Emit) -> None:
        bs = max(1, self.settings.transformers.batch_size)
        with ThreadPoolExecutor(max(1, self.settings.io_threads), thread_name_prefix="read") as pool:
            def load(batch: list[PatchTask]) -> list[np.ndarray | Exception]:
                out: list[np.ndarray | Exception] = []
                for task in batch:
                    try:
                        out.append(self._image(reader, task))
                    except Exception as exc:  # noqa: BLE001 - recorded per patch
                        out.append(exc)
                return out

            # the next batches are read while the current one generates
            for batch, fut in bounded_map(pool, load, iter_chunks(list(tasks), bs), 2):
                images = fut.result()
                ok = [(t, im) for t, im in zip(batch, images) if not isinstance(im, Exception)]
                for t, im in zip(batch, images):
                    if isinstance(im, Exception):
                        emit(CaptionResult(t, None, f"reading patch: {type(im).__name__}: {im}"))
                if not ok:
                    continue
                try:
                    texts = self.generate([im for _, im in ok], [chat_prompt(self._processor, t.prompt) for t, _ in ok])
                except Exception as exc:  # noqa: BLE001 - e.g. out of memory: recorded, run goes on
                    for t, _ in ok:
                        emit(CaptionResult(t, None, f"generate: {type(exc).__name__}: {exc}"))
                    continue
                for (t, _), text in zip(ok, texts):
                    emit(CaptionResult(t, text))
