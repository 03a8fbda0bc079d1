"""The `bonesoup` command line: merge, the embedded demo, and its errors."""

import json

import pytest
import torch
from safetensors.torch import load_file

from bonesoup.cli import main
from bonesoup.tasks.tiny_models import make_tiny_backbones


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    return make_tiny_backbones(root, 2, seed=3)


def test_merge_command_writes_the_merge(tiny, tmp_path, capsys):
    sft, (b0, b1) = tiny
    out = tmp_path / "soup"
    rc = main(["merge", str(b0), str(b1), "--out", str(out), "--preference", "1", "0", "--beta", "0.7",
               "--alpha", "0.5", "--sft", str(sft), "--no-progress"])
    assert rc == 0
    report = json.loads(capsys.readouterr().out)
    assert [i["coefficient"] for i in report["inputs"]] == pytest.approx([1.5 * 1.75, 1.5 * -0.75, -0.5])
    got = load_file(out / "model.safetensors")
    ins = [load_file(p / "model.safetensors") for p in (b0, b1, sft)]
    key = "transformer.h.0.attn.c_attn.weight"
    ref = 2.625 * ins[0][key].double() - 1.125 * ins[1][key].double() - 0.5 * ins[2][key].double()
    torch.testing.assert_close(got[key].double(), ref, rtol=0, atol=1e-5)


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--preference", "0.5", "0.6", "--beta", "0.7"], "must sum to 1"),
        (["--preference", "0.5", "0.5", "--beta", "0.4"], "strictly between 0.5 and 1"),
        (["--preference", "0.5", "0.5"], "--beta is required"),
        (["--beta", "0.7"], "--preference is required"),
        (["--preference", "0.5", "0.5", "--beta", "0.7", "--alpha", "0.2"], "sft"),
    ],
)
def test_merge_command_errors_name_the_problem(tiny, tmp_path, capsys, argv, message):
    sft, (b0, b1) = tiny
    rc = main(["merge", str(b0), str(b1), "--out", str(tmp_path / "o"), *argv])
    assert rc == 2
    err = capsys.readouterr().err
    assert message in err and err.startswith("bonesoup merge: error:")
    assert not (tmp_path / "o").exists()


def test_missing_directory(tmp_path, capsys):
    rc = main(["merge", str(tmp_path / "nope"), str(tmp_path / "nope2"), "--out", str(tmp_path / "o"),
               "--preference", "0.5", "0.5", "--beta", "0.7"])
    assert rc == 2
    assert "nope" in capsys.readouterr().err


def test_demo_runs_on_the_embedded_default(tmp_path, capsys):
    rc = main(["merge", "--workdir", str(tmp_path / "demo"), "--no-progress"])
    assert rc == 0
    out = capsys.readouterr().out
    assert "max |merged - float64 reference|" in out
    worst = float(out.split("max |merged - float64 reference| over all weights:")[1].split()[0])
    assert worst < 1e-5
    report = json.loads((tmp_path / "demo" / "merged" / "bonesoup-merge.json").read_text())
    assert report["preference"] == [0.8, 0.2] and report["alpha"] == 0.1


def test_demo_never_replaces_a_user_output_without_force(tmp_path, capsys):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    rc = main(["merge", "--workdir", str(tmp_path / "demo"), "--out", str(out), "--no-progress"])
    assert rc == 2 and "already exists" in capsys.readouterr().err
    assert (out / "keep.txt").read_text() == "precious"


def test_demo_alpha_zero_is_zero(tmp_path, capsys):
    assert main(["merge", "--workdir", str(tmp_path / "demo"), "--alpha", "0", "--no-progress"]) == 0
    report = json.loads((tmp_path / "demo" / "merged" / "bonesoup-merge.json").read_text())
    assert report["alpha"] == 0.0


# --------------------------------------------------------------------------- hostile inputs: one line, no traceback


def _one_line_error(capsys, rc, expected_rc=2):
    err = capsys.readouterr().err
    assert rc == expected_rc, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("bonesoup merge: error:"), err
    assert "Traceback" not in err
    return lines[0]


def _evil_copy(tmp_path, src, edit):
    import shutil

    d = tmp_path / "evil"
    shutil.copytree(src, d)
    edit(d)
    return d


