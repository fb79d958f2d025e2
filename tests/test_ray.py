"""The Ray executor (dolm.executor): sharded runs on a local Ray cluster equal the
in-process run, a killed worker is retried, bad input is a named error.

One local cluster for the module (2 CPUs, no dashboard), started by this process and
joined by each tool run with ``--ray-address``. Runs use ``--batch-size 1`` so that every
prompt is computed alone in both runs and the outputs can be compared exactly.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest

pytestmark = pytest.mark.slow  # a process per tool run and a cluster: start these first

# The module's cluster is local and short-lived: no token (Ray >= 2.59 asks drivers that
# join a local cluster for the token it generated; docs/ray.md says how to pass one).
ENV = dict(os.environ, OMP_NUM_THREADS="1", DOLM_PROGRESS="0", RAY_USAGE_STATS_ENABLED="0",
           HF_HUB_DISABLE_PROGRESS_BARS="1", RAY_AUTH_MODE="disabled")


def dolm(*args, env=None):
    return subprocess.run([str(a) for a in args], capture_output=True, text=True,
                          env=env or ENV)


@pytest.fixture(scope="module")
def cluster():
    ray = pytest.importorskip("ray")
    saved = os.environ.get("RAY_AUTH_MODE")
    os.environ["RAY_AUTH_MODE"] = "disabled"
    info = ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
                    configure_logging=False)
    address = info.address_info["gcs_address"]
    yield address
    ray.shutdown()
    if saved is None:
        os.environ.pop("RAY_AUTH_MODE", None)
    else:
        os.environ["RAY_AUTH_MODE"] = saved


@pytest.fixture(scope="module")
def kit(tiny_gpt2_dir, tmp_path_factory, in_process):
    d = tmp_path_factory.mktemp("ray")
    model = str(tiny_gpt2_dir)
    p = d / "prompts.parquet"
    r = in_process("dolm-gen-prompts", "factual", "--n", "12", "-o", p, "--model", model)
    assert r.returncode == 0, r.stderr
    vec = d / "v.npy"
    np.save(vec, np.random.default_rng(0).normal(size=32).astype("float32"))
    r = in_process("dolm-steer", "fit", p, "--model", model, "--method", "file", "--vector",
                   vec, "--sites", "resid_post.1", "-o", d / "dirs.safetensors")
    assert r.returncode == 0, r.stderr
    return d, model, p


def same_tables(a, b, exact=True):
    """Equal tables, row order included. ``exact=False`` (patch and ablate batch a shard's
    prompts or variants together, so padding differs from the whole run's batches): floats
    within 1e-4, and patch's recovery = (patched - corrupt) / (clean - corrupt) only where its
    denominator is not float noise."""
    x, y = pq.read_table(a).to_pandas(), pq.read_table(b).to_pandas()
    assert list(x["prompt_id"]) == list(y["prompt_id"])  # row order
    if exact:
        pd.testing.assert_frame_equal(x, y, check_exact=True)
        return
    assert list(x.columns) == list(y.columns) and list(x.dtypes) == list(y.dtypes)
    floats = [c for c in x.columns if x[c].dtype.kind == "f"]
    other = [c for c in x.columns if c not in floats]
    pd.testing.assert_frame_equal(x[other], y[other], check_exact=True)
    keep = np.ones(len(x), dtype=bool)
    if "corrupt_value" in x:
        den = (x["clean_value"] - x["corrupt_value"]).abs().to_numpy()
        keep = ~((x["metric"] == "recovery").to_numpy() & (den < 1e-3))
        assert keep.sum() > len(x) // 2
    for c in floats:
        np.testing.assert_allclose(x[c].to_numpy()[keep], y[c].to_numpy()[keep], rtol=1e-4,
                                   atol=1e-6, equal_nan=True, err_msg=c)


def same_h5(a, b):
    with h5py.File(a) as x, h5py.File(b) as y:
        assert sorted(x.keys()) == sorted(y.keys())
        for k in x:
            assert x[k].shape == y[k].shape and x[k].dtype == y[k].dtype, k
            assert np.array_equal(x[k][()], y[k][()]), k


def executor_entry(path):
    prov = json.loads(pq.read_schema(path).metadata[b"dolm.provenance"])
    assert sum(1 for e in prov if (e.get("params") or {}).get("executor")) == 1
    return prov[-1]["params"]["executor"]


def valid(*paths):
    r = dolm("dolm-validate", *paths)
    assert r.returncode == 0, r.stdout + r.stderr


def local_then_ray(in_process, argv, files, ray_files, ray_opts):
    """The in-process run (the same click command, this process) into ``files`` and the
    real executable on Ray into ``ray_files``; ``argv[0]`` is the executable, then its
    arguments; ``files``: [(option, path)] of the outputs."""
    r = in_process(*argv, *[x for o, f in files for x in (o, f)])
    assert r.returncode == 0, (argv[0], "local", r.stderr)
    r = dolm(*argv, *[x for o, f in ray_files for x in (o, f)], *ray_opts)
    assert r.returncode == 0, (argv[0], "ray", r.stderr)


PRIMARY = {  # name -> (argv, output options, suffixes)
    "collect": (["dolm-collect-acts", "--sites", "resid_post.*,head.1.*", "--positions",
                 "last,subject"], ("-o", "--acts"), (".parquet", ".h5")),
    "patch": (["dolm-patch", "--sites", "resid_pre,attn_out", "--positions", "last"],
              ("-o", "--summary"), (".parquet", ".parquet")),
    "ablate": (["dolm-ablate", "--components", "head.0.1,mlp_out.1,layer.2", "--kind",
                "zero,mean"], ("-o",), (".parquet",)),
}


@pytest.mark.parametrize("name", list(PRIMARY))
def test_collect_patch_ablate_on_ray_equal_in_process(cluster, kit, in_process, name):
    d, model, p = kit
    (exe, *opts_), opts, exts = PRIMARY[name]
    argv = [exe, p, "--model", model, "--batch-size", "1", *opts_]
    ray_opts = ["--executor", "ray", "--ray-address", cluster, "--shards", "4"]
    outs = {how: [d / f"{name}-{how}-{i}{ext}" for i, ext in enumerate(exts)]
            for how in ("local", "ray")}
    local_then_ray(in_process, argv, list(zip(opts, outs["local"], strict=True)),
                   list(zip(opts, outs["ray"], strict=True)), ray_opts)
    for a, b in zip(outs["local"], outs["ray"], strict=True):
        if a.suffix == ".h5":
            same_h5(a, b)
        else:
            same_tables(a, b, exact=name == "collect")
    valid(*outs["ray"])
    ex = executor_entry(outs["ray"][0])
    phases = ["means", "main"] if name == "ablate" else ["main"]  # mean: sums reduced first
    assert ex["kind"] == "ray" and ex["shards"] == 4 and ex["phases"] == phases
    assert [s["phase"] for s in ex["every_shard"]] == [p for p in phases for _ in range(4)]
    assert ex["cluster"]["cpus"] == 2 and ex["cluster"]["workers"] == 2
    assert not (d / f"{outs['ray'][0].name}.shards").exists()  # merged, cleaned up


OTHERS = {  # name -> argv after PROMPTS --model M --batch-size 1 (DIRS: the directions)
    "dla": ["dolm-dla", "--metric", "logit", "--first-token"],
    "lens": ["dolm-lens", "--first-token", "--top-k", "2"],
    "steer": ["dolm-steer", "apply", "--directions", "DIRS", "--alphas", "-2,0,2"],
    "mediate": ["dolm-mediate", "interventional", "--sites", "head.1.*,mlp_out.0", "--sims",
                "200"],
    "edges": ["dolm-circuit", "edges", "--method", "eap", "--metric", "prob_target"],
}


@pytest.mark.parametrize("name", list(OTHERS))
def test_dla_lens_steer_mediate_circuit_on_ray_equal_in_process(cluster, kit, in_process,
                                                                name):
    """The other prompt-parallel tools: with --batch-size 1 every prompt (pair) is computed
    alone in both runs, so the merged outputs equal the in-process ones exactly, the
    statistics over all prompts included (steer's slopes, mediate's bootstrap and
    q-values, the circuit's mean edge scores)."""
    from dolm.formats import read_meta

    d, model, p = kit
    exe, *rest = OTHERS[name]
    sub = [rest.pop(0)] if name in ("steer", "mediate", "edges") else []
    rest = [str(d / "dirs.safetensors") if x == "DIRS" else x for x in rest]
    argv = [exe, *sub, p, "--model", model, "--batch-size", "1", *rest]
    outs = {how: [d / f"{name}-{how}.parquet"] for how in ("local", "ray")}
    local_then_ray(in_process, argv, [("-o", outs["local"][0])], [("-o", outs["ray"][0])],
                   ["--executor", "ray", "--ray-address", cluster, "--shards", "3"])
    if name == "mediate":
        for how in outs:
            outs[how] += [d / f"{name}-{how}.effects.parquet", d / f"{name}-{how}.summary.json"]
    for a, b in zip(outs["local"], outs["ray"], strict=True):
        if a.suffix == ".json":
            x, y = json.loads(a.read_text()), json.loads(b.read_text())
            x.pop("dolm"), y.pop("dolm")  # the header: provenance differs by design
            assert x == y, name
            continue
        x, y = pq.read_table(a).to_pandas(), pq.read_table(b).to_pandas()
        pd.testing.assert_frame_equal(x, y, check_exact=True)
        assert read_meta(a).extra == read_meta(b).extra, name
    valid(*outs["ray"])
    ex = executor_entry(outs["ray"][0])
    assert ex["kind"] == "ray" and ex["shards"] == 3 and len(ex["every_shard"]) == 3


def _descendant(pid: int, ancestor: int) -> bool:
    while pid > 1:
        if pid == ancestor:
            return True
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            return False
        pid = int(stat.rsplit(")", 1)[1].split()[1])
    return False


def _shard_worker() -> int | None:
    """A Ray worker of this module's cluster running a shard right now."""
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmd = (proc / "cmdline").read_bytes().decode(errors="replace")
        except OSError:
            continue
        if "ShardWorker.run_shard" in cmd and _descendant(int(proc.name), os.getpid()):
            return int(proc.name)
    return None


def test_a_killed_worker_is_retried_and_the_output_equals_in_process(cluster, kit, in_process):
    if not Path("/proc/self/stat").exists():
        pytest.skip("needs /proc to find the worker process")
    d, model, p = kit
    argv = ["dolm-collect-acts", p, "--model", model, "--batch-size", "1",
            "--sites", "resid_post.*"]
    local = d / "kill-local.parquet"
    assert in_process(*argv, "-o", local, "--acts", d / "kill-local.h5").returncode == 0
    out, acts = d / "kill-ray.parquet", d / "kill-ray.h5"
    proc = subprocess.Popen([str(a) for a in (*argv, "-o", out, "--acts", acts,
                                              "--executor", "ray", "--ray-address", cluster,
                                              "--shards", "4")],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)
    killed = None
    deadline = time.monotonic() + 240
    while proc.poll() is None and killed is None and time.monotonic() < deadline:
        pid = _shard_worker()
        if pid is not None:
            os.kill(pid, signal.SIGKILL)
            killed = pid
        time.sleep(0.02)
    _, err = proc.communicate(timeout=300)
    assert killed is not None, "the run ended before a worker could be killed"
    assert proc.returncode == 0, err
    same_tables(local, out)
    same_h5(d / "kill-local.h5", acts)
    valid(out, acts)
    pids = {s["pid"] for s in executor_entry(out)["every_shard"]}
    assert killed not in pids  # the killed worker's shard was redone by another process


def test_a_killed_driver_resumes_and_skips_finished_shards(cluster, kit, in_process):
    """SIGKILL the driver once a main-round shard of a two-phase ablate (mean) is finished:
    no output appears; the same command with --resume keeps every finished shard (the
    means round whole, part of the main round), redoes the rest, and the output equals
    the in-process run."""
    d, model, p = kit
    argv = ["dolm-ablate", p, "--model", model, "--batch-size", "1", "--scan", "heads",
            "--kind", "zero,mean"]
    local, out = d / "resume-local.parquet", d / "resume-ray.parquet"
    assert in_process(*argv, "-o", local).returncode == 0
    ray_argv = [*argv, "-o", out, "--executor", "ray", "--ray-address", cluster,
                "--shards", "6"]
    folder = d / f"{out.name}.shards"
    proc = subprocess.Popen([str(a) for a in ray_argv], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, env=ENV)
    deadline = time.monotonic() + 300
    while proc.poll() is None and time.monotonic() < deadline:
        if folder.is_dir() and list(folder.glob("shard-*.done.json")):  # a main-round shard
            proc.kill()
            break
        time.sleep(0.01)
    proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL, "the run ended before the driver was killed"
    time.sleep(3)  # Ray stops the dead driver's workers
    assert not out.exists()  # nothing merged
    finished = [m.name for m in folder.glob("*shard-*.done.json")]
    main_done = [m for m in finished if m.startswith("shard-")]
    assert len([m for m in finished if m.startswith("means-")]) == 6 and 1 <= len(main_done) < 6
    r = dolm(*ray_argv, "--resume")
    assert r.returncode == 0, r.stderr
    assert "finished shards kept" in r.stderr
    same_tables(local, out, exact=False)
    valid(out)
    ex = executor_entry(out)
    resumed = {(s["phase"], s["index"]) for s in ex["every_shard"] if s["resumed"]}
    assert {("means", k) for k in range(1, 7)} <= resumed
    assert len(resumed) >= len(finished) and len(ex["every_shard"]) == 12
    assert len(resumed) < 12  # the rest were redone
    assert not folder.exists()


@contextlib.contextmanager
def read_only(folder):
    """``folder`` (created) that nobody can write in, root included: a read-only tmpfs for
    root, mode 555 otherwise."""
    folder.mkdir()
    mounted = False
    if os.geteuid() == 0:  # root writes through permissions
        r = subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(folder)],
                           capture_output=True, text=True)
        if r.returncode != 0:
            pytest.skip(f"mount not permitted here: {r.stderr.strip()}")
        mounted = True
    else:
        folder.chmod(0o555)
    try:
        yield folder
    finally:
        if mounted:
            subprocess.run(["umount", str(folder)], capture_output=True)
        elif folder.exists():
            folder.chmod(0o755)


