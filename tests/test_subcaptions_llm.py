"""The LLM sub-caption splitter (pathflip.subcaptions.method: llm): answers of an in-process
OpenAI-compatible server, the rules as the fallback of an invalid answer, the workflow job that
starts its own server, and (slow) a real vLLM server with a random-weight model."""

from __future__ import annotations

import json
import sys
import textwrap
from pathlib import Path

import pandas as pd
import pytest
import yaml
from test_captions_support import FakeOpenAI
from test_features_workflow import snakemake

from mrplip_core.cli import main
from mrplip_core.io.atomic import write_parquet
from mrplip_core.pathflip.captions import slide_captions
from mrplip_core.pathflip.llm_split import LLMRequestError, LLMSplitter, findings_schema
from mrplip_core.pathflip.plan import SubcaptionsPlan
from mrplip_core.pathflip.settings import SubcaptionSettings
from mrplip_core.pathflip.subcaptions import COLUMNS, subcaption_table

REPO = Path(__file__).resolve().parents[1]
TESTS = Path(__file__).resolve().parent

CAPTIONS = {
    "S1": "A tumour is present in the upper left region, and the stroma is fibrotic. Necrosis is absent.",
    "S2": "Invasive ductal carcinoma, grade 2, measures 1.5 cm. The surgical margins are free of tumour.",
    "S3": "Benign prostatic tissue with nodular hyperplasia. No carcinoma is identified.",
    "S4": "Lymph nodes show no metastasis; the capsule is intact.",
}


def caption_of(req: dict) -> str:
    """The caption inside a splitter request (after the instruction)."""
    return req["messages"][0]["content"].split("Report:\n", 1)[1]


def findings(*texts: str) -> str:
    return json.dumps({"findings": [{"text": t} for t in texts]})


def llm_settings(base_url: str, **llm) -> SubcaptionSettings:
    openai = {"base_url": base_url, "concurrency": 2, "max_retries": 2, "backoff_s": 0.01, **llm.pop("openai", {})}
    return SubcaptionSettings.from_dict({"method": "llm", "llm": {**llm, "openai": openai}})


@pytest.fixture
def fake():
    srv = FakeOpenAI(model="fake-text-llm").start()
    yield srv
    srv.stop()


def test_valid_answers_become_spans_and_a_rephrased_finding_has_none(fake) -> None:
    fake.answer = lambda sid, req: {
        # two verbatim quotes and one rephrased finding
        "S1": findings("A tumour is present in the upper left region", "the stroma is fibrotic",
                       "Tumour cells are absent from the necrotic areas"),
        "S4": findings("  Lymph nodes show no metastasis  ", "the capsule is intact"),
    }[sid]
    with LLMSplitter(llm_settings(fake.base_url)) as splitter:
        assert splitter.model == "fake-text-llm"
        tables = splitter.split({sid: CAPTIONS[sid] for sid in ("S1", "S4")})
    s1 = tables["S1"]
    assert list(s1.columns) == COLUMNS
    assert list(s1["text"]) == ["A tumour is present in the upper left region", "the stroma is fibrotic",
                                "Tumour cells are absent from the necrotic areas"]
    assert (s1["method"] == "llm").all() and s1["fallback_reason"].isna().all()
    assert list(s1["subcaption_id"]) == ["S1_sc000", "S1_sc001", "S1_sc002"]
    for text, start, end in zip(s1["text"][:2], s1["start"][:2], s1["end"][:2]):
        assert CAPTIONS["S1"][start:end] == text
    assert pd.isna(s1.loc[2, "start"]) and pd.isna(s1.loc[2, "end"])  # not in the caption: no span
    s4 = tables["S4"]
    assert list(s4["text"]) == ["Lymph nodes show no metastasis", "the capsule is intact"]  # trimmed
    assert list(s4["start"]) == [0, CAPTIONS["S4"].index("the capsule")]
    # the request: text only, the caption after the instruction, the answer's schema as response_format
    req = fake.bodies["S1"]
    assert caption_of(req) == CAPTIONS["S1"] and req["model"] == "fake-text-llm" and req["max_tokens"] == 2048
    assert req["response_format"] == {"type": "json_schema", "json_schema": {
        "name": "findings", "schema": findings_schema(32, 500), "strict": True}}


