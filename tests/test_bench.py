"""bench.py and benchmarks/: a failing row costs only itself; the generators run the samplers a run
chooses, on the same noise; the memory arithmetic against real allocations and against Qwen2.5-3B's
shape counted by hand; and (slow) `bench.py --quick` runs every row that a GPU runs, the paper
section's steps included, on the CPU at the scaled-down shape."""
import argparse
import subprocess
import sys

import pytest
import torch
from conftest import ROOT

import bench
import lora
import model_zoo
import rollout
import train_ppo
from benchmarks import memory_plan, paper, rollout_bench, update_bench
from benchmarks.measure import Part, row


def test_a_failing_part_becomes_one_row_and_the_rows_around_it_stay(monkeypatch):
    def broken():
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB\nmore")

    parts = [Part("update", "first", lambda: [row("update", "a", "1 s"), row("update", "b")]),
             Part("update", "second", broken),
             Part("update", "third", lambda: [row("update", "c", "3 s", "2x")])]
    monkeypatch.setattr(bench, "section_parts", lambda section, args, limits: parts)
    assert bench.measure_section("update", None, {}) == [
        "| update | a | 1 s |  |", "| update | b |  |  |",
        "| update | second: failed: OutOfMemoryError: CUDA out of memory. Tried to allocate "
        "2.00 GiB |  |  |",
        "| update | c | 3 s | 2x |"]


def test_a_section_whose_parts_cannot_be_listed_is_one_failed_row(monkeypatch):
    def unlisted(section, args, limits):
        raise KeyError("bandwidth")

    monkeypatch.setattr(bench, "section_parts", unlisted)
    assert bench.measure_section("generation", None, {}) == [
        "| generation | failed: KeyError: 'bandwidth' |  |  |"]


@pytest.mark.slow
def test_the_engines_sample_the_teaching_cores_tokens_and_a_broken_generator_is_dropped():
    """Every --engine draws the same tokens from the same noise in fp32, so each counts the useful
    tokens of rollout.generate itself on that noise; transformers' static cache needs CUDA."""
    w = rollout_bench.load("random-b32")
    totals, failed = rollout_bench.compare(w, ["transformers", "transformers-static", "plain",
                                               "dynamic", "static"], max_new=8, seed=3)
    assert failed == {"transformers-static": "ValueError: transformers-static: generate "
                                             "compiles its static cache on CUDA"}
    assert list(totals) == ["transformers", "plain", "dynamic", "static"]
    noise = torch.rand(len(w.ids), 8, generator=torch.Generator().manual_seed(3))
    core = rollout.generate(w.model, w.ids, w.mask, 8, eos_token_id=w.eos, uniforms=noise,
                            pad_token_id=w.tokenizer.pad_token_id)
    for name in ("plain", "dynamic", "static"):
        assert totals[name]["useful"] == int(core.response_mask.sum()), name
        assert totals[name]["steps"] == core.response_mask.shape[1], name
        assert 0 < totals[name]["prefill"] < totals[name]["wall"], name


def test_the_paper_rows_without_a_gpu_say_so():
    args = argparse.Namespace(device="cpu", quick=False)
    rows = [r for part in paper.parts(args, {}) for r in part.measure()]
    assert [r.split(" | ")[2] for r in rows] == ["not measured: no GPU"] * 3


def test_the_update_loads_its_models_with_gradient_checkpointing_when_asked():
    rows = update_bench.Rows(batch=4, group=2, prompt_len=8, response_len=4, micro_batch=2)
    for checkpointing in (False, True):
        cfg = update_bench.update_config("tiny-qwen2", "cpu", "float32", rows,
                                         gradient_checkpointing=checkpointing)
        models, _ = update_bench.load_models(cfg)
        assert models.reference is None  # step 7 only reads the reference's log-probs
        for model in (models.policy, models.critic):
            assert model.is_activation_checkpointing is checkpointing


def test_qwen25_3b_has_the_parameters_its_shape_gives_by_hand():
    shape = memory_plan.shape_of(memory_plan.config_for("random-qwen2.5-3b"))
    V, H, L, kv, inter = 151936, 2048, 36, 2 * 128, 11008
    # q, k, v with biases, o without; gate, up, down; two RMSNorms a layer; tied embeddings
    layer = (H * H + H) + 2 * (H * kv + kv) + H * H + 3 * H * inter + 2 * H
    assert shape.parameters == V * H + L * layer + H == 3_085_938_688
    assert shape.critic_parameters == shape.parameters + H + 1  # the value head, weight and bias
    assert (shape.layers, shape.hidden, shape.kv_numbers, shape.vocab) == (L, H, kv, V)


def test_the_paper_setting_needs_its_three_models_and_two_fit_80gb():
    shape = memory_plan.shape_of(memory_plan.config_for("random-qwen2.5-3b"))
    n = shape.parameters

    def peak(*flags):
        return memory_plan.plan(train_ppo.parse_config(list(flags)), shape).peak

    # policy and critic: weights, gradients, AdamW (16 bytes a parameter); the reference's weights
    assert peak("--preset", "paper") > 16 * n + 16 * shape.critic_parameters + 4 * n > 111e9
    assert peak("--preset", "paper", "--advantage", "reinforce_pp") > memory_plan.GPU_80GB
    assert peak("--preset", "paper", "--advantage", "reinforce_pp", "--kl_coef", "0") < 80e9
    assert peak("--preset", "paper_lora") < 80e9