def test_a_worker_that_cannot_write_the_shards_folder_is_named(cluster, kit, tmp_path):
    """The driver can write the output's folder, but the workers cannot write the shards
    folder (as a node that does not mount the shared storage): the workers' own check
    names the worker, exit 3, nothing written."""
    d, model, p = kit
    out = tmp_path / "out.parquet"
    with read_only(tmp_path / "out.parquet.shards") as shards:
        r = dolm("dolm-lens", p, "--model", model, "--first-token", "--executor", "ray",
                 "--ray-address", cluster, "--shards", "2", "-o", out)
        assert r.returncode == 3, r.stderr
        assert "worker on" in r.stderr and str(shards) in r.stderr, r.stderr
        assert "shared storage" in r.stderr and "Traceback" not in r.stderr
        assert not out.exists()
        assert not shards.exists() or list(shards.iterdir()) == []


def test_job_array_shards_merge_by_hand(kit, tmp_path, in_process):
    """--shard K/N runs (a job array, no Ray) of patch, merged with dolm-merge in any
    argument order, equal the in-process tables; a missing shard, a shard of other
    options and a tool that needs its own merge are named errors, exit 3. The shards and
    their merge are the real executables; the reference and the bad cases run in-process."""
    d, model, p = kit
    argv = ["dolm-patch", p, "--model", model, "--batch-size", "1", "--sites", "resid_pre",
            "--positions", "last"]
    r = in_process(*argv, "-o", tmp_path / "local.parquet", "--summary",
                   tmp_path / "local-s.parquet")
    assert r.returncode == 0, r.stderr
    for k in (1, 2):
        r = dolm(*argv, "--shard", f"{k}/2", "-o", tmp_path / f"s{k}.parquet", "--summary",
                 tmp_path / f"s{k}-s.parquet")
        assert r.returncode == 0, r.stderr
    for name, parts in (("merged", ["s2", "s1"]), ("merged-s", ["s2-s", "s1-s"])):
        r = dolm("dolm-merge", *[tmp_path / f"{x}.parquet" for x in parts], "-o",
                 tmp_path / f"{name}.parquet")
        assert r.returncode == 0, r.stderr
    same_tables(tmp_path / "local.parquet", tmp_path / "merged.parquet")
    same_tables(tmp_path / "local-s.parquet", tmp_path / "merged-s.parquet")
    valid(tmp_path / "merged.parquet", tmp_path / "merged-s.parquet")
    prov = json.loads(pq.read_schema(tmp_path / "merged.parquet").metadata[b"dolm.provenance"])
    assert prov[-1]["tool"] == "patch" and prov[-1]["params"]["executor"]["shards"] == 2
    # bad input: nothing written
    r = in_process(*argv, "--shard", "2/2", "--positions", "all", "-o",
                   tmp_path / "other.parquet")
    assert r.returncode == 0, r.stderr
    bad = {"shards missing: 2/2": ["s1"],
           "differs from": ["s1", "other"],
           "given twice": ["s1", "s2", "s2"]}
    for message, parts in bad.items():
        r = in_process("dolm-merge", *[tmp_path / f"{x}.parquet" for x in parts], "-o",
                       tmp_path / "bad.parquet")
        assert r.returncode == 3 and message in r.stderr, (message, r.stderr)
    r = in_process("dolm-steer", "apply", p, "--model", model, "--directions",
                   d / "dirs.safetensors", "--shard", "1/1", "-o", tmp_path / "st1.parquet")
    assert r.returncode == 0, r.stderr
    r = in_process("dolm-merge", tmp_path / "st1.parquet", "-o", tmp_path / "bad.parquet")
    assert r.returncode == 3 and "own merge" in r.stderr, r.stderr
    assert not (tmp_path / "bad.parquet").exists()