def test_an_invalid_answer_falls_back_to_the_rules_for_that_slide_only(fake) -> None:
    fake.answer = lambda sid, req: {
        "S1": "Sure! Here are the findings: tumour, stroma.",  # not JSON
        "S2": json.dumps({"findings": []}),
        "S3": findings("Benign prostatic tissue with nodular hyperplasia", "carcinoma"),  # one word
        "S4": findings("Lymph nodes show no metastasis", "the capsule is intact"),
    }[sid]
    settings = llm_settings(fake.base_url, structured_output=False)
    with LLMSplitter(settings) as splitter:
        tables = splitter.split(CAPTIONS)
    reasons = {sid: t["fallback_reason"].iloc[0] for sid, t in tables.items()}
    assert reasons["S1"].startswith("not JSON (") and "Sure! Here are" in reasons["S1"]
    assert reasons["S2"] == "the answer lists no findings"
    assert reasons["S3"] == "finding 1 has fewer than 2 word(s): 'carcinoma'"
    assert pd.isna(reasons["S4"]) and (tables["S4"]["method"] == "llm").all()
    for sid in ("S1", "S2", "S3"):
        rules = subcaption_table(sid, CAPTIONS[sid])
        got = tables[sid]
        assert (got["method"] == "rules-fallback").all() and got["fallback_reason"].notna().all()
        pd.testing.assert_frame_equal(got.drop(columns=["method", "fallback_reason"]),
                                      rules.drop(columns=["method", "fallback_reason"]))
    assert "response_format" not in fake.bodies["S1"]  # structured_output: false


def write_captions(results: Path, captions: dict[str, str | None]) -> None:
    table = pd.DataFrame({"slide_id": list(captions), "path": "x.svs", "caption": list(captions.values())}
                         ).set_index("slide_id", drop=False)
    write_parquet(slide_captions(table, None, max_chars=10_000), results / "slide_captions.parquet")


def test_http_500_fails_the_job_naming_the_slide_and_keeps_the_answered_ones(fake, tmp_path, capsys) -> None:
    fake.answer = lambda sid, req: findings(caption_of(req))
    fake.fail_status = {"S2": [500] * 10}
    settings = llm_settings(fake.base_url)
    with pytest.raises(LLMRequestError, match=r"^slide S2: failed after 3 attempts: HTTP 500") as err:
        with LLMSplitter(settings) as splitter:
            splitter.split({"S1": CAPTIONS["S1"], "S2": CAPTIONS["S2"]})
    assert set(err.value.tables) == {"S1"} and fake.counts()["S2"] == 3  # retried, then reported

    # the verb: the answered slides and the one without a caption are written, the job fails
    results = tmp_path / "results"
    write_captions(results, {"S1": CAPTIONS["S1"], "S2": CAPTIONS["S2"], "S5": None})
    arg = json.dumps({"pathflip": {"subcaptions": {"method": "llm", "llm": {"openai": {"base_url": fake.base_url,
                                                                                   "max_retries": 0}}}}})
    rc = main(["subcaptions", "S1", "S2", "S5", "--results", str(results), "--settings", arg])
    out, errtext = capsys.readouterr()
    assert rc == 1 and "slide S2: failed after 1 attempts: HTTP 500" in errtext
    assert "S1: 1 sub-captions (llm)" in out and "S5: none (missing)" in out
    assert (results / "subcaptions" / "S1.parquet").exists() and not (results / "subcaptions" / "S2.parquet").exists()
    assert pd.read_parquet(results / "subcaptions" / "S5.parquet").empty


