"""Captioning a real slide's patches: morphology default, the openai client, resumption.

The openai client is exercised here against ``FakeOpenAI`` (fast, fault injection); the
same client against a real vLLM server is in test_captions_vllm.py (slow).
"""

from __future__ import annotations

import pandas as pd
import pytest
from test_captions_support import FakeOpenAI, make_tiles

from mrplip_core.captions.backends import CaptionResult, MorphologyBackend
from mrplip_core.serving.client import ServerGone
from mrplip_core.captions.parts import parts_dir, read_parts
from mrplip_core.captions.run import SlideJob, caption_slides
from mrplip_core.jobs import shard_slides
from mrplip_core.captions.schema import CAPTION_COLUMNS
from mrplip_core.captions.settings import CaptionSettings


@pytest.fixture
def results(shared_data, tmp_path):
    return make_tiles(shared_data, tmp_path / "results")


def manifest_ids(results) -> list[str]:
    return list(pd.read_parquet(results / "tiles" / "CMU1.parquet")["patch_id"])


def test_morphology_captions_every_patch_of_a_real_slide(results):
    summary = caption_slides([SlideJob.under(results, "CMU1")], CaptionSettings.from_dict({"io_threads": 2}))
    df = pd.read_parquet(results / "captions" / "CMU1.parquet")
    assert list(df.columns) == list(CAPTION_COLUMNS)
    assert list(df.patch_id) == manifest_ids(results)  # every patch once, manifest order
    assert df.error.isna().all() and (df.backend == "morphology").all()
    assert (df.model == "mrplip-morphology-v1").all()
    low = df[df.patch_id.str.contains("_5x_")].caption.iloc[0]
    high = df[df.patch_id.str.contains("_20x_")].caption.iloc[0]
    assert low.startswith("Low-magnification view (5x)") and high.startswith("High-magnification view (20x)")
    # only the final file's hard link stays beside it (see captions/parts.py)
    assert [p.name for p in parts_dir(results / "captions" / "CMU1.parquet").iterdir()] == ["final.parquet"]
    assert summary["slides"]["CMU1"] == {"patches": 42, "resumed": 0, "requested": 42}


def test_a_finished_slide_whose_file_snakemake_deleted_is_not_captioned_again(results):
    """Killed after its last write, before Snakemake saw it finish: `--rerun-incomplete` deletes
    the captions file; the rerun rebuilds it from the kept link without a single request."""
    settings = CaptionSettings.from_dict({"io_threads": 2})
    job = SlideJob.under(results, "CMU1")
    caption_slides([job], settings)
    first = pd.read_parquet(job.out)
    job.out.unlink()  # what Snakemake does to the output of a job it did not see finish
    again = Crashing(settings)
    summary = caption_slides([job], settings, backend=again)
    assert again.requested == [] and summary["slides"]["CMU1"]["resumed"] == 42
    pd.testing.assert_frame_equal(pd.read_parquet(job.out), first)


class Crashing(MorphologyBackend):
    """Morphology backend that dies after ``n`` patches (a killed job), counting requests."""

    def __init__(self, settings, n=None):
        super().__init__(settings)
        self.n = n
        self.requested: list[str] = []

    def run(self, tasks, reader, emit):
        def counted():
            for t in tasks:
                if self.n is not None and len(self.requested) == self.n:
                    raise KeyboardInterrupt("killed")
                self.requested.append(t.patch_id)
                yield t
        super().run(counted(), reader, emit)


def test_a_killed_job_resumes_without_recaptioning(results):
    settings = CaptionSettings.from_dict({"io_threads": 1, "flush_rows": 5})
    job = SlideJob.under(results, "CMU1")
    first = Crashing(settings, n=23)
    with pytest.raises(KeyboardInterrupt):
        caption_slides([job], settings, backend=first)
    assert not job.out.exists()
    kept = set(read_parts(parts_dir(job.out), settings.digest())["patch_id"])
    assert len(kept) >= 15  # flushed parts survive (the buffer is flushed on the way out)
    second = Crashing(settings)
    caption_slides([job], settings, backend=second)
    assert not kept & set(second.requested)  # nothing captioned is requested again
    assert kept | set(second.requested) == set(manifest_ids(results))
    df = pd.read_parquet(job.out)
    assert list(df.patch_id) == manifest_ids(results) and df.error.isna().all()


