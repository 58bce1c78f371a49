"""Cut the embedded demo subset out of the full data folder again (demo_data/README.md says what
each file holds and why):

    python -m demo_data.build ../shared/data   # from the repository's root; writes into demo_data/

  - medqa/4_options/dev.jsonl: the demo's training set. The questions of the full dev set whose
    prompt fits the demo's --max_prompt_tokens, as the demo builds it (train_ppo.py's preset demo:
    its model's tokenizer, prompt style and option shuffle), the first DEV_COUNT of them in file
    order. A question taken from the middle of the file would get another line number, and so
    another id, than in the full set: each line is the full set's record with its id, in the
    generic jsonl schema data.load_mcqa reads.
  - medqa/4_options/test.jsonl, mmlu_pro_health/test.jsonl: the first 100 questions of each set.
  - pubmedqa/test_pmids.txt: the pmids of PubMedQA's official test split, in its order.

It loads the demo's model once (its tokenizer counts the prompts' tokens) and prints the sha256 of
each file written, for the README's table.
"""
import dataclasses
import hashlib
import json
import sys
from pathlib import Path

import data
import experience
import model
import train_ppo

HERE = Path(__file__).resolve().parent
DEV_COUNT = 200  # at most; the full dev set may have fewer prompts that fit
TEST_COUNT = 100


def fits_the_demo(records: list, cfg, tokenizer) -> list:
    """The first DEV_COUNT records whose prompt fits cfg.max_prompt_tokens, as the demo will build
    it from the file written here. The demo shuffles the options of the k-th record of the file it
    reads with seed cfg.seed + k (experience.training_prompts), so a record is tried with the seed
    of the place it would take in the subset, not of its place in the full file."""
    kept = []
    for record in records:
        if cfg.shuffle_options:
            shown = data.shuffle_options(record, cfg.seed + len(kept))
        else:
            shown = record
        prompt = data.build_prompt(shown, cfg.prompt_style, tokenizer) + cfg.prefill
        _, _, fits, _ = data.tokenize_prompts(tokenizer, [prompt], cfg.max_prompt_tokens)
        if fits:
            kept.append(record)
        if len(kept) == DEV_COUNT:
            break
    return kept


def write(relative: str, text: str) -> Path:
    path = HERE / relative
    path.write_text(text, encoding="utf-8")
    print(f"{relative}: {hashlib.sha256(path.read_bytes()).hexdigest()}")
    return path


def build_dev(full_data: Path) -> None:
    cfg = train_ppo.parse_config(["--preset", "demo"])
    tokenizer = model.load_policy(cfg.model)[1]
    records = data.load_mcqa(full_data / "medqa/4_options/dev.jsonl")
    kept = fits_the_demo(records, cfg, tokenizer)
    text = "".join(json.dumps(record, ensure_ascii=False) + "\n" for record in kept)
    path = write("medqa/4_options/dev.jsonl", text)
    # The file as the trainer reads it: every prompt kept, none left out.
    logged = []
    demo = dataclasses.replace(cfg, train_data=str(path))
    trained_on = experience.training_prompts(demo, tokenizer, logged.append)[0]
    if logged or len(trained_on) != len(kept):
        raise SystemExit(f"build.py: the demo leaves prompts of {path} out: {logged}")
    print(f"  {len(kept)} of {len(records)} dev questions; the last is {kept[-1]['id']}")


def build_first_lines(full_data: Path) -> None:
    for relative in ("medqa/4_options/test.jsonl", "mmlu_pro_health/test.jsonl"):
        lines = (full_data / relative).read_text(encoding="utf-8").split("\n")[:TEST_COUNT]
        if relative.startswith("medqa"):
            # MetaMap phrases: a third of the bytes, and data.py does not read them. Written again
            # with json.dumps, the other fields give the source's lines back exactly.
            rows = [json.loads(line) for line in lines]
            for row in rows:
                del row["metamap_phrases"]
            lines = [json.dumps(row, ensure_ascii=False) for row in rows]
        write(relative, "".join(line + "\n" for line in lines))


def build_pubmedqa_test_pmids(full_data: Path) -> None:
    truth = json.loads((full_data / "pubmedqa/test_ground_truth.json").read_text())
    write("pubmedqa/test_pmids.txt", "".join(pmid + "\n" for pmid in truth))


def main(argv: list) -> None:
    if len(argv) != 1 or not Path(argv[0], "medqa/4_options/dev.jsonl").is_file():
        raise SystemExit("usage: python -m demo_data.build DATA_FOLDER (the full data folder, "
                         "with medqa/4_options/dev.jsonl)")
    full_data = Path(argv[0])
    build_first_lines(full_data)
    build_pubmedqa_test_pmids(full_data)
    build_dev(full_data)


if __name__ == "__main__":
    main(sys.argv[1:])