def test_settings_and_rerun_triggers() -> None:
    with pytest.raises(ValueError, match=r"method 'llm' needs pathflip.subcaptions.llm.model"):
        SubcaptionSettings.from_dict({"method": "llm"})
    with pytest.raises(ValueError, match=r"pathflip.subcaptions.method must be one of \['rules', 'llm'\]"):
        SubcaptionSettings.from_dict({"method": "gpt"})
    with pytest.raises(ValueError, match=r"unknown key\(s\) in pathflip.subcaptions.llm.openai.server: \['cmd'\]"):
        SubcaptionSettings.from_dict({"method": "llm", "llm": {"model": "m", "openai": {"server": {"cmd": "x"}}}})
    config = yaml.safe_load((REPO / "config.yaml").read_text())
    rules = SubcaptionsPlan.from_config(config)
    # the default (rules) trigger and resources are those of the rules-only stage
    assert rules.subcaptions_trigger == '{"method": "rules", "split_clauses": true, "min_words": 2}'
    assert rules.subcaptions_resources == {"mem_mb": 2000, "runtime": 10, "gpu": 0}

    def plan(**llm) -> SubcaptionsPlan:
        sub = {**config["pathflip"]["subcaptions"], "method": "llm"}
        sub["llm"] = {**sub["llm"], "model": "/models/qwen", **llm}
        return SubcaptionsPlan.from_config({"pathflip": {**config["pathflip"], "subcaptions": sub}})

    base = plan()
    assert base.subcaptions_resources == {"mem_mb": 16000, "runtime": 120, "gpu": 1}  # it starts a server
    assert plan(openai={"concurrency": 8, "request_timeout_s": 5}).subcaptions_trigger == base.subcaptions_trigger
    assert plan(prompt="List the findings.").subcaptions_trigger != base.subcaptions_trigger
    assert plan(structured_output=False).subcaptions_trigger != base.subcaptions_trigger
    assert plan(openai={"base_url": "http://gpu:8000/v1"}).subcaptions_resources["gpu"] == 0


# A stand-in for `vllm serve`: the project's fake OpenAI server on the given port, answering
# every slide with its caption's sentences, except slide BAD (not JSON).
STAND_IN = textwrap.dedent("""
    import json, re, sys, time
    sys.path.insert(0, {tests!r})
    from test_captions_support import FakeOpenAI

    def answer(sid, req):
        if sid == "BAD":
            return "no JSON here"
        caption = req["messages"][0]["content"].split("Report:\\n", 1)[1]
        return json.dumps({{"findings": [{{"text": s}} for s in re.split(r"(?<=\\.) ", caption)]}})

    srv = FakeOpenAI(port=int(sys.argv[1]), model=sys.argv[2]).start()
    srv.answer = answer
    print("stand-in serving", sys.argv[2], flush=True)
    time.sleep(3600)
""")