def test_the_arithmetic_counts_what_the_models_and_the_cache_allocate():
    """At the scaled-down shape: the full setting's policy weights and KV cache, and LoRA's
    adapters and value head, against the tensors themselves."""
    name = "random-qwen2.5-3b-mini"
    shape = memory_plan.shape_of(memory_plan.config_for(name))
    cfg = train_ppo.parse_config(["--preset", "paper", "--model", name])
    items = {i.name: i.bytes for i in memory_plan.plan(cfg, shape).items}
    model, _ = model_zoo.load_random_named(name, dtype="float32")
    assert items["policy: fp32 master weights"] == sum(p.numel() * 4 for p in model.parameters())
    cache = rollout.KVCache.allocate(model, cfg.generate_batch_size,
                                     cfg.max_prompt_tokens + cfg.max_new_tokens, torch.bfloat16)
    assert items["sampler: KV cache"] == sum(t.numel() * 2 for t in cache.keys + cache.values)
    lora_cfg = train_ppo.parse_config(["--preset", "paper_lora", "--model", name])
    items = {i.name: i.bytes for i in memory_plan.plan(lora_cfg, shape).items}
    lora.add_adapters(model, lora.LoraConfig(1, 32.0), ("policy", "critic"))
    adapters = [p for a in ("policy", "critic") for p in lora.adapter_parameters(model, a)]
    trained = sum(p.numel() for p in adapters) + shape.hidden  # + the value head
    assert items["adapters and value head: fp32 weights"] == 4 * trained
    assert items["trained: AdamW's two fp32 moments"] == 8 * trained


def test_a_rerun_replaces_its_own_block_and_keeps_the_text_around_it(tmp_path):
    path = tmp_path / "BENCHMARKS.md"
    path.write_text("# Benchmarks\n\nby hand\n")
    bench.write_markdown(path, "table", "first")
    bench.write_markdown(path, "paper memory", "arithmetic")
    bench.write_markdown(path, "table", "second")
    assert path.read_text() == (
        "# Benchmarks\n\nby hand\n\n<!-- bench.py table: begin -->\nsecond\n"
        "<!-- bench.py table: end -->\n\n<!-- bench.py paper memory: begin -->\narithmetic\n"
        "<!-- bench.py paper memory: end -->\n")


def quick_table(sections: str, out) -> list[str]:
    """The rows of `bench.py --quick --only sections` (the table printed last), none failed."""
    cmd = [sys.executable, "bench.py", "--quick", "--only", sections, "--out", str(out)]
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stdout.splitlines()
    final = max(i for i, line in enumerate(lines) if line.startswith("| section | what |"))
    table = [line for line in lines[final + 2:] if line.startswith("| ")]
    assert not [line for line in table if "failed" in line or "nan" in line], \
        result.stderr[-3000:]
    return table


@pytest.mark.slow
def test_quick_bench_runs_every_row_a_gpu_runs(tmp_path):
    """benchmarks/gpu_check.sh's sections: host, generation, paper (decode, the three updates,
    both steps), scaled down on the CPU."""
    table = quick_table("host,generation,paper", tmp_path / "b.md")
    host = [line for line in table if line.startswith("| host |")]
    assert len(host) == 4 and sum("target <= 0.3 ms" in line for line in host) == 1
    generation = [line for line in table if line.startswith("| generation |")]
    for name in rollout_bench.DEFAULT_GENERATORS:
        label = rollout_bench.GENERATORS[name]
        assert sum(f"random-b32 {label}:" in line for line in generation) == 2, name
    paper_rows = [line for line in table if line.startswith("| paper |")]
    for name in ("transformers", "static"):
        assert sum(rollout_bench.GENERATORS[name] in line for line in paper_rows) == 2, name
    assert sum("MFU" in line for line in paper_rows) == len(update_bench.PAPER_UPDATES)
    for label in paper.PAPER_STEPS:
        step = [line for line in paper_rows if f"step, {label}" in line]
        assert len(step) == 3 and "update" in step[1] and "GB" in step[2], step
    written = (tmp_path / "b.md").read_text()
    assert memory_plan.markdown() in written and "<!-- bench.py table: begin -->" in written


@pytest.mark.slow
def test_quick_bench_runs_the_update_and_the_steps_with_and_without_lora(tmp_path):
    table = quick_table("update,step", tmp_path / "b.md")
    update = [line for line in table if line.startswith("| update |")]
    assert sum("plain transformers" in line for line in update) == 2
    assert sum("LoRA rank 1" in line or "full fine-tuning, packed" in line
               for line in update) == 2
    step = [line for line in table if line.startswith("| step |")]
    assert sum("--lora_rank 1" in line for line in step) == 2
    assert any("equal to 1e-6" in line for line in step)
