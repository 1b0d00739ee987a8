"""The kill test: the default workflow SIGKILLed at random moments, rerun, compared with one clean run.

:func:`kill_test` is what ``tests/test_kill_workflow.py`` (``pytest -m slow -k killed_workflow``)
and ``bench/kill_workflow.py`` run:

1. **Reference.** A small workdir (:func:`make_workdir`: the shipped config and demo slide table,
   smaller tiling and training, captions from :class:`~mrplip_core.testing.fake_openai.FakeOpenAI`,
   which counts requests per patch) runs ``snakemake --cores 2`` once, uninterrupted. The time
   every job starts and finishes (read from Snakemake's log as it is written) gives each stage's
   window and the length of its jobs.
2. **Kills.** A second workdir runs the same command. Each kill targets a stage: any stage no kill
   has hit yet (jobs run side by side, so a stage can finish before its turn would come), then
   stages drawn with the seed. Once a job of the target is running, a seeded moment later the
   whole process group (Snakemake is started with ``start_new_session=True``) gets SIGKILL: within
   the first half of the stage's shortest job in the reference for a stage not hit yet (a job can
   run faster than in the reference, and a stage of one job has no second chance), within its
   median job length for the drawn ones. A target whose jobs all finished before the moment came
   is not killed late in another stage: the kill is aimed again. The jobs running at that moment are
   recorded; processes of the workdir still alive one second later are counted (and killed).
   Then the rerun the README prescribes: ``snakemake --unlock``, ``snakemake --cores 2
   --rerun-incomplete``, which the next kill interrupts in turn; after the last kill it runs to
   the end.
3. **Comparison.** Every file under both ``results/`` folders, by content (:func:`compare_results`):
   Parquet and CSV as tables, HDF5 dataset by dataset with their attrs, JSON and YAML as data, torch
   checkpoints (``.pt``, loaded with ``weights_only=True``) tensor by tensor (torch writes a
   fresh serialization id, and pickle's bytes depend on which equal strings happen to be one
   object, so two equal checkpoints can differ in bytes),
   every other file byte for byte, each without the run-specific parts below.

Run-specific, and so left out of the comparison (nothing else is):

- columns and keys :data:`RUN_SPECIFIC_KEYS` and every rate (``*_per_s``): wall-clock times,
  durations, throughput, hosts, pids (``elapsed_s``, ``loader_wait_s``, ``bags_per_s``,
  ``created``, ...), wherever they occur (Parquet and CSV columns, JSON/YAML keys at any depth,
  HDF5 attrs);
- the workdir's own path inside values (the slide table's resolved ``path``): read as the
  reference's;
- :data:`RUN_SPECIFIC_PATHS`: TensorBoard event files (wall times inside) and the HTML report
  (it prints the run's time), which are checked to exist in both runs, not compared.

Also reported: stages hit, caption requests (total against the reference, and requests for a patch
whose caption was already stored in a part or final file at an earlier kill: must be 0), outputs of
jobs Snakemake had seen finish that were written again (inode or mtime changed: must be 0; the
features files among them are counted on their own), temporary files left under ``results/``
(the names :mod:`mrplip_core.io.atomic` and the captions parts use: must be 0), surviving processes
(0), and files missing from or extra in the killed run.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import re
import shutil
import signal
import statistics
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import yaml

from mrplip_core.layout import Layout
from mrplip_core.testing.fake_openai import FakeOpenAI

REPO = Path(__file__).resolve().parents[2]

#: The stages of the default target ``all``, in pipeline order.
STAGES = ("tiles", "captions", "features", "pretrain", "subcaptions", "pathflip", "evaluate", "report")

#: Columns and keys whose values depend on the run (time, speed, machine), not on the data.
RUN_SPECIFIC_KEYS = frozenset({
    "elapsed_s", "elapsed", "duration_s", "seconds", "time", "time_s", "wall_time", "walltime", "timestamp",
    "created", "created_at", "date", "started", "finished", "start_time", "end_time", "hostname", "host", "node",
    "pid", "patches_per_s", "images_per_s", "samples_per_s", "steps_per_s", "items_per_s", "throughput",
    "data_time", "compute_time", "step_time", "data_s", "compute_s", "step_s", "data_wait", "lr_time",
    "loader_wait_s", "slides_per_s", "bags_per_s", "pairs_per_s",
})
#: Files (relative to results/, glob patterns) whose content holds the run's wall time.
RUN_SPECIFIC_PATHS = ("**/tensorboard/*", "report/index.html")
#: Names of temporary files (io/atomic.py: ``.{name}.*.tmp{suffix}``; captions parts:
#: ``.part-N.tmp``, ``.final.parquet.tmp``).
TEMP_NAME = re.compile(r"(^\..*\.tmp)|(\.tmp$)|(\.tmp\.)")


def stage_of(rule: str) -> str | None:
    """The stage (:data:`STAGES`) a rule belongs to; None for the aggregate targets."""
    if rule in ("demo_slide", "slides_table") or rule.startswith("tiles_"):
        return "tiles"
    for prefix, stage in (("captions_", "captions"), ("keywords_", "captions"), ("features_", "features"),
                          ("text_features_", "features"), ("pretrain", "pretrain"), ("slide_captions", "subcaptions"),
                          ("subcaptions_", "subcaptions"), ("pathflip", "pathflip"), ("eval_", "evaluate"),
                          ("html_report", "report")):
        if rule.startswith(prefix):
            return stage
    return None


# -- the workdir -------------------------------------------------------------------------------------
def make_workdir(dst: Path, base_url: str) -> Path:
    """A workdir for the default run: the shipped config.yaml and demo slide table, with fewer
    parents per slide, shorter training that checkpoints every 2 steps (so a kill can land between
    checkpoints and the rerun resumes) and captions from the server at ``base_url``."""
    cfg = yaml.safe_load((REPO / "config.yaml").read_text())
    cfg["tiling"]["n_parents"] = 2
    cfg["captions"].update(backend="openai", model="fake-llava", flush_rows=8, flush_seconds=1)
    cfg["captions"]["openai"].update(base_url=base_url, concurrency=4)
    for section in (cfg["pretrain"], cfg["pathflip"]):
        section["train"].update(steps=4, save_every=2, tensorboard=False)
        section["data"]["batch_size"] = 2
    cfg["pretrain"]["data"]["max_caption_tokens"] = 32
    cfg["pathflip"]["data"]["patches_per_slide"] = 64
    dst.mkdir(parents=True, exist_ok=True)
    (dst / "config.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    (dst / "demo").mkdir(exist_ok=True)
    shutil.copy(REPO / "demo" / "slides.tsv", dst / "demo" / "slides.tsv")
    return dst


def snakemake_command(workdir: Path, *args: str) -> list[str]:
    """``snakemake --cores 2 ARGS`` on ``workdir`` (the README's command, with -s/-d)."""
    return [sys.executable, "-m", "snakemake", "-s", str(REPO / "workflow" / "Snakefile"), "-d", str(workdir),
            "--cores", "2", *args]


def _env() -> dict[str, str]:
    env = dict(os.environ)
    # the jobs run `python -m mrplip_core`: import this checkout's package
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH", "")) if p)
    return env


# -- watching Snakemake's log --------------------------------------------------------------------------
@dataclass
class Job:
    jobid: int
    rule: str
    outputs: list[str] = field(default_factory=list)
    start: float = 0.0
    end: float | None = None


class LogWatch:
    """Jobs started and finished, read from a Snakemake log file as it grows (times: seconds
    since ``t0``, when each line was first seen)."""

    def __init__(self, path: Path, t0: float) -> None:
        self.path, self.t0 = path, t0
        self.jobs: dict[int, Job] = {}
        self._lines = 0
        self._rule: str | None = None
        self._outputs: list[str] = []
        self.planned: dict[str, int] | None = None  # rule -> jobs, from the first "Job stats:" table
        self._stats = False

    def poll(self) -> None:
        now = time.monotonic() - self.t0
        lines = self.path.read_text(errors="replace").splitlines() if self.path.exists() else []
        for line in lines[self._lines:]:
            if line.startswith("Job stats:") and self.planned is None:
                self.planned, self._stats = {}, True
            elif self._stats and (m := re.match(r"^(\w+)\s+(\d+)$", line)):
                if m.group(1) != "total":
                    self.planned[m.group(1)] = int(m.group(2))
                else:
                    self._stats = False
            if m := re.match(r"^(?:local)?rule (\w+):$", line):
                self._rule, self._outputs = m.group(1), []
            elif m := re.match(r"^\s+output: (.*)$", line):
                self._outputs = [s.strip() for s in m.group(1).split(",")]
            elif (m := re.match(r"^\s+jobid: (\d+)$", line)) and self._rule:
                jid = int(m.group(1))
                self.jobs[jid] = Job(jid, self._rule, self._outputs, now)
                self._rule = None
            elif m := re.match(r"^Finished jobid: (\d+)", line):
                if int(m.group(1)) in self.jobs:
                    self.jobs[int(m.group(1))].end = now
        self._lines = len(lines)

    def running(self) -> list[Job]:
        return [j for j in self.jobs.values() if j.end is None]

    def finished(self) -> list[Job]:
        return [j for j in self.jobs.values() if j.end is not None]


def _start(workdir: Path, log: Path, *args: str) -> subprocess.Popen:
    fh = open(log, "w")
    try:
        return subprocess.Popen(snakemake_command(workdir, *args), stdout=fh, stderr=subprocess.STDOUT, env=_env(),
                                start_new_session=True)
    finally:
        fh.close()


def _run(workdir: Path, log: Path, *args: str, timeout: float = 1800) -> LogWatch:
    proc = _start(workdir, log, *args)
    watch = LogWatch(log, time.monotonic())
    try:
        while proc.poll() is None:
            watch.poll()
            if time.monotonic() - watch.t0 > timeout:
                raise TimeoutError(f"snakemake {' '.join(args)} on {workdir} ran over {timeout} s")
            time.sleep(0.1)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    watch.poll()
    if proc.returncode != 0:
        raise RuntimeError(f"snakemake {' '.join(args)} failed ({proc.returncode}); see {log}:\n"
                           + log.read_text()[-4000:])
    return watch


def _unlock(workdir: Path, log: Path) -> None:
    proc = subprocess.run(snakemake_command(workdir, "--unlock"), capture_output=True, text=True, env=_env(),
                          timeout=600)
    log.write_text(proc.stdout + proc.stderr)
    if proc.returncode != 0:
        raise RuntimeError(f"snakemake --unlock failed:\n{proc.stderr[-3000:]}")


# -- processes of a workdir ----------------------------------------------------------------------------
def processes_in(workdir: Path) -> list[tuple[int, str]]:
    """Processes (pid, command line) whose working directory is ``workdir`` or below it (every job
    of a Snakemake run with ``-d workdir``), other than this one."""
    found, root = [], str(workdir.resolve())
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cwd = os.readlink(entry / "cwd")
            if cwd == root or cwd.startswith(root + "/"):
                cmd = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
                found.append((int(entry.name), cmd))
        except OSError:
            continue
    return found


# -- what is stored ------------------------------------------------------------------------------------
def stored_caption_ids(results: Path) -> set[str]:
    """Patch ids whose caption is stored: in a part, the kept final link or a final captions file."""
    import pyarrow.parquet as pq

    ids: set[str] = set()
    folder = Layout(results).captions("any").parent
    for path in [*folder.glob("*.parquet"), *folder.glob("*.parts/*.parquet")]:
        try:
            t = pq.read_table(path, columns=["patch_id", "error"]).to_pandas()
        except (OSError, ValueError):
            continue
        ids.update(t.loc[t["error"].isna(), "patch_id"])
    return ids


def temp_files(results: Path) -> list[str]:
    """Temporary files left under ``results`` (see :data:`TEMP_NAME`)."""
    return sorted(str(p.relative_to(results)) for p in results.rglob("*") if p.is_file() and TEMP_NAME.search(p.name))


def _stamp(path: Path) -> tuple[int, int] | None:
    try:
        st = path.stat()
    except OSError:
        return None
    return st.st_ino, st.st_mtime_ns


# -- comparison ----------------------------------------------------------------------------------------
def _run_specific(key: Any) -> bool:
    """A run-specific column or key: in :data:`RUN_SPECIFIC_KEYS`, or a rate (``*_per_s``)."""
    return key in RUN_SPECIFIC_KEYS or str(key).endswith("_per_s")


#: (this workdir, the reference's): paths in the compared data are read with the first replaced.
WORKDIRS: list[tuple[str, str]] = []


def _same_root(v: Any) -> Any:
    if isinstance(v, str):
        for mine, ref in WORKDIRS:
            v = v.replace(mine, ref)
    return v


def _drop_keys(obj: Any) -> Any:
    if isinstance(obj, str):
        return _same_root(obj)
    if isinstance(obj, dict):
        return {k: _drop_keys(v) for k, v in obj.items() if not _run_specific(k)}
    if isinstance(obj, list):
        return [_drop_keys(v) for v in obj]
    return obj


def _frames_equal(a: pd.DataFrame, b: pd.DataFrame) -> str | None:
    a = a.drop(columns=[c for c in a.columns if _run_specific(c)])
    b = b.drop(columns=[c for c in b.columns if _run_specific(c)])
    for c in b.columns:
        if b[c].dtype == object or pd.api.types.is_string_dtype(b[c].dtype):
            b[c] = b[c].map(_same_root, na_action="ignore").astype(b[c].dtype)
    try:
        pd.testing.assert_frame_equal(a, b, check_exact=True)
    except AssertionError as exc:
        return str(exc).splitlines()[0] + " " + " ".join(str(exc).splitlines()[1:4])
    return None


def _h5_equal(a: Path, b: Path) -> str | None:
    import h5py

    def attrs(obj: Any) -> dict[str, Any]:
        out = {}
        for k, v in obj.attrs.items():
            if _run_specific(k):
                continue
            out[k] = v.tolist() if isinstance(v, np.ndarray) else v
        return out

    with h5py.File(a, "r") as fa, h5py.File(b, "r") as fb:
        names_a, names_b = [], []
        fa.visit(names_a.append)
        fb.visit(names_b.append)
        if names_a != names_b:
            return f"objects differ: {sorted(set(names_a) ^ set(names_b))[:5]}"
        if attrs(fa) != attrs(fb):
            return "root attrs differ: " + str({k for k in attrs(fa) if attrs(fa).get(k) != attrs(fb).get(k)})
        for name in names_a:
            oa, ob = fa[name], fb[name]
            if attrs(oa) != attrs(ob):
                return f"{name}: attrs differ"
            if isinstance(oa, h5py.Dataset):
                va, vb = oa[()], ob[()]
                if va.dtype != vb.dtype or va.shape != vb.shape:
                    return f"{name}: {va.dtype}{va.shape} vs {vb.dtype}{vb.shape}"
                if va.dtype.kind == "f":
                    same = np.array_equal(va, vb, equal_nan=True)
                else:
                    same = np.array_equal(va, vb)
                if not same:
                    return f"{name}: values differ"
    return None


def _same_data(x: Any, y: Any, where: str = "") -> str | None:
    """Where two loaded objects differ (tensors bit for bit, mappings by key), or None."""
    import torch

    if isinstance(x, torch.Tensor) or isinstance(y, torch.Tensor):
        same = (isinstance(x, torch.Tensor) and isinstance(y, torch.Tensor) and x.dtype == y.dtype
                and x.shape == y.shape and torch.equal(x, y))
        return None if same else f"{where or 'tensor'} differs"
    if isinstance(x, dict) and isinstance(y, dict):
        if set(x) != set(y):
            return f"{where}: keys {sorted(map(str, set(x) ^ set(y)))[:5]}"
        return next((d for k in x if (d := _same_data(x[k], y[k], f"{where}.{k}"))), None)
    if isinstance(x, (list, tuple)) and isinstance(y, (list, tuple)):
        if len(x) != len(y):
            return f"{where}: length {len(x)} vs {len(y)}"
        return next((d for i, (u, v) in enumerate(zip(x, y)) if (d := _same_data(u, v, f"{where}[{i}]"))), None)
    return None if _drop_keys(x) == _drop_keys(y) else f"{where or 'value'} differs"


def compare_file(a: Path, b: Path) -> str | None:
    """None when the two files hold the same data (run-specific parts left out), else why not."""
    suffix = a.suffix.lower()
    if suffix == ".parquet":
        return _frames_equal(pd.read_parquet(a), pd.read_parquet(b))
    if suffix == ".csv":
        return _frames_equal(pd.read_csv(a), pd.read_csv(b))
    if suffix in (".h5", ".hdf5"):
        return _h5_equal(a, b)
    if suffix in (".json", ".geojson"):
        same = _drop_keys(json.loads(a.read_text())) == _drop_keys(json.loads(b.read_text()))
        return None if same else "JSON differs"
    if suffix in (".yaml", ".yml"):
        same = _drop_keys(yaml.safe_load(a.read_text())) == _drop_keys(yaml.safe_load(b.read_text()))
        return None if same else "YAML differs"
    if a.read_bytes() == b.read_bytes():
        return None
    if suffix == ".pt":  # a torch checkpoint: pickle's bytes depend on object identity, so compare what it holds
        import torch

        return _same_data(torch.load(a, weights_only=True), torch.load(b, weights_only=True))
    return "bytes differ"


def compare_results(ref: Path, other: Path) -> dict[str, Any]:
    """Every file under two results folders: compared, missing, extra, mismatches with the reason."""
    def files(root: Path) -> set[str]:
        return {str(p.relative_to(root)) for p in root.rglob("*") if p.is_file() and not TEMP_NAME.search(p.name)}

    WORKDIRS[:] = [(str(other.parent.resolve()), str(ref.parent.resolve()))]
    fa, fb = files(ref), files(other)
    run_specific = {f for f in fa | fb if any(Path(f).match(g) for g in RUN_SPECIFIC_PATHS)}
    mismatches = {}
    for f in sorted((fa & fb) - run_specific):
        why = compare_file(ref / f, other / f)
        if why:
            mismatches[f] = why
    return {"compared": len((fa & fb) - run_specific), "run_specific_files": sorted(run_specific & fa & fb),
            "missing": sorted(fa - fb), "extra": sorted(fb - fa), "mismatches": mismatches}


# -- the test ------------------------------------------------------------------------------------------
@dataclass
class Kill:
    target: str
    at_s: float  # seconds into the attempt
    running: list[str]  # "rule[outputs]" of the jobs running at the kill
    stages: list[str]
    survivors: list[str]


def _plan_kills(n: int, rng: random.Random, order: list[str]) -> list[str]:
    """``n`` target stages: each of ``order`` once (when ``n`` allows), the rest drawn; in ``order``
    (the stages by their first job in the reference run: sub-captions run beside the tiles)."""
    targets = list(order) if n >= len(order) else rng.sample(order, n)
    targets += [rng.choice(order) for _ in range(max(0, n - len(order)))]
    return sorted(targets, key=order.index)


def _job_lengths(watch: LogWatch) -> dict[str, list[float]]:
    """Seconds each finished job of each stage ran (as seen in the log)."""
    out: dict[str, list[float]] = {}
    for j in watch.finished():
        if (stage := stage_of(j.rule)) is not None:
            out.setdefault(stage, []).append(j.end - j.start)
    return out


def _kill_delay(stage: str, lengths: dict[str, list[float]], first: bool, rng: random.Random) -> float:
    """Seconds after a job of ``stage`` is seen running to kill: in the first half of the shortest
    reference job when the stage is hit for the first time, else within the median job length."""
    v = lengths.get(stage) or [5.0]
    return rng.uniform(0.05, 0.5) * min(v) if first else rng.uniform(0.05, 1.0) * statistics.median(v)


def _pending_stages(watch: LogWatch) -> set[str]:
    """Stages with a job running, or planned in this attempt and not started yet."""
    started = Counter(j.rule for j in watch.jobs.values())
    out = {st for j in watch.running() if (st := stage_of(j.rule))}
    out |= {st for rule, n in (watch.planned or {}).items() if n > started[rule] and (st := stage_of(rule))}
    return out


def _is_features_file(output: str) -> bool:
    """Whether a workdir-relative output path is an image or text features file."""
    layout = Layout()  # the workdir's results/, as Snakemake names outputs
    folders = (layout.image_features("e", "s").parents[1], layout.text_features("e", "s").parents[1])
    return any(Path(output).is_relative_to(f) for f in folders)


def kill_test(root: Path, kills: int = 12, seed: int = 0, log=print) -> dict[str, Any]:
    """Run the kill test in ``root`` (two workdirs, ``ref`` and ``killed``); return the figures."""
    rng = random.Random(seed)
    root.mkdir(parents=True, exist_ok=True)
    srv = FakeOpenAI().start()
    try:
        return _kill_test(root, kills, rng, srv, log)
    finally:
        srv.stop()


def _kill_test(root: Path, n_kills: int, rng: random.Random, srv: FakeOpenAI, log) -> dict[str, Any]:
    ref_wd = make_workdir(root / "ref", srv.base_url)
    t0 = time.monotonic()
    ref = _run(ref_wd, ref_wd / "snakemake.log")
    ref_s = time.monotonic() - t0
    lengths = _job_lengths(ref)
    windows = {}
    for j in ref.finished():
        if (stage := stage_of(j.rule)) is not None:
            lo, hi = windows.get(stage, (j.start, j.end))
            windows[stage] = (min(lo, j.start), max(hi, j.end))
    ref_requests = Counter(srv.requests)
    log(f"reference: {ref_s:.0f} s, {len(ref.jobs)} jobs, {sum(ref_requests.values())} caption requests; "
        f"stage windows (s): " + ", ".join(f"{s} {w[0]:.0f}-{w[1]:.0f}" for s, w in windows.items()))

    wd = make_workdir(root / "killed", srv.base_url)
    results = wd / "results"
    srv.requests.clear()
    done: list[Kill] = []
    finished_stamps: dict[str, tuple[int, int]] = {}  # outputs of jobs Snakemake saw finish -> (inode, mtime)
    stored_at: list[tuple[int, set[str]]] = []  # (requests so far, patch ids stored) at each kill
    survivors_total = 0
    hit_so_far: set[str] = set()
    t_killed = time.monotonic()
    order = sorted(windows, key=lambda st: windows[st][0])
    for i, target in enumerate(_plan_kills(n_kills, rng, order)):
        logfile = wd / f"attempt_{i:02d}.log"
        args = () if i == 0 else ("--rerun-incomplete",)
        if i:
            _unlock(wd, wd / f"unlock_{i:02d}.log")
        proc = _start(wd, logfile, *args)
        watch = LogWatch(logfile, time.monotonic())
        kill_at, aimed = None, target
        while proc.poll() is None:
            watch.poll()
            unhit = [st for st in order if st not in hit_so_far]
            if kill_at is not None and aimed in unhit and time.monotonic() < kill_at \
                    and not any(stage_of(j.rule) == aimed for j in watch.running()):
                kill_at = None  # the target's job finished before its moment: aim again
            if kill_at is None and watch.planned is not None:
                now_running = [st for j in watch.running() if (st := stage_of(j.rule))]
                # the stages no kill has hit yet come first (jobs run side by side, so a stage can
                # finish before its turn); once all are hit, the drawn target; any stage when this
                # attempt has none of the wanted ones left to run
                pending = _pending_stages(watch)
                wanted = [st for st in (unhit or [target]) if st in pending]
                hits = [st for st in now_running if st in (unhit or [target])]
                if hits or (not wanted and now_running):
                    aimed = hits[0] if hits else now_running[0]
                    kill_at = time.monotonic() + _kill_delay(aimed, lengths, aimed in unhit, rng)
            if kill_at is not None and time.monotonic() >= kill_at:
                break
            time.sleep(0.05)
        watch.poll()
        running = watch.running()
        at = time.monotonic() - watch.t0
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        time.sleep(1.0)  # what dies with its parent (PR_SET_PDEATHSIG) has died by now
        alive = processes_in(wd)
        for pid, _ in alive:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        survivors_total += len(alive)
        stages = sorted({s for j in running if (s := stage_of(j.rule))}, key=STAGES.index)
        hit_so_far.update(stages)
        done.append(Kill(aimed, round(at, 2), [f"{j.rule}{j.outputs[:1]}" for j in running], stages,
                         [cmd[:120] for _, cmd in alive]))
        log(f"kill {i + 1}: target {aimed}, at {at:.1f} s, running {[j.rule for j in running]}, "
            f"survivors {len(alive)}" + "".join(f"\n  survivor: {cmd[:200]}" for _, cmd in alive))
        running_outputs = {o for j in running for o in j.outputs}
        for j in watch.finished():
            for o in j.outputs:
                if o not in running_outputs and o not in finished_stamps and (stamp := _stamp(wd / o)):
                    finished_stamps[o] = stamp
        stored_at.append((len(srv.requests), stored_caption_ids(results)))

    _unlock(wd, wd / "unlock_final.log")
    final = _run(wd, wd / "attempt_final.log", "--rerun-incomplete")
    killed_s = time.monotonic() - t_killed
    requests = list(srv.requests)
    # requests, after a kill, for a patch whose caption was stored when that kill happened
    repeated_stored = len({(k, pid) for k, (n, ids) in enumerate(stored_at) for pid in requests[n:] if pid in ids})
    rewritten = sorted(o for o, stamp in finished_stamps.items() if _stamp(wd / o) != stamp)
    comparison = compare_results(ref_wd / "results", results)
    hit = sorted({s for k in done for s in k.stages}, key=STAGES.index)
    return {
        "kills": len(done),
        "stages_hit": hit,
        "stages_missed": [s for s in STAGES if s not in hit],
        "kill_log": [k.__dict__ for k in done],
        "reference_s": round(ref_s, 1),
        "killed_and_rerun_s": round(killed_s, 1),
        "final_rerun_jobs": len(final.jobs),
        "artifacts_compared": comparison["compared"],
        "run_specific_files": comparison["run_specific_files"],
        "mismatches": comparison["mismatches"],
        "missing": comparison["missing"],
        "extra": comparison["extra"],
        "temp_files": temp_files(results),
        "survivors": survivors_total,
        "caption_requests": len(requests),
        "caption_requests_reference": sum(ref_requests.values()),
        "repeated_stored_caption_requests": repeated_stored,
        "finished_outputs_checked": len(finished_stamps),
        "finished_outputs_rewritten": rewritten,
        "features_computed_twice": [o for o in rewritten if _is_features_file(o)],
    }

