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
