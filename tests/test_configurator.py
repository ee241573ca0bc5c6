"""Tests for nanochat/configurator.py. Run: python -m pytest tests/test_configurator.py -q"""
import pytest

from nanochat.configurator import configure


def defaults(**extra):
    """A script's module globals: options plus the kind of things that are not options."""
    g = {
        "__name__": "__main__", "__doc__": "Train a tiny model.", "pytest": pytest, "configure": configure,
        "run": "dummy", "depth": 20, "matrix_lr": 0.02, "resume": False, "model_tag": None,
        "tasks": ("arc", "mmlu"), "prompt": "", "temperature": 0.6, "top_k": 50,
        "_private": 1,
    }
    g.update(extra)
    return g


def test_no_args_keeps_defaults_and_returns_only_options():
    g = defaults()
    cfg = configure(g, argv=[])
    assert cfg == {"run": "dummy", "depth": 20, "matrix_lr": 0.02, "resume": False, "model_tag": None,
                   "tasks": ("arc", "mmlu"), "prompt": "", "temperature": 0.6, "top_k": 50}
    assert g["depth"] == 20


def test_config_file_then_cli_override(tmp_path, capsys):
    cfg_file = tmp_path / "cfg.py"
    cfg_file.write_text("import math\ndepth = 4\nmatrix_lr = 1  # int is fine for a float\n_helper = 3\nrun = 'cfgrun'\n")
    g = defaults()
    cfg = configure(g, argv=[str(cfg_file), "--depth=6", "--run=clirun"])
    assert g["depth"] == 6 and cfg["depth"] == 6          # CLI wins over the file
    assert g["matrix_lr"] == 1.0 and isinstance(g["matrix_lr"], float)
    assert g["run"] == "clirun"
    out = capsys.readouterr().out
    assert "depth = 4" in out and "depth = 6" in out     # the overrides applied are printed


def test_config_file_unknown_key_names_file_and_line(tmp_path, capsys):
    cfg_file = tmp_path / "bad.py"
    cfg_file.write_text("depth = 4\n\ndepht = 5\n")
    with pytest.raises(SystemExit) as e:
        configure(defaults(), argv=[str(cfg_file)])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert f"{cfg_file}:3" in err and "depht" in err and "Did you mean: depth" in err


def test_config_file_type_error_names_line(tmp_path, capsys):
    cfg_file = tmp_path / "bad.py"
    cfg_file.write_text("depth = 'four'\n")
    with pytest.raises(SystemExit) as e:
        configure(defaults(), argv=[str(cfg_file)])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert f"{cfg_file}:1" in err and "expected int" in err


def test_missing_config_file(capsys):
    with pytest.raises(SystemExit) as e:
        configure(defaults(), argv=["nope/missing.py"])
    assert e.value.code == 2
    assert "nope/missing.py" in capsys.readouterr().err


def test_unknown_key_lists_valid_keys(capsys):
    with pytest.raises(SystemExit) as e:
        configure(defaults(), argv=["--detph=4"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "'detph'" in err and "Did you mean: depth" in err
    for key in ("run", "depth", "matrix_lr", "resume", "model_tag", "tasks"):
        assert key in err
    assert "_private" not in err and "pytest" not in err


@pytest.mark.parametrize("arg, expected", [
    ("--depth=abc", "expected int"),
    ("--depth=4.5", "expected int"),
    ("--depth=True", "expected int"),
    ("--resume=maybe", "cannot parse"),
    ("--matrix_lr=[1]", "expected float"),
])
def test_type_errors(arg, expected, capsys):
    with pytest.raises(SystemExit) as e:
        configure(defaults(), argv=[arg])
    assert e.value.code == 2
    assert expected in capsys.readouterr().err


def test_literals_and_raw_strings():
    g = defaults()
    configure(g, argv=["--matrix_lr=1e-3", "--depth=8", "--run=d8_run", "--prompt='quoted'",
                       "--model_tag=d4", "--tasks=arc,gsm8k"])
    assert g["matrix_lr"] == 1e-3 and g["depth"] == 8
    assert g["run"] == "d8_run" and g["prompt"] == "quoted"
    assert g["model_tag"] == "d4"                        # None default: raw text when not a literal
    assert g["tasks"] == ("arc", "gsm8k")
    g = defaults()
    configure(g, argv=["--model_tag=200", "--run=123"])
    assert g["model_tag"] == 200 and g["run"] == "123"   # str default keeps the text


def test_bool_flags():
    g = defaults()
    configure(g, argv=["--resume"])
    assert g["resume"] is True
    g = defaults(resume=True)
    configure(g, argv=["--resume=False"])
    assert g["resume"] is False
    g = defaults()
    configure(g, argv=["--resume", "true", "--depth", "3"])
    assert g["resume"] is True and g["depth"] == 3
    g = defaults()
    configure(g, argv=["--resume", "--depth=3"])         # bare flag followed by another option
    assert g["resume"] is True and g["depth"] == 3


def test_space_separated_values_and_negative_numbers():
    g = defaults()
    configure(g, argv=["--depth", "12", "--temperature", "-0.5", "--run", "myrun"])
    assert g["depth"] == 12 and g["temperature"] == -0.5 and g["run"] == "myrun"


def test_missing_value(capsys):
    with pytest.raises(SystemExit) as e:
        configure(defaults(), argv=["--depth"])
    assert e.value.code == 2
    assert "missing value" in capsys.readouterr().err


def test_aliases():
    g = defaults()
    aliases = {"p": "prompt", "t": "temperature", "k": "top_k"}
    configure(g, argv=["-p", "hi there", "-t", "0.9", "-k=5"], aliases=aliases)
    assert g["prompt"] == "hi there" and g["temperature"] == 0.9 and g["top_k"] == 5


def test_dashes_in_keys():
    g = defaults()
    configure(g, argv=["--matrix-lr=0.5", "--top-k", "7"])
    assert g["matrix_lr"] == 0.5 and g["top_k"] == 7


def test_help_lists_every_key_with_default(capsys, tmp_path):
    with pytest.raises(SystemExit) as e:
        configure(defaults(), argv=["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "Train a tiny model." in out
    for line in ("--depth", "int", "20", "--run", "'dummy'", "--model_tag", "None", "--tasks"):
        assert line in out
    # with a config file first, --help shows the values it sets
    cfg_file = tmp_path / "c.py"
    cfg_file.write_text("depth = 7\n")
    with pytest.raises(SystemExit) as e:
        configure(defaults(), argv=[str(cfg_file), "-h"])
    assert e.value.code == 0
    assert any(l.split()[:3] == ["--depth", "int", "7"] for l in capsys.readouterr().out.splitlines())


def test_stray_positional_is_an_error(capsys):
    with pytest.raises(SystemExit) as e:
        configure(defaults(), argv=["--depth=2", "extra"])
    assert e.value.code == 2
    assert "extra" in capsys.readouterr().err