@pytest.mark.parametrize("case", ["traversal", "deep-config", "bad-header", "library-refuses", "symlink-out"])
def test_hostile_checkpoints_end_in_one_line_naming_the_file(tiny, tmp_path, capsys, case):
    sft, (b0, b1) = tiny

    def edit(d):
        weights = d / "model.safetensors"
        if case == "traversal":
            (d / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {
                "transformer.wte.weight": "../victim.safetensors"}}))
        elif case == "deep-config":
            (d / "config.json").write_text("[" * 50_000 + "]" * 50_000)
        elif case == "bad-header":
            weights.write_bytes(b"\x05\x00\x00\x00\x00\x00\x00\x00{\"a\":")
        elif case == "library-refuses":  # trailing bytes no tensor covers: safetensors refuses on read
            with open(weights, "ab") as f:
                f.write(b"\x00" * 16)
        else:
            (d / "tokenizer.json").unlink()
            (d / "tokenizer.json").symlink_to(sft.parent)

    evil = _evil_copy(tmp_path, b1, edit)  # first: its layout and side files are the ones used
    rc = main(["merge", str(evil), str(b0), "--out", str(tmp_path / "o"), "--preference", "0.5", "0.5",
               "--beta", "0.7", "--no-progress"])
    line = _one_line_error(capsys, rc)
    assert str(evil) in line
    assert not (tmp_path / "o").exists() and not (tmp_path / "victim.safetensors").exists()


def test_huge_alpha_is_one_line_naming_alpha(tiny, tmp_path, capsys):
    sft, (b0, b1) = tiny
    rc = main(["merge", str(b0), str(b1), "--out", str(tmp_path / "o"), "--preference", "0.5", "0.5",
               "--beta", "0.7", "--alpha", "1e39", "--sft", str(sft), "--no-progress"])
    assert "alpha=1e+39" in _one_line_error(capsys, rc) and not (tmp_path / "o").exists()


def test_unexpected_errors_are_one_line_and_debug_shows_the_traceback(tiny, tmp_path, capsys, monkeypatch):
    import bonesoup.merge.cpu_merge as cpu_merge  # what `bonesoup merge` runs on the CPU

    def boom(*args, **kwargs):
        raise RuntimeError("kernel exploded\nsecond line")

    monkeypatch.setattr(cpu_merge, "merge_checkpoints_cpu", boom)
    sft, (b0, b1) = tiny
    argv = ["merge", str(b0), str(b1), "--out", str(tmp_path / "o"), "--preference", "0.5", "0.5", "--beta", "0.7"]
    line = _one_line_error(capsys, main(argv), expected_rc=1)
    assert "RuntimeError: kernel exploded; second line" in line and "--debug" in line
    for debug_argv in (["--debug", *argv], [*argv, "--debug"]):
        assert main(debug_argv) == 1
        err = capsys.readouterr().err
        assert "Traceback" in err and err.rstrip().splitlines()[-1].startswith("bonesoup merge: error: RuntimeError")


def test_method_choices_come_from_the_registry(tiny, tmp_path, capsys, monkeypatch):
    import numpy as np

    from bonesoup.merge.methods import MERGE_METHODS, MergeMethod

    sft, (b0, b1) = tiny
    argv = ["merge", str(b0), str(b1), "--out", str(tmp_path / "o"), "--preference", "0.9", "0.1", "--method",
            "uniform", "--no-progress"]
    with pytest.raises(SystemExit) as exc:  # argparse refuses it, listing the registered names
        main(argv)
    assert exc.value.code == 2 and "'bone', 'rewarded'" in capsys.readouterr().err
    monkeypatch.setitem(MERGE_METHODS, "uniform", MergeMethod(
        "uniform", "test only: every backbone 1/n", False, lambda n, beta: np.full((n, n), 1.0 / n)))
    assert main(argv) == 0  # no --beta asked for: the method does not read it
    report = json.loads(capsys.readouterr().out)
    assert report["method"] == "uniform" and report["beta"] is None
    assert [i["coefficient"] for i in report["inputs"]] == pytest.approx([0.5, 0.5], abs=1e-15)