def test_snakemake_llm_job_starts_and_stops_its_own_server(tmp_path: Path) -> None:
    """`snakemake subcaptions` with method llm and no base_url: one job for the shard starts the
    configured server command, splits both slides (one falls back), and stops the server."""
    script = tmp_path / "serve.py"
    script.write_text(STAND_IN.format(tests=str(TESTS)))
    config = yaml.safe_load((REPO / "config.yaml").read_text())
    config.update(slides="slides.tsv", demo=[])
    config["pathflip"]["captions"] = "captions.tsv"
    config["pathflip"]["subcaptions"].update(method="llm", slides_per_job=2, llm={
        "model": str(tmp_path / "tiny-text-model"), "openai": {"server": {
            "command": f"{sys.executable} {script} {{port}} {{name}}", "startup_timeout_s": 120}}})
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    (tmp_path / "slides.tsv").write_text("slide_id\tpath\nS1\tS1.svs\nBAD\tBAD.svs\n")
    (tmp_path / "captions.tsv").write_text(f"slide_id\tcaption\nS1\t{CAPTIONS['S2']}\nBAD\t{CAPTIONS['S3']}\n")
    out = snakemake(tmp_path, "subcaptions")
    assert "(Rule: subcaptions_llm_shard_0)" in out and "runtime=120, gpu=1, mem_mb=16000" in out, out[-2000:]
    s1 = pd.read_parquet(tmp_path / "results" / "subcaptions" / "S1.parquet")
    assert list(s1["text"]) == ["Invasive ductal carcinoma, grade 2, measures 1.5 cm.",
                                "The surgical margins are free of tumour."]
    assert list(s1["method"]) == ["llm", "llm"] and list(s1["start"]) == [0, CAPTIONS["S2"].index("The surgical")]
    bad = pd.read_parquet(tmp_path / "results" / "subcaptions" / "BAD.parquet")
    assert (bad["method"] == "rules-fallback").all() and bad["fallback_reason"].str.startswith("not JSON").all()
    log = (tmp_path / "logs" / "subcaptions" / "shard_0.log").read_text()
    assert "server healthy at http://127.0.0.1:" in log and "stopping server" in log
    assert "BAD: 2 sub-captions (rules-fallback: not JSON" in log
    server_logs = list((tmp_path / "logs" / "subcaptions").glob("vllm-server-*.log"))
    assert server_logs and "stand-in serving tiny-text-model" in server_logs[0].read_text()
    assert "Nothing to be done" in snakemake(tmp_path, "-n", "subcaptions")


@pytest.mark.slow
def test_real_vllm_structured_output_is_valid_json_and_free_text_falls_back(vllm_server, tmp_path) -> None:
    """The tiny random-weight LLaVA served by vLLM, asked text-only. With the JSON schema as
    response_format every answer is valid (method llm); without it the model writes random text,
    and each slide falls back to the rules, with the reason recorded."""
    base_url = vllm_server.base + "/v1"
    # short limits: a random model fills every string to maxLength; the prompt and answer must
    # fit the test server's --max-model-len 512
    small = {"max_findings": 3, "max_finding_chars": 40, "max_tokens": 160}
    results = tmp_path / "results"
    captions = {sid: CAPTIONS[sid] for sid in ("S1", "S2", "S3")}
    write_captions(results, captions)

    def run(structured: bool) -> dict[str, pd.DataFrame]:
        sub = {"method": "llm", "min_words": 1, "slides_per_job": 3,
               "llm": {**small, "structured_output": structured, "openai": {"base_url": base_url, "concurrency": 3}}}
        arg = json.dumps({"pathflip": {"subcaptions": sub}})
        assert main(["subcaptions", *captions, "--results", str(results), "--settings", arg]) == 0
        return {sid: pd.read_parquet(results / "subcaptions" / f"{sid}.parquet") for sid in captions}

    for sid, df in run(structured=True).items():
        assert len(df) >= 1 and (df["method"] == "llm").all() and df["fallback_reason"].isna().all(), (sid, df)
        assert (df["text"].str.len() <= 40).all()  # the schema's maxLength held
        for text, start, end in zip(df["text"], df["start"], df["end"]):  # a span only where it is one
            assert pd.isna(start) or CAPTIONS[sid][start:end] == text
    for sid, df in run(structured=False).items():
        assert (df["method"] == "rules-fallback").all(), (sid, df)
        assert "not JSON" in df["fallback_reason"].iloc[0]
        assert list(df["text"]) == list(subcaption_table(sid, CAPTIONS[sid])["text"])


def test_a_raw_control_character_inside_a_string_is_accepted() -> None:
    """xgrammar 0.2.8 lets a model write control characters into a JSON string unescaped."""
    from mrplip_core.pathflip.llm_split import InvalidAnswer, parse_findings

    got = parse_findings('{"findings":[{"text":"margins are\x07 free"}]}', "The margins are free.", min_words=2)
    assert [(f.text, f.start, f.end) for f in got] == [("margins are\x07 free", None, None)]
    with pytest.raises(InvalidAnswer, match="no 'findings' list"):
        parse_findings('[{"text": "margins are free"}]', "The margins are free.", min_words=2)