def test_changed_settings_make_old_parts_stale(results):
    job = SlideJob.under(results, "CMU1")
    s1 = CaptionSettings.from_dict({"io_threads": 1, "flush_rows": 5})
    with pytest.raises(KeyboardInterrupt):
        caption_slides([job], s1, backend=Crashing(s1, n=10))
    s2 = CaptionSettings.from_dict({"io_threads": 1, "flush_rows": 5, "prompts": {"default": "Describe."}})
    again = Crashing(s2)
    caption_slides([job], s2, backend=again)
    assert len(again.requested) == 42
    assert set(pd.read_parquet(job.out).prompt) == {"Describe."}


def openai_settings(srv, **kw):
    d = {"backend": "openai", "io_threads": 2, "flush_rows": 4,
         "openai": {"base_url": srv.base_url, "concurrency": 4, "backoff_s": 0.01, "max_retries": 3,
                    "abort_after_failures": 3}}
    d.update(kw)
    return CaptionSettings.from_dict(d)


def test_openai_client_bounds_concurrency_retries_and_records_failures(results):
    ids = manifest_ids(results)
    srv = FakeOpenAI(delay_s=0.05).start()
    try:
        srv.fail_status = {ids[0]: [503, 429], ids[1]: [400], ids[2]: [500] * 10}
        summary = caption_slides([SlideJob.under(results, "CMU1")],
                                 openai_settings(srv, max_error_fraction=0.1))
    finally:
        srv.stop()
    df = pd.read_parquet(results / "captions" / "CMU1.parquet").set_index("patch_id")
    assert list(df.index) == ids
    assert srv.max_in_flight == 4  # the semaphore keeps exactly `concurrency` in flight
    c = srv.counts()
    assert c[ids[0]] == 3 and df.loc[ids[0], "caption"].startswith(f"caption of {ids[0]}")  # retried
    assert c[ids[1]] == 1 and df.loc[ids[1], "error"].startswith("HTTP 400")  # not retried, recorded
    assert c[ids[2]] == 4 and "failed after 4 attempts: HTTP 500" in df.loc[ids[2], "error"]
    assert df.error.notna().sum() == 2 and (df.backend == "openai").all() and (df.model == "fake-llava").all()
    assert '"max_tokens": 256' in df.params.iloc[0]
    assert summary["requests_sent"] == len(srv.requests)


def test_openai_server_gone_then_rerun_requests_only_the_rest(results):
    ids = manifest_ids(results)
    job = SlideJob.under(results, "CMU1")
    srv = FakeOpenAI(delay_s=0.02).start()
    srv.die_after = 20  # the server disappears halfway
    with pytest.raises(ServerGone, match="consecutive connection failures"):
        caption_slides([job], openai_settings(srv))
    srv.stop()
    first = list(srv.answered)
    kept = set(read_parts(parts_dir(job.out), openai_settings(srv).digest())["patch_id"])
    # every answer received was kept (the fake may have answered a few that the client never got
    # because it dropped all connections when it died)
    assert kept <= set(first) and len(kept) >= len(first) - 4 and 10 <= len(kept) <= 20
    assert not job.out.exists()

    srv2 = FakeOpenAI(port=srv.port).start()  # the server is back
    try:
        caption_slides([job], openai_settings(srv2))
    finally:
        srv2.stop()
    assert not set(srv2.requests) & kept  # already captioned: not requested again
    assert set(srv2.requests) == set(ids) - kept
    df = pd.read_parquet(job.out)
    assert list(df.patch_id) == ids and df.patch_id.is_unique and df.error.isna().all()


def test_failed_patches_are_requested_again_by_a_rerun(results):
    ids = manifest_ids(results)
    job = SlideJob.under(results, "CMU1")
    srv = FakeOpenAI().start()
    try:
        srv.fail_status = {ids[5]: [400]}
        with pytest.raises(RuntimeError, match="1 of 42 patches failed"):
            caption_slides([job], openai_settings(srv))  # max_error_fraction 0: slide not final
        assert not job.out.exists()
        n = len(srv.requests)
        caption_slides([job], openai_settings(srv))
        assert srv.requests[n:] == [ids[5]]
    finally:
        srv.stop()
    assert pd.read_parquet(job.out).error.isna().all()


