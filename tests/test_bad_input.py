"""The bad-input sweep (issue #17): every kind of bad input a user can hand the pipeline, what
they get and when. ``CASES`` is the table of docs/bad_input.md: each test asserts its cases'
message fragments, and ``test_the_doc_table_lists_every_case`` keeps the doc in step.

When: ``BEFORE`` no job runs (Snakemake stops while building the DAG); ``SLIDE`` that slide is
recorded failed in results/slides.parquet and the rest of the cohort finishes; ``PATCH`` that
patch's caption is recorded failed and the slide finishes; ``JOB`` the job stops with the
message (nothing half-written is kept); ``WORKS`` the input is used.
"""

from __future__ import annotations

import copy
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
DOC = REPO / "docs" / "bad_input.md"

BEFORE = "before any job"
SLIDE = "that slide recorded failed, the others finish"
PATCH = "that patch recorded failed, the slide finishes"
JOB = "the job fails"
WORKS = "works"

#: case id -> (input, a fragment of what the user gets, when). The doc's table quotes each.
CASES: dict[str, tuple[str, str, str]] = {
    # slide table (read when Snakemake builds the DAG: rules/common.smk)
    "table-missing-column": ("slide table without a `path` column", "missing column(s) ['path']", BEFORE),
    "table-duplicate-id": ("two rows with slide_id `A`", "duplicate slide_id(s) ['A']", BEFORE),
    "table-id-with-space": ("slide_id `my slide`", "slide_id 'my slide' must match [A-Za-z0-9][A-Za-z0-9._-]*", BEFORE),
    "table-id-non-ascii": ("slide_id `släde`", "slide_id 'släde' must match", BEFORE),
    "table-empty-file": ("a slide table of 0 bytes (or only comments)", "the slide table is empty", BEFORE),
    "table-no-rows": ("a slide table with a header and no rows", "the slide table lists no slides", BEFORE),
    "table-mpp-zero": ("mpp `0` in the table", "column 'mpp' must be a positive number (um/px)", BEFORE),
    "table-mpp-negative": ("mpp `-0.5` in the table", "column 'mpp' must be a positive number (um/px)", BEFORE),
    "table-path-with-spaces": ("path `my slides/CMU 1.svs`", "tiled: status ok", WORKS),
    "table-relative-path": ("path `slides/CMU-1.svs`", "resolved against the table's folder; tiled: status ok", WORKS),
    # slide files (the tiles job records each slide; results/slides.parquet status/error)
    "slide-zero-bytes": ("a 0-byte `.svs`", "file is empty (0 bytes)", SLIDE),
    "slide-truncated-svs": ("the first 90 % of an SVS", "OpenSlide cannot open", SLIDE),
    "slide-truncated-tiff": ("the first 90 % of a tiled TIFF", "OpenSlide cannot open", SLIDE),
    "slide-png-renamed": ("a PNG renamed `.svs`", "Unsupported or missing image file", SLIDE),
    "slide-directory": ("a folder (no DICOM files in it)", "is a folder without .dcm files", SLIDE),
    "slide-no-permission": ("a file without read permission (checked as user nobody when run as root)",
                            "no read permission for", SLIDE),
    "slide-mpp-huge": ("mpp `1e6` in the table", "(1e+06 um/px) is below the parent magnification 5x; check its mpp", SLIDE),
    # evaluation tiles (TileDataset.read, in the eval-features job)
    "tile-grayscale": ("a grayscale (L) tile", "converted to RGB and evaluated", WORKS),
    "tile-rgba": ("an RGBA tile", "composited onto white and evaluated", WORKS),
    "tile-cmyk": ("a CMYK JPEG tile", "converted to RGB and evaluated", WORKS),
    "tile-16-bit": ("a 16-bit grayscale PNG", "scaled to 8 bits and evaluated", WORKS),
    "tile-1x1": ("a 1x1 px image", "is 1x1 px, smaller than 16 px on a side", JOB),
    "tile-unreadable": ("a `.png` of random bytes", "cannot read", JOB),
    # config (validated against workflow/schemas/config.schema.yaml when the DAG is built)
    "config-wrong-type": ("any key given a value of the wrong type, e.g. `tiling.n_parents: five`",
                          "'five' is not of type 'integer'", BEFORE),
    "config-out-of-range": ("any key given an out-of-range value, e.g. `tiling.n_parents: 0`",
                            "0 is less than the minimum of 1", BEFORE),
    "config-unknown-key": ("an unknown key, e.g. `tissue.bogus`", "Additional properties are not allowed ('bogus' was unexpected)", BEFORE),
    # features files (read by the pretraining job)
    "features-truncated-h5": ("a truncated `features/{encoder}/{slide}.h5`",
                              "cannot be read", JOB),
    "features-wrong-dim": ("one slide's features of another encoder's width",
                           "have widths", JOB),
    # captions server (openai backend)
    "caption-http-500": ("the server answers HTTP 500", "failed after 3 attempts: HTTP 500", PATCH),
    "caption-malformed-json": ("the server answers `{not json`", "malformed response (JSONDecodeError)", PATCH),
    "caption-empty": ("the server answers an empty caption", "empty answer ''", PATCH),
    "caption-100k-chars": ("a caption of 100,000 characters", "kept whole", WORKS),
}


