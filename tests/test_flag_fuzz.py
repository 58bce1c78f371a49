"""Every flag of both trainers, fed bad values: each either parses (the value means something, as
its help says) or stops the parser at once with exit code 2 and a message naming the flag, before
any model loads; never a traceback. The fields are read off the Config dataclasses, so a new flag is
fuzzed without a change here; the slow test starts real runs with a sample of the accepted edges."""
import dataclasses
import re
import subprocess

import pytest
from conftest import ROOT, trainer_command

import train_ppo
import train_sft

TRAINERS = {"train_ppo": train_ppo, "train_sft": train_sft}

# Int flags whose 0 parses without the help saying what 0 does: any seed is a seed.
ZERO_NEEDS_NO_HELP = {"seed"}


def bad_values(f: dataclasses.Field) -> dict:
    """{kind: the flag's text} of the bad kinds that apply to the field's type."""
    if f.type is bool:
        return {"empty": "", "wrong type": "abc", "number": "2"}
    if f.type is int:
        return {"negative": "-1", "zero": "0", "empty": "", "wrong type": "abc", "float": "1.5"}
    if f.type is float:
        return {"negative": "-1", "zero": "0", "nan": "nan", "inf": "inf", "-inf": "-inf",
                "empty": "", "wrong type": "abc"}
    return {"empty": "", "unknown choice": "no-such-choice"}


def has_choices(f: dataclasses.Field) -> bool:
    """A string flag with a fixed set of choices: its help lists them as `a | b | c`."""
    return f.type is str and " | " in f.metadata["help"]


def parse(module, name: str, text: str, capsys):
    """(the config, "") if `--name=text` over the smoke preset parses, else (None, stderr); any
    other exception than argparse's exit 2 fails the test."""
    argv = ["--preset", "smoke", f"--{name}={text}"]
    try:
        cfg = module.parse_config(argv)
    except SystemExit as e:
        err = capsys.readouterr().err
        assert e.code == 2, f"{argv}: exit {e.code!r}, not 2\n{err}"
        return None, err
    capsys.readouterr()
    return cfg, ""


@pytest.mark.parametrize("trainer", sorted(TRAINERS))
def test_every_bad_value_parses_or_stops_naming_its_flag(trainer, capsys):
    module = TRAINERS[trainer]
    names_flag = "--{}(?![A-Za-z0-9_-])"  # --clip_eps is not --clip_eps_high
    for f in dataclasses.fields(module.Config):
        for kind, text in bad_values(f).items():
            cfg, err = parse(module, f.name, text, capsys)
            case = f"{trainer} --{f.name}={text!r} ({kind})"
            if cfg is None:
                assert re.search(names_flag.format(re.escape(f.name)), err), f"{case}: {err}"
                assert "Traceback" not in err, case
                continue
            # what parsed must be a value that means something
            assert kind not in ("nan", "inf", "-inf", "wrong type", "float"), case
            assert not (kind == "negative" and f.type is int), case
            assert not (kind == "unknown choice" and has_choices(f)), case
            if kind == "zero" and f.type is int and f.name not in ZERO_NEEDS_NO_HELP:
                assert "0" in f.metadata["help"], f"{case}: parses; the help says not what 0 does"


@pytest.mark.parametrize("trainer", sorted(TRAINERS))
def test_good_spellings_of_a_bool_parse(trainer):
    module = TRAINERS[trainer]
    for text, value in (("true", True), ("ON", True), ("1", True), ("no", False), ("0", False)):
        assert module.parse_config(["--preset", "smoke", f"--resume={text}"]).resume is value
    assert module.parse_config(["--preset", "smoke", "--resume"]).resume is True


def test_several_bad_values_are_named_together(capsys):
    with pytest.raises(SystemExit):
        train_ppo.parse_config(["--preset", "smoke", "--actor_lr", "-1", "--gamma", "2",
                                "--save_every", "0", "--device", "tpu"])
    err = capsys.readouterr().err
    for words in ("--actor_lr -1.0: must be >= 0", "--gamma 2.0: must be in [0, 1]",
                  "--save_every 0: must be > 0", "--device 'tpu': choose one of auto, cpu, cuda"):
        assert words in err


# A sample of the edge values the checks accept, run for real (each run costs ~15 s on 2 cores):
# 0 meaning "off" for a sampling, a clipping and a penalty setting, and the end of a ratio's range.
EDGES = [("train_ppo.py", "--temperature", "0"), ("train_ppo.py", "--max_grad_norm", "0"),
         ("train_ppo.py", "--kl_coef", "0"), ("train_sft.py", "--warmup_ratio", "1")]


@pytest.mark.slow
@pytest.mark.parametrize("script,flag,value", EDGES)
def test_accepted_edge_values_start_a_run(script, flag, value, tmp_path, data_dir):
    args = ["--preset", "smoke", "--max_steps", "1", "--save_every", "1",
            "--out_dir", tmp_path / "run", flag, value]
    done = subprocess.run(trainer_command(script, args), cwd=ROOT, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert (tmp_path / "run" / "checkpoints" / "step_000001").is_dir()
