"""Throughput of the captions client against a bare asyncio loop on the same vLLM server.

    .venv/bin/python bench/captions.py                      # starts vLLM (.venv-vllm) on a tiny model
    .venv/bin/python bench/captions.py --base-url http://127.0.0.1:8000/v1   # a server you run

Both sides drive the same server at the same concurrency with the same request bodies
(same patches, same image size/format/quality, same prompts and generation parameters):

- *bare*: a minimal asyncio + aiohttp loop posting request bodies built beforehand by the
  client's own ``_prepare`` (patches already read and encoded, outside the timing): the most
  a client can get out of the server;
- *ours*: ``caption_slides`` with the ``openai`` backend, end to end: reading the patches
  from the slide and encoding them (``captions.image``) in ``io_threads`` worker threads, the
  requests with retries, part files, and the final atomic Parquet per slide;
- *ours, patches in memory*: the same client with each patch's request body taken from
  memory instead of being read from the slide and encoded: the client's own overhead
  (asyncio pipeline, retries bookkeeping, part files, final Parquet) without the slide I/O.

Reported: patches/s of each (median of ``--repeats`` runs, the three sides alternating),
the ratio to bare (target >= 0.9) as the median of the per-repeat ratios (each repeat's runs
are back to back, so load from other work on the machine mostly cancels), and the CPU cost
of reading + encoding one patch. On a CPU-only machine the server runs on the same cores as
the client, so every millisecond the client spends reading and encoding a patch is taken
from the server; on a GPU node the server's work is on the GPU and the client reads with
``io_threads`` otherwise idle cores.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import aiohttp

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from mrplip_core.captions.openai_backend import OpenAIBackend  # noqa: E402
from mrplip_core.captions.patches import SlideReader, load_manifest, tasks_from_manifest  # noqa: E402
from mrplip_core.captions.run import SlideJob, caption_slides  # noqa: E402
from mrplip_core.serving.server import ManagedServer  # noqa: E402
from mrplip_core.captions.settings import CaptionSettings  # noqa: E402


def make_results(slide: Path, out: Path, copies: int, patch_px: int) -> list[str]:
    """Tile ``slide`` ``copies`` times under different slide ids, every parent (no tissue filter)."""
    from mrplip_core.wsi.tiling import TilesOutputs, TilesSettings, tile_slide

    settings = TilesSettings.from_dict({"tiling": {"magnifications": [5, 10, 20], "patch_px": patch_px,
                                                   "selection": "all", "min_tissue_fraction": 0.0}})
    ids = []
    for i in range(copies):
        sid = f"bench{i}"
        o = TilesOutputs(out / "tiles" / f"{sid}.parquet", out / "tissue" / f"{sid}.geojson",
                         out / "tissue" / f"{sid}.png", out / "slides" / f"{sid}.json")
        assert tile_slide(sid, str(slide), o, settings)["status"] == "ok"
        ids.append(sid)
    return ids


def bodies_for(results: Path, ids: list[str], settings: CaptionSettings, model: str) -> tuple[dict[str, str], float]:
    """Request bodies by patch id, exactly as the client builds them; and seconds per patch."""
    backend = OpenAIBackend(settings)
    backend.model = model
    out = {}
    t0 = time.process_time()
    for sid in ids:
        rec = json.loads((results / "slides" / f"{sid}.json").read_text())
        reader = SlideReader({sid: (rec["path"], rec["mpp"])})
        manifest = load_manifest(results / "tiles" / f"{sid}.parquet")
        tasks = tasks_from_manifest(manifest, settings)
        reader.share_reads(sid, manifest, tasks)  # as the client does
        for t in tasks:
            out[t.patch_id] = backend._prepare(reader, t)
        reader.close()
    return out, (time.process_time() - t0) / max(1, len(out))


def bare_loop(base_url: str, bodies: list[str], concurrency: int) -> float:
    """Patches/s of a bare asyncio loop posting pre-built bodies, ``concurrency`` in flight."""

    async def go() -> float:
        sem = asyncio.Semaphore(concurrency)
        conn = aiohttp.TCPConnector(limit=concurrency)
        async with aiohttp.ClientSession(connector=conn, headers={"Content-Type": "application/json"}) as s:
            async def one(body: str) -> None:
                async with sem, s.post(f"{base_url}/chat/completions", data=body) as r:
                    await r.read()
                    r.raise_for_status()

            t0 = time.perf_counter()
            await asyncio.gather(*(one(b) for b in bodies))
            return len(bodies) / (time.perf_counter() - t0)

    return asyncio.run(go())


class InMemoryBodies(OpenAIBackend):
    """The openai backend with request bodies looked up instead of read and encoded."""

    def __init__(self, settings: CaptionSettings, bodies: dict[str, str]) -> None:
        super().__init__(settings)
        self.bodies = bodies

    def _prepare(self, reader, task) -> str:
        return self.bodies[task.patch_id]


def ours(results: Path, ids: list[str], settings: CaptionSettings, backend=None) -> float:
    shutil.rmtree(results / "captions", ignore_errors=True)
    jobs = [SlideJob.under(results, sid) for sid in ids]
    n = sum(len(load_manifest(j.manifest)) for j in jobs)
    t0 = time.perf_counter()
    caption_slides(jobs, settings, backend=backend, progress_interval_s=1e9)
    return n / (time.perf_counter() - t0)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base-url", default=None, help="a running server; default: start vLLM on a tiny model")
    p.add_argument("--vllm-venv", default=str(REPO / ".venv-vllm"))
    p.add_argument("--model", default=None, help="model folder to serve (default: tiny random LLaVA built here)")
    p.add_argument("--slide", default=str(REPO.parent / "shared" / "data" / "slides" / "CMU-1-Small-Region.svs"))
    p.add_argument("--copies", type=int, default=2, help="tile the slide this many times (more patches)")
    p.add_argument("--patch-px", type=int, default=128, help="patch side; 128 gives 420 patches per copy")
    p.add_argument("--concurrency", type=int, default=32)
    p.add_argument("--io-threads", type=int, default=2)
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--image-format", choices=["png", "jpeg"], default=None, help="captions.image.format (default: its default)")
    p.add_argument("--jpeg-quality", type=int, default=None, help="captions.image.jpeg_quality")
    p.add_argument("--max-px", type=int, default=None, help="captions.image.max_px")
    p.add_argument("--repeats", type=int, default=3)
    a = p.parse_args()

    work = Path(tempfile.mkdtemp(prefix="mrplip-bench-captions-"))
    server = None
    try:
        base_url = a.base_url
        if base_url is None:
            model = a.model
            if model is None:
                from mrplip_core.testing.tiny_llava import build_tiny_hf

                model = str(build_tiny_hf(work / "tiny-quilt-llava"))
            (work / "tmp").mkdir(parents=True)  # short: ZeroMQ IPC paths must fit in 107 characters
            env = {"VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_HOST_IP": "127.0.0.1", "VLLM_CACHE_ROOT": str(work / "vllm"),
                   "TMPDIR": str(work / "tmp"), "HF_HUB_OFFLINE": "1", "VLLM_NO_USAGE_STATS": "1"}
            server = ManagedServer(f"{a.vllm_venv}/bin/vllm serve {{model}} --served-model-name {{name}} "
                                   "--host {host} --port {port} --max-model-len 512 --enforce-eager",
                                   model=model, env=env, startup_timeout_s=900, log_path=work / "server.log")
            base_url = server.start() + "/v1"
        results = work / "results"
        ids = make_results(Path(a.slide), results, a.copies, a.patch_px)
        image = {"max_px": a.max_px}
        image.update({k: v for k, v in (("format", a.image_format), ("jpeg_quality", a.jpeg_quality)) if v is not None})
        settings = CaptionSettings.from_dict({
            "backend": "openai", "io_threads": a.io_threads, "generation": {"max_tokens": a.max_tokens},
            "image": image, "openai": {"base_url": base_url, "concurrency": a.concurrency}})
        img = settings.image
        img_desc = f"{img.format}" + (f" q{img.jpeg_quality}" if img.format == "jpeg" else "") + f" max_px {img.max_px}"
        from mrplip_core.serving.client import list_models

        model_id = list_models(base_url)[0]
        by_id, cpu_s = bodies_for(results, ids, settings, model_id)
        bodies = list(by_id.values())
        print(f"{len(bodies)} patches of {a.patch_px} px ({a.copies} x {a.slide}), concurrency {a.concurrency}, "
              f"max_tokens {a.max_tokens}, image {img_desc}, io_threads {a.io_threads}, "
              f"server {base_url}; reading + encoding: {1000 * cpu_s:.1f} ms CPU per patch", flush=True)
        print("bare: pre-built bodies (read + encoded by the client's _prepare beforehand); ours: reads the "
              "slide and encodes in the timing; both send identical bodies", flush=True)
        bare_loop(base_url, bodies[: 2 * a.concurrency], a.concurrency)  # warm-up
        bare, mine, mem = [], [], []
        for i in range(a.repeats):
            bare.append(bare_loop(base_url, bodies, a.concurrency))
            mine.append(ours(results, ids, settings))
            mem.append(ours(results, ids, settings, backend=InMemoryBodies(settings, by_id)))
            print(f"run {i + 1}: bare {bare[-1]:.2f}, ours {mine[-1]:.2f} ({mine[-1] / bare[-1]:.2f}), ours with "
                  f"patches in memory {mem[-1]:.2f} ({mem[-1] / bare[-1]:.2f}) patches/s", flush=True)
        b, m, mm = statistics.median(bare), statistics.median(mine), statistics.median(mem)
        ratio = statistics.median(x / y for x, y in zip(mine, bare))
        ratio_mem = statistics.median(x / y for x, y in zip(mem, bare))
        print(json.dumps({"patches": len(bodies), "patch_px": a.patch_px, "concurrency": a.concurrency,
                          "max_tokens": a.max_tokens, "image": img_desc, "io_threads": a.io_threads,
                          "read_encode_ms_per_patch": round(1000 * cpu_s, 1),
                          "bare_patches_per_s": round(b, 2), "ours_patches_per_s": round(m, 2),
                          "ours_in_memory_patches_per_s": round(mm, 2), "ratio": round(ratio, 3),
                          "ratio_in_memory": round(ratio_mem, 3)}))
    finally:
        if server is not None:
            server.stop()
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