def _case(case_id: str) -> str:
    return CASES[case_id][1]


def _snakemake_dry_run(workdir: Path, *args: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "snakemake", "-s", str(REPO / "workflow" / "Snakefile"), "-d", str(workdir),
           "--cores", "1", "-n", *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=REPO)
    proc.output = proc.stdout + proc.stderr  # Snakemake prints a DAG-time error on stdout or stderr
    return proc


# -- the doc ---------------------------------------------------------------------------------
def doc_rows() -> dict[str, str]:
    """case id -> its row of the table under the "Bad input" heading of docs/bad_input.md."""
    text = DOC.read_text(encoding="utf-8")
    section = text.split("# Bad input", 1)[1]
    return {m.group(1): m.group(0) for m in re.finditer(r"^\| `([a-z0-9-]+)` \|.*$", section, flags=re.M)}


def test_the_doc_table_lists_every_case():
    rows = doc_rows()
    assert sorted(rows) == sorted(CASES), "docs/bad_input.md and CASES differ"
    for case_id, (_, fragment, when) in CASES.items():
        row = rows[case_id]
        assert fragment.replace("|", "\\|") in row, (case_id, fragment)
        assert row.rstrip(" |").endswith(when), (case_id, when)
    assert "docs/bad_input.md" in (REPO / "README.md").read_text()


# -- slide table -----------------------------------------------------------------------------
TABLES = {
    "table-missing-column": "slide_id\tfile\nA\ta.svs\n",
    "table-duplicate-id": "slide_id\tpath\nA\ta.svs\nA\tb.svs\n",
    "table-id-with-space": "slide_id\tpath\nmy slide\ta.svs\n",
    "table-id-non-ascii": "slide_id\tpath\nsläde\ta.svs\n",
    "table-empty-file": "",
    "table-no-rows": "# a cohort to come\nslide_id\tpath\tmpp\n",
    "table-mpp-zero": "slide_id\tpath\tmpp\nA\ta.svs\t0\n",
    "table-mpp-negative": "slide_id\tpath\tmpp\nA\ta.svs\t-0.5\n",
}


@pytest.mark.parametrize("case_id", sorted(TABLES))
def test_a_bad_slide_table_is_refused_naming_the_file(case_id, tmp_path):
    from mrplip_core.wsi.table import SlideTableError, read_slide_table

    table = tmp_path / "slides.tsv"
    table.write_text(TABLES[case_id], encoding="utf-8")
    with pytest.raises(SlideTableError) as err:
        read_slide_table(table)
    assert _case(case_id) in str(err.value) and str(table) in str(err.value)


def test_slide_table_errors_stop_snakemake_before_any_job(tmp_path):
    """The table is read while the DAG is built: `snakemake -n` already fails, naming it."""
    (tmp_path / "config.yaml").write_text((REPO / "config.yaml").read_text())
    (tmp_path / "demo").mkdir()
    (tmp_path / "demo" / "slides.tsv").write_text(TABLES["table-duplicate-id"])
    proc = _snakemake_dry_run(tmp_path)
    assert proc.returncode != 0 and _case("table-duplicate-id") in proc.output and "slides.tsv" in proc.output
    assert not (tmp_path / "results").exists()