def test_a_shard_shares_one_backend_across_slides(shared_data, tmp_path):
    results = make_tiles(shared_data, tmp_path / "r", slide_id="A")
    make_tiles(shared_data, results, slide_id="B")
    seen: list[str] = []
    settings = CaptionSettings.from_dict({"io_threads": 1})

    class Recording(MorphologyBackend):
        entered = 0

        def __enter__(self):
            Recording.entered += 1
            return self

        def run(self, tasks, reader, emit):
            for t in tasks:
                seen.append(t.slide_id)
                emit(CaptionResult(t, "x"))

    caption_slides([SlideJob.under(results, s) for s in ("A", "B")], settings, backend=Recording(settings))
    assert Recording.entered == 1 and seen == ["A"] * 42 + ["B"] * 42
    assert all(len(pd.read_parquet(results / "captions" / f"{s}.parquet")) == 42 for s in "AB")
    assert shard_slides(list("abcde"), 2) == [["a", "b"], ["c", "d"], ["e"]]


def test_failed_slide_gets_an_empty_captions_file(tmp_path):
    import json

    r = tmp_path / "r"
    (r / "tiles").mkdir(parents=True)
    (r / "slides").mkdir()
    from mrplip_core.wsi.hierarchy import empty_manifest

    empty_manifest().to_parquet(r / "tiles" / "X.parquet")
    (r / "slides" / "X.json").write_text(json.dumps({"slide_id": "X", "status": "failed", "error": "corrupt"}))
    caption_slides([SlideJob.under(r, "X")], CaptionSettings())
    df = pd.read_parquet(r / "captions" / "X.parquet")
    assert df.empty and list(df.columns) == list(CAPTION_COLUMNS)


def test_a_failed_shard_keeps_the_parts_of_its_finished_slides(shared_data, tmp_path):
    """Snakemake deletes every output of a failed job; the rerun must not caption them again."""
    results = make_tiles(shared_data, tmp_path / "r", slide_id="A")
    make_tiles(shared_data, results, slide_id="B")
    settings = CaptionSettings.from_dict({"io_threads": 1})

    class FailsB(Crashing):
        def run(self, tasks, reader, emit):
            def patched(res):
                emit(CaptionResult(res.task, None, "broken") if res.task.slide_id == "B" else res)
            super().run(tasks, reader, patched)

    jobs = [SlideJob.under(results, s) for s in ("A", "B")]
    with pytest.raises(RuntimeError, match="B: 42 of 42 patches failed"):
        caption_slides(jobs, settings, backend=FailsB(settings))
    assert jobs[0].out.exists() and not jobs[1].out.exists()
    jobs[0].out.unlink()  # what Snakemake does to the outputs of a failed job
    again = Crashing(settings)
    caption_slides(jobs, settings, backend=again)
    assert {p.split("_")[0] for p in again.requested} == {"B"} and len(again.requested) == 42
    assert jobs[0].out.exists() and jobs[1].out.exists()
    for job in jobs:  # the parts are gone, the final file's link stays
        assert [p.name for p in parts_dir(job.out).iterdir()] == ["final.parquet"]


def test_a_slide_that_no_longer_opens_fails_its_own_patches_not_the_shard(shared_data, tmp_path):
    """Slides open on their first read: B's file gone fails B's patches (recorded), A is captioned."""
    import json

    results = make_tiles(shared_data, tmp_path / "r", slide_id="A")
    make_tiles(shared_data, results, slide_id="B")
    record = results / "slides" / "B.json"
    record.write_text(json.dumps({**json.loads(record.read_text()), "path": str(tmp_path / "gone.svs")}))
    jobs = [SlideJob.under(results, s) for s in ("A", "B")]
    with pytest.raises(RuntimeError, match="B: 42 of 42 patches failed"):
        caption_slides(jobs, CaptionSettings.from_dict({"io_threads": 2}))
    assert len(pd.read_parquet(jobs[0].out)) == 42 and not jobs[1].out.exists()
    failed = read_parts(parts_dir(jobs[1].out), CaptionSettings.from_dict({"io_threads": 2}).digest())
    assert len(failed) == 42 and failed["caption"].isna().all()
    assert failed["error"].str.contains("file not found").all() and failed["error"].str.contains("'B'").all()