def test_bad_input_is_named(cluster, kit, tmp_path):
    d, model, p = kit
    base = ["dolm-collect-acts", p, "--model", model, "--executor", "ray"]
    # nothing listens at the address: a cluster failure, exit 1, named
    r = dolm(*base, "-o", tmp_path / "a.parquet", "--ray-address", "127.0.0.1:9")
    assert r.returncode == 1 and "--ray-address 127.0.0.1:9" in r.stderr, r.stderr
    # more shards than prompts: exit 3 before anything starts
    r = dolm(*base, "-o", tmp_path / "b.parquet", "--ray-address", cluster, "--shards", "13")
    assert r.returncode == 3 and "--shards 13" in r.stderr and "12" in r.stderr, r.stderr
    # --limit leaves fewer prompts than shards: the shard says so, exit 3
    r = dolm("dolm-patch", p, "--model", model, "--limit", "2", "--executor", "ray",
             "--ray-address", cluster, "--shards", "3", "-o", tmp_path / "c.parquet")
    assert r.returncode == 3 and "--shards 3" in r.stderr, r.stderr
    # a flag that needs --executor ray
    r = dolm("dolm-patch", p, "--model", model, "--shards", "2", "-o", tmp_path / "d.parquet")
    assert r.returncode == 3 and "--shards: only used with --executor ray" in r.stderr
    assert not [q.name for q in tmp_path.iterdir() if not q.name.startswith(".")]


def test_unwritable_output_folder_is_named(cluster, kit, tmp_path):
    d, model, p = kit
    with read_only(tmp_path / "ro") as ro:
        r = dolm("dolm-collect-acts", p, "--model", model, "--executor", "ray",
                 "--ray-address", cluster, "-o", ro / "out.parquet")
        assert r.returncode == 3 and str(ro) in r.stderr, r.stderr
        assert "Traceback" not in r.stderr
        assert list(ro.iterdir()) == []


def test_without_ray_installed_the_error_says_how_to_install(kit, tmp_path):
    d, model, p = kit
    block = tmp_path / "noray"
    (block / "ray").mkdir(parents=True)
    (block / "ray" / "__init__.py").write_text("raise ImportError('no ray here')\n")
    env = dict(ENV, PYTHONPATH=os.pathsep.join([str(block), *sys.path]))
    r = dolm("dolm-ablate", p, "--model", model, "--components", "head.0.1", "--executor",
             "ray", "-o", tmp_path / "x.parquet", env=env)
    assert r.returncode == 3, r.stderr
    assert "ray package is not installed" in r.stderr and "pip install" in r.stderr
    assert not (tmp_path / "x.parquet").exists()