# -- slide files: one real `mrplip tiles` shard over good and bad slides ----------------------
@pytest.fixture(scope="module")
def tiled(tmp_path_factory, shared_data):
    from mrplip_core.cli import main
    from mrplip_core.wsi.synthetic import write_synthetic_slide

    base = tmp_path_factory.mktemp("bad_slides")
    cmu = shared_data / "slides" / "CMU-1-Small-Region.svs"
    (base / "my slides").mkdir()
    os.symlink(cmu, base / "my slides" / "CMU 1.svs")
    (base / "slides").mkdir()
    os.symlink(cmu, base / "slides" / "CMU-1.svs")
    (base / "zero.svs").write_bytes(b"")
    svs = cmu.read_bytes()
    (base / "truncated.svs").write_bytes(svs[: int(len(svs) * 0.9)])
    write_synthetic_slide(base / "synthetic.tiff", 4096, 4096, 0.25, seed=1)
    tiff = (base / "synthetic.tiff").read_bytes()
    (base / "truncated.tiff").write_bytes(tiff[: int(len(tiff) * 0.9)])
    from PIL import Image

    Image.new("RGB", (64, 64), (200, 120, 160)).save(base / "png.png")
    shutil.copy(base / "png.png", base / "png.svs")
    (base / "folder.svs").mkdir()
    rows = [
        ("table-path-with-spaces", "CMU-spaces", str(base / "my slides" / "CMU 1.svs"), ""),
        ("table-relative-path", "CMU-relative", "slides/CMU-1.svs", ""),
        ("slide-zero-bytes", "zero", "zero.svs", ""),
        ("slide-truncated-svs", "truncated-svs", "truncated.svs", ""),
        ("slide-truncated-tiff", "truncated-tiff", "truncated.tiff", ""),
        ("slide-png-renamed", "png", "png.svs", ""),
        ("slide-directory", "folder", "folder.svs", ""),
        ("slide-mpp-huge", "mpp-huge", "slides/CMU-1.svs", "1e6"),
    ]
    table = base / "slides.tsv"
    table.write_text("slide_id\tpath\tmpp\n" + "".join(f"{s}\t{p}\t{m}\n" for _, s, p, m in rows))
    results = base / "results"
    settings = ('{"wsi": null, "mpp_fallback": null, "failures_fatal": false, "tissue": null, '
                '"tiling": {"min_tissue_fraction": 0.3, "magnifications": [5, 10, 20]}}')
    assert main(["tiles", *[r[1] for r in rows], "--table", str(table), "--results", str(results),
                 "--settings", settings]) == 0
    assert main(["slides-table", "--table", str(table), "--results", str(results)]) == 0
    slides = pd.read_parquet(results / "slides.parquet").set_index("slide_id")
    return {case_id: slides.loc[sid] for case_id, sid, _, _ in rows}, base


@pytest.mark.parametrize("case_id", ["slide-zero-bytes", "slide-truncated-svs", "slide-truncated-tiff",
                                     "slide-png-renamed", "slide-directory", "slide-mpp-huge"])
def test_a_bad_slide_file_is_recorded_and_the_rest_finish(tiled, case_id):
    rows, _ = tiled
    row = rows[case_id]
    assert row.status == "failed" and _case(case_id) in row.error and f"'{row.name}'" in row.error
    assert rows["table-path-with-spaces"].status == "ok"  # the good slides of the same job finished


@pytest.mark.parametrize("case_id", ["table-path-with-spaces", "table-relative-path"])
def test_paths_with_spaces_and_relative_paths_work(tiled, case_id):
    rows, base = tiled
    row = rows[case_id]
    assert row.status == "ok" and row.n_patches > 0 and Path(row.path).is_absolute()
    if case_id == "table-relative-path":
        assert row.path == str(base / "slides" / "CMU-1.svs")


