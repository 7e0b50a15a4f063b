"""`fusedlm tour`'s arguments: bad values fail before anything runs."""
import pytest

from fusedlm.tour import main


@pytest.mark.parametrize("argv, message", [(["--threads", "-1"], "--threads must be >= 0"),
                                           (["--smoke", "--quick"], "not allowed with"),
                                           (["--only", "nope"], "invalid choice")])
def test_bad_arguments(argv, message, capsys):
    with pytest.raises(SystemExit):
        main(argv)
    assert message in capsys.readouterr().err


def _never(*args, **kwargs):
    raise AssertionError("the tour started")


def test_an_unwritable_out_fails_before_anything_runs(tmp_path, capsys, monkeypatch):
    from fusedlm.tour import run

    monkeypatch.setattr(run, "_tour", _never)
    (tmp_path / "file").write_text("x")
    for out, message in ((tmp_path / "file" / "report", "cannot be created"), (tmp_path / "file", "exists and is not a folder")):
        with pytest.raises(SystemExit):
            main(["--smoke", "--out", str(out)])
        assert message in capsys.readouterr().err


def test_a_negative_seed(capsys, monkeypatch):
    from fusedlm.tour import run

    monkeypatch.setattr(run, "_tour", _never)
    with pytest.raises(SystemExit):
        main(["--seed", "-1"])
    assert "--seed must be >= 0" in capsys.readouterr().err


@pytest.mark.parametrize("missing, only, message", [
    (("matplotlib", "bm25s"), None, "matplotlib (masks, pretraining, alignment, finetuning, decoding, hallucination); "
                                    "bm25s (hallucination)"),
    (("bm25s",), None, "bm25s (hallucination). Install them with pip install 'fusedlm[tour]', or leave those sections out"),
    (("tokenizers",), ["masks"], "tokenizers (world)"),
    (("tqdm",), ["masks"], "tqdm (every section)"),
])
def test_missing_packages_are_named_before_training(tmp_path, capsys, monkeypatch, missing, only, message):
    # without its optional packages the tour used to train for minutes, then report sections "not available"
    import importlib.util

    from fusedlm.tour import run

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name in missing else real(name, *a))
    monkeypatch.setattr(run, "_tour", _never)
    argv = ["--smoke", "--out", str(tmp_path)] + [a for key in (only or []) for a in ("--only", key)]
    with pytest.raises(SystemExit):
        main(argv)
    assert message in capsys.readouterr().err


def test_sections_left_out_need_nothing(tmp_path, monkeypatch):
    import importlib.util

    from fusedlm.tour import run

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "bm25s" else real(name, *a))
    monkeypatch.setattr(run, "_tour", lambda args, argv: 0)
    assert main(["--smoke", "--out", str(tmp_path), "--only", "masks"]) == 0  # hallucination (bm25s) is not chosen
