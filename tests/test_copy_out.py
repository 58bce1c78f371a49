"""Copying out is a promise: each file the README calls standalone, copied into an empty folder with
only the files it says it needs, imports there and does its job. Each check runs in a fresh Python
that cannot see this repository (its folder is not on the path, PYTHONPATH is ignored)."""
import shutil
import subprocess
import sys
import textwrap

import pytest
from conftest import ROOT

TINY_QWEN2 = """
import torch
from transformers import AutoModelForCausalLM, Qwen2Config
torch.manual_seed(0)
config = Qwen2Config(vocab_size=48, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
model = AutoModelForCausalLM.from_config(config).eval()
ids = torch.randint(3, 48, (3, 7))
mask = torch.ones_like(ids)
mask[1, :3] = 0  # left padding
"""

# file -> (the files copied beside it, a check that must print OK)
STANDALONE = {
    "verifier.py": ([], """
import sys
from verifier import Rules, verify
options = {"A": "aspirin", "B": "heparin"}
assert verify("<think>clots</think><answer>B</answer>", "B", options)["reward"] == 1
assert verify("<think>clots</think><answer>A</answer>", "B", options)["reward"] == 0
assert verify("B", "B", options)["reward"] == -1
copy = "<think>reasoning process here</think><answer>B</answer>"
assert verify(copy, "B", options)["reward"] == 1
assert verify(copy, "B", options, Rules(penalize_template_copy=True))["reward"] == -1
assert not {"torch", "numpy"} & set(sys.modules), "the verifier is standard library only"
print("OK")
"""),
    "ppo.py": ([], """
import torch
import ppo
mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
kl = torch.tensor([[0.1, 0.2, 0.3], [0.4, 0.5, 0.0]])
rewards = ppo.token_rewards(kl, torch.tensor([1.0, -1.0]), mask, 0.5)
assert torch.allclose(rewards, torch.tensor([[-0.05, -0.1, 0.85], [-0.2, -1.25, 0.0]]))
advantages, returns = ppo.gae(rewards, torch.zeros(2, 3), mask, 1.0, 1.0)
assert torch.allclose(advantages[0], torch.tensor([0.7, 0.75, 0.85]))  # returns-to-go
reduce = ppo.LossReduction("token-mean", mask)
loss, stats = ppo.policy_loss(torch.zeros(2, 3), torch.zeros(2, 3), advantages, reduce, (0.2, 0.2))
assert torch.isclose(loss, -(advantages * mask).sum() / mask.sum()) and stats["clipfrac"] == 0
print("OK")
"""),
    "rollout.py": ([], TINY_QWEN2 + """
import rollout
out = rollout.generate(model, ids, mask, 5, temperature=0, eos_token_id=[], pad_token_id=0)
expected = model.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=5,
                          pad_token_id=0, eos_token_id=None)
assert torch.equal(out.sequences, expected), (out.sequences, expected)
print("OK")
"""),
    "engine.py": (["rollout.py", "static_decode.py", "engine_forward.py"], TINY_QWEN2 + """
import engine, rollout
noise = torch.rand(3, 6)
plain = rollout.generate(model, ids, mask, 6, eos_token_id=[], uniforms=noise)
for settings in (engine.DYNAMIC, engine.STATIC):
    fast = engine.generate(model, ids, mask, 6, settings, eos_token_id=[], uniforms=noise)
    assert torch.equal(fast.sequences, plain.sequences)
    assert torch.allclose(fast.logprobs, plain.logprobs, atol=1e-5)
print("OK")
"""),
    "data.py": ([], """
import json, pathlib
import data
rows = [{"question": "Which drug?", "options": {"A": "aspirin", "B": "heparin"},
         "answer_idx": "B", "answer": "heparin", "meta_info": "step1"}]
pathlib.Path("q.jsonl").write_text("".join(json.dumps(r) + "\\n" for r in rows))
(record,) = data.load_mcqa("q.jsonl")
assert record["answer"] == "B" and record["options"]["B"] == "heparin"
prompt = data.build_prompt(record, "r1")
assert "Which drug?" in prompt and "B. heparin" in prompt and prompt.endswith("Assistant:")
print("OK")
"""),
    "distributed.py": ([], """
import torch
import distributed
rank, world, device = distributed.setup("cpu")
assert (rank, world, device.type) == (0, 1, "cpu")
assert distributed.all_reduce_dict({"x": 2.0}) == {"x": 2.0}
model = torch.nn.Linear(3, 1)
model(torch.ones(2, 3)).sum().backward()
assert distributed.grad_norm_and_clip(list(model.parameters()), 1.0) > 0
print("OK")
"""),
    "dynamics.py": (["data.py", "verifier.py"], """
import dynamics, verifier
options = {"A": "aspirin", "B": "heparin"}
response = "<think> B. </think><answer> B </answer>"  # the answer, stated before any reasoning
stage = dynamics.classify(verifier.verify(response, "B", options), response, options)
assert stage == dynamics.DIRECT_ANSWER_HACKER, stage
assert dynamics.classify(verifier.verify("B", "B", options), "B") == dynamics.FORMAT_FAILURE
print("OK")
"""),
    "lora.py": ([], TINY_QWEN2 + """
import lora
base = model(ids, attention_mask=mask).logits
lora.add_adapters(model, lora.LoraConfig(rank=2, alpha=4.0), names=("policy", "critic"))
assert torch.equal(model(ids, attention_mask=mask).logits, base)  # B = 0: the base, to the bit
with torch.no_grad():
    for p in lora.adapter_parameters(model, "policy")[1::2]:  # each linear's B
        p.normal_(0.0, 0.1)
    adapted = model(ids, attention_mask=mask).logits
    with lora.adapter(model, None):
        assert torch.equal(model(ids, attention_mask=mask).logits, base)
    plain = AutoModelForCausalLM.from_config(config).eval()
    plain.load_state_dict(dict(lora.merged_parameters(model, "policy")))
    assert torch.allclose(plain(ids, attention_mask=mask).logits, adapted, atol=1e-5)
assert all(k.startswith("base_model.model.model.layers.") and ".lora_" in k
           for k in lora.peft_state_dict(model, "policy"))
print("OK")
"""),
}


@pytest.mark.parametrize("name", sorted(STANDALONE))
def test_a_standalone_file_works_copied_out_alone(name, tmp_path):
    needs, check = STANDALONE[name]
    for file in [name, *needs]:
        shutil.copy(ROOT / file, tmp_path / file)
    (tmp_path / "check.py").write_text(textwrap.dedent(check))
    # -E: ignore PYTHONPATH, -s: no user site; the script's folder is then the only project folder
    # on the path
    p = subprocess.run([sys.executable, "-E", "-s", "check.py"], cwd=tmp_path, capture_output=True,
                       text=True, timeout=300)
    assert p.returncode == 0 and p.stdout.strip().endswith("OK"), p.stderr[-3000:]