def test_a_slide_without_read_permission_is_named(shared_data):
    """Root reads any file whatever its mode: as root the check runs as user nobody (setpriv)."""
    folder = Path(tempfile.mkdtemp(prefix="mrplip-perm-"))
    try:
        os.chmod(folder, 0o755)
        slide = folder / "locked.svs"
        shutil.copy(shared_data / "slides" / "CMU-1-Small-Region.svs", slide)
        os.chmod(slide, 0)
        code = ("import sys; from mrplip_core.wsi.slide import Slide, SlideError\n"
                "try: Slide(sys.argv[1], 'locked')\n"
                "except SlideError as e: print(e)\n")
        cmd = [sys.executable, "-c", code, str(slide)]
        if os.geteuid() == 0:
            if shutil.which("setpriv") is None:
                pytest.skip("running as root (file modes do not apply) and no setpriv to drop to nobody")
            cmd = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", *cmd]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120,
                              env={**os.environ, "PYTHONPATH": str(REPO)}, cwd=folder)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    assert _case("slide-no-permission") in proc.stdout and "'locked'" in proc.stdout, proc.stderr[-2000:]


# -- evaluation tiles --------------------------------------------------------------------------
def _tile_dataset(paths: list[Path]):
    from mrplip_core.evaluation.datasets import TileDataset

    return TileDataset("sweep", tuple(paths), tuple("ab"[i % 2] for i in range(len(paths))), 0.5, 20.0)


def test_tiles_of_other_modes_are_converted_to_rgb(shared_data, tmp_path):
    from PIL import Image

    src = next((shared_data / "tiles" / "nct_crc_he_100k_samples").glob("Sample_Data/TUM-*.tif"))
    rgb = np.asarray(Image.open(src).convert("RGB"))
    gray = Image.open(src).convert("L")
    files = {
        "tile-grayscale": (gray, "gray.png"),
        "tile-rgba": (Image.fromarray(np.dstack([rgb, np.full(rgb.shape[:2], 255, np.uint8)])), "rgba.png"),
        "tile-cmyk": (Image.open(src).convert("CMYK"), "cmyk.jpg"),
        "tile-16-bit": (Image.fromarray(np.asarray(gray, dtype=np.uint16) * 257), "gray16.png"),
    }
    paths = []
    for case_id, (im, name) in files.items():
        im.save(tmp_path / name)
        paths.append(tmp_path / name)
    dataset = _tile_dataset(paths)
    tiles = dict(zip(files, (dataset.read(i) for i in range(len(paths)))))
    for case_id, tile in tiles.items():
        assert tile.dtype == np.uint8 and tile.shape == rgb.shape, case_id
    assert np.array_equal(tiles["tile-rgba"], rgb)
    assert np.array_equal(tiles["tile-16-bit"][..., 0], np.asarray(gray))  # not clipped to white
    assert np.abs(tiles["tile-cmyk"].astype(int) - rgb).mean() < 8  # JPEG
    assert np.array_equal(tiles["tile-grayscale"][..., 1], np.asarray(gray))
    # half-transparent pixels go onto white, as slide regions do
    half = np.dstack([rgb, np.full(rgb.shape[:2], 0, np.uint8)])
    Image.fromarray(half).save(tmp_path / "clear.png")
    assert (_tile_dataset([tmp_path / "clear.png"]).read(0) == 255).all()


@pytest.mark.parametrize("case_id", ["tile-1x1", "tile-unreadable"])
def test_an_unusable_tile_is_an_error_naming_the_file(case_id, tmp_path):
    from PIL import Image

    from mrplip_core.evaluation.datasets import DatasetError

    path = tmp_path / "bad.png"
    if case_id == "tile-1x1":
        Image.new("RGB", (1, 1)).save(path)
    else:
        path.write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    with pytest.raises(DatasetError) as err:
        _tile_dataset([path]).read(0)
    assert _case(case_id) in str(err.value) and str(path) in str(err.value)


# -- config ------------------------------------------------------------------------------------
_JSON_OF = ((bool, "boolean"), (int, "integer"), (float, "number"), (str, "string"), (list, "array"), (dict, "object"))


def _types(schema: dict[str, Any]) -> set[str]:
    from mrplip_core.config_schema import _branches

    out: set[str] = set()
    for branch in _branches(schema):
        kind = branch.get("type")
        out.update([kind] if isinstance(kind, str) else kind or [])
        if "const" in branch or "enum" in branch:
            out.add("string" if any(isinstance(v, str) for v in branch.get("enum", [branch.get("const")])) else "x")
    return out


