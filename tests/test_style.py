"""The house rules on the shape of the code that ruff does not check (ruff.toml has the rest)."""
import ast
import subprocess

from conftest import ROOT

TRAINING_PATH = ["train_ppo.py", "train_sft.py", "experience.py", "common.py", "checkpoint.py"]


def python_files() -> list:
    tracked = subprocess.run(["git", "ls-files", "*.py"], cwd=ROOT, capture_output=True, text=True)
    return [ROOT / name for name in tracked.stdout.split()] or sorted(ROOT.rglob("*.py"))


def calls_in(tree) -> set:
    """`module.function` and `function` names called anywhere in a syntax tree."""
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            f = node.func
            if isinstance(f, ast.Attribute) and isinstance(f.value, ast.Name):
                names.add(f"{f.value.id}.{f.attr}")
            elif isinstance(f, ast.Name):
                names.add(f.id)
    return names


def function(path, name):
    tree = ast.parse((ROOT / path).read_text())
    return next(n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef) and n.name == name)


def test_no_tuple_statements():
    """`a(), b()` runs two calls as one statement: write two lines."""
    found = []
    for path in python_files():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Expr) and isinstance(node.value, ast.Tuple):
                found.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    assert found == []


def test_no_test_hooks_in_the_training_path():
    """Faults come from outside (tests/launch_with_faults.py), never from code in a trainer."""
    for name in TRAINING_PATH:
        text = (ROOT / name).read_text()
        for hook in ("fault(", "time.sleep", "MEDRLVR_FAULT"):
            assert hook not in text, (name, hook)


def test_the_formulas_are_one_jump_from_the_step_and_decoding_two():
    """The reader's path: ppo_step calls ppo.py's formulas itself (where -beta * KL enters the
    rewards, GAE, whitening, the clipped surrogate, the value loss); it samples through one helper
    that calls the run's sampler, whose teaching core (samplers.Plain) is rollout.generate, whose
    loop runs the KV-cache decode step."""
    step_calls = calls_in(function("train_ppo.py", "ppo_step"))
    for formula in ("kl_penalty", "token_rewards", "gae", "whiten", "policy_loss", "value_loss"):
        assert f"ppo.{formula}" in step_calls, formula
    assert "experience.sample_responses" in step_calls
    sampler = ast.unparse(function("experience.py", "sample_responses"))
    assert "sampler.generate" in sampler
    plain = ast.unparse(function("samplers.py", "generate"))
    assert "rollout.generate" in plain
    generate = function("rollout.py", "generate")
    loops = [n for n in ast.walk(generate) if isinstance(n, ast.For)]
    assert any("decoder_forward" in calls_in(loop) for loop in loops)


def test_records_are_built_once():
    """What a step samples and scores, and what its update learns from, are frozen dataclasses:
    built in one call, never filled in field by field."""
    import dataclasses

    import experience
    for record in (experience.Samples, experience.Experience, experience.Forwards):
        assert record.__dataclass_params__.frozen, record
        fields = dataclasses.fields(record)
        assert all(f.default is dataclasses.MISSING for f in fields), record