def _leaves(schema: dict[str, Any], path: tuple[str, ...] = ()):
    for key, sub in schema.get("properties", {}).items():
        if isinstance(sub, dict) and sub.get("type") == "object" and sub.get("properties"):
            yield from _leaves(sub, (*path, key))
        else:
            yield (*path, key), sub


def _wrong_values(sub: dict[str, Any]) -> list[tuple[str, Any]]:
    """(kind, value) pairs the schema must refuse for a key: a wrong type, out-of-range values."""
    types = _types(sub)
    if not types:
        return []
    allowed = types | ({"number"} if "integer" in types else set())
    wrong = next(v for v in ("not-a-number", 1.5, [1], {"a": 1}) if not any(
        isinstance(v, cls) and name in allowed for cls, name in _JSON_OF if not (cls is int and isinstance(v, bool))))
    if "string" in types and isinstance(wrong, str):
        wrong = {"a": 1}
    out = [("wrong-type", wrong)]
    for branch in [sub, *sub.get("oneOf", []), *sub.get("anyOf", [])]:
        if "minimum" in branch:
            out.append(("out-of-range", branch["minimum"] - 1))
        if "exclusiveMinimum" in branch:
            out.append(("out-of-range", branch["exclusiveMinimum"]))
        if "maximum" in branch:
            out.append(("out-of-range", branch["maximum"] + 1))
        if branch.get("minItems"):
            out.append(("out-of-range", []))
        if "enum" in branch and all(isinstance(v, str) for v in branch["enum"]):
            out.append(("out-of-range", "no-such-choice"))
    return out


def _validate(config: dict[str, Any]) -> None:
    """What rules/common.smk does with the config before the DAG is built."""
    from snakemake.utils import validate

    from mrplip_core.config_schema import SCHEMA_PATH, apply_schema_types, load_schema

    validate(apply_schema_types(config, load_schema()), str(SCHEMA_PATH))


def test_every_config_key_refuses_a_wrong_type_and_out_of_range_values_naming_the_key():
    """Generated from the schema: each key gets a value of a wrong type and each bound a value
    beyond it. The sweep runs the schema's validator directly (Snakemake's ``validate`` reads the
    schema file again on every call: 0.3 s each); the doc's examples go through ``validate``."""
    from jsonschema import Draft202012Validator

    from mrplip_core.config_schema import apply_schema_types, load_schema

    schema = load_schema()
    validator = Draft202012Validator(schema)
    config = yaml.safe_load((REPO / "config.yaml").read_text())
    _validate(copy.deepcopy(config))  # the shipped config passes
    checked, unrefused, unnamed = 0, [], []
    for path, sub in _leaves(schema):
        for kind, value in _wrong_values(sub):
            bad = copy.deepcopy(config)
            node = bad
            for key in path[:-1]:
                node = node.setdefault(key, {})
            node[path[-1]] = value
            errors = list(validator.iter_errors(apply_schema_types(bad, schema)))
            if not errors:
                unrefused.append((".".join(path), kind, value))
            elif not any(tuple(e.absolute_path)[: len(path)] == path for e in errors):
                unnamed.append((".".join(path), kind, value, [list(e.absolute_path) for e in errors]))
            checked += 1
    assert checked > 100 and not unrefused and not unnamed, (unrefused, unnamed)
    for case_id, (section, key, value) in {"config-wrong-type": ("tiling", "n_parents", "five"),
                                           "config-out-of-range": ("tiling", "n_parents", 0),
                                           "config-unknown-key": ("tissue", "bogus", 1)}.items():
        bad = copy.deepcopy(config)
        bad[section][key] = value
        with pytest.raises(Exception, match=re.escape(_case(case_id))) as err:
            _validate(bad)
        assert f"[{section!r}]" in str(err.value)


def test_a_bad_config_value_stops_snakemake_before_any_job(tmp_path):
    (tmp_path / "config.yaml").write_text((REPO / "config.yaml").read_text())
    (tmp_path / "demo").mkdir()
    (tmp_path / "demo" / "slides.tsv").write_text((REPO / "demo" / "slides.tsv").read_text())
    proc = _snakemake_dry_run(tmp_path, "--config", "tiling={n_parents: five}")
    assert proc.returncode != 0 and _case("config-wrong-type") in proc.output and "n_parents" in proc.output
    assert not (tmp_path / "results").exists()


# -- features files ----------------------------------------------------------------------------
@pytest.fixture
def corpus(tmp_path):
    from mrplip_core.testing.synthetic_corpus import write_synthetic_corpus

    return write_synthetic_corpus(tmp_path / "results", bags_per_slide=1)


def test_a_truncated_features_file_stops_pretraining_naming_it(corpus):
    from mrplip_core.data import DataSettings, build_bag_index

    paths = DataSettings(results=str(corpus)).paths()
    h5 = paths.image_features("synth_b")
    h5.write_bytes(h5.read_bytes()[:2000])
    with pytest.raises(OSError) as err:
        build_bag_index(paths, (5.0, 10.0))
    assert _case("features-truncated-h5") in str(err.value) and str(h5) in str(err.value)
    assert "'synth_b'" in str(err.value) and "rerun `snakemake features`" in str(err.value)


def test_features_of_another_width_stop_pretraining_naming_the_file(corpus):
    import h5py

    from mrplip_core.data import DataSettings, build_bag_index

    paths = DataSettings(results=str(corpus)).paths()
    h5 = paths.image_features("synth_c")
    with h5py.File(h5, "a") as f:  # a file of a 16-dim encoder under this encoder's name
        for g in list(f):
            feats = f[g]["features"][()]
            del f[g]["features"]
            f[g].create_dataset("features", data=feats[:, :16])
    with pytest.raises(ValueError) as err:
        build_bag_index(paths, (5.0, 10.0))
    assert _case("features-wrong-dim") in str(err.value) and str(h5) in str(err.value)
    with h5py.File(h5, "a") as f:
        f.attrs["dim"] = 16  # the file says 16 too: now the other slides disagree
    with pytest.raises(ValueError, match=r"32-dim for most slides but 16-dim for slide 'synth_c'"):
        build_bag_index(paths, (5.0, 10.0))


# -- captions server ---------------------------------------------------------------------------
def test_bad_answers_of_the_captions_server_are_recorded_per_patch(shared_data, tmp_path):
    from aiohttp import web
    from test_captions_support import FakeOpenAI, make_tiles

    from mrplip_core.captions.openai_backend import PATCH_HEADER
    from mrplip_core.captions.run import SlideJob, caption_slides
    from mrplip_core.captions.settings import CaptionSettings

    results = make_tiles(shared_data, tmp_path / "results")
    ids = list(pd.read_parquet(results / "tiles" / "CMU1.parquet")["patch_id"])
    long_caption = "Dense tumour cells. " * 5000  # 100,000 characters

    def completion(content: str) -> str:
        import json

        return json.dumps({"choices": [{"index": 0, "finish_reason": "stop",
                                        "message": {"role": "assistant", "content": content}}]})

    answers = {ids[1]: "{not json", ids[2]: completion(""), ids[3]: completion(long_caption)}

    class Scripted(FakeOpenAI):
        async def _chat(self, request: web.Request) -> web.StreamResponse:
            pid = request.headers.get(PATCH_HEADER, "?")
            if pid in answers:
                self.requests.append(pid)
                return web.Response(text=answers[pid], content_type="application/json")
            return await super()._chat(request)

    srv = Scripted().start()
    try:
        srv.fail_status = {ids[0]: [500] * 10}
        settings = CaptionSettings.from_dict({
            "backend": "openai", "io_threads": 2, "max_error_fraction": 0.5,
            "openai": {"base_url": srv.base_url, "concurrency": 4, "backoff_s": 0.01, "max_retries": 2}})
        caption_slides([SlideJob.under(results, "CMU1")], settings)
    finally:
        srv.stop()
    df = pd.read_parquet(results / "captions" / "CMU1.parquet").set_index("patch_id")
    for case_id, pid in zip(("caption-http-500", "caption-malformed-json", "caption-empty"), ids):
        assert pd.isna(df.loc[pid, "caption"]) and _case(case_id) in df.loc[pid, "error"], (case_id, df.loc[pid])
    assert df.loc[ids[3], "caption"] == long_caption.strip() and pd.isna(df.loc[ids[3], "error"])
    assert df.error.notna().sum() == 3 and len(df) == len(ids)  # every other patch captioned
