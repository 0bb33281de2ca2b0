#!/usr/bin/env python3
"""Writes fixtures/data/: gold tables and samples for `prefer pairs` tests, by real libraries.

Run on the CPU machine (openpyxl is not on the GPU machine):

    pip install pyarrow openpyxl datasets
    python tools/gen_data_fixtures.py            # writes fixtures/data/

What it writes, and why:
- train.parquet, validation.parquet (pyarrow): instruction/output/id, Korean text, a cell with
  newlines and quotes, a null output, a whitespace-only output;
- extra.xlsx (openpyxl): sheet "SFT" with Korean headers 질문/답변 (a newline + quote cell, an
  empty cell, an integer 42 and a float 3.5 where text is expected), and a second sheet "추가"
  with instruction/response headers;
- gold.csv, gold.tsv, gold.json ({split: rows}), gold.jsonl: the same rows in other formats;
- disk/: a DatasetDict written by datasets.save_to_disk (train + validation);
- samples.jsonl: one sample per gold prompt, in `prefer sample`'s output format (id,
  sample_index, the row's fields, prompt, text, finish_reason, ...), plus a truncated, an
  empty, an identical and a duplicate sample and one that matches no gold row;
- expected.json: the prompts rendered by the reference workflow's f-string, and the pairs a
  correct `prefer pairs` run over these files must produce (computed here, independently).
"""
import json
import os
import shutil
import sys

import pyarrow as pa
import pyarrow.parquet as pq
from openpyxl import Workbook

OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "fixtures", "data")


def korean(instruction):
    # The reference workflow's template, as its notebook writes it.
    return f"아래는 문제를 설명하는 지시사항입니다. 이 요청에 대해 적절하게 답변해주세요.\n\n###지시사항:\n{instruction}\n\n###답변:\n"


TRAIN = [
    {"id": "t1", "instruction": "자동차 보험의 대인배상이란 무엇인가요?", "output": "대인배상은 사고로 다른 사람을 다치게 했을 때 보상하는 담보입니다."},
    {"id": "t2", "instruction": "보험료 납입을 \"연체\"하면\n어떻게 되나요?", "output": "납입 유예기간이 지나면 계약이 \"실효\"될 수 있습니다.\n부활 청약이 가능합니다."},
    {"id": "t3", "instruction": "실손보험의 자기부담금은?", "output": None},
    {"id": "t4", "instruction": "보험 계약자와 피보험자의 차이는?", "output": "계약자는 계약을 맺고 보험료를 내는 사람, 피보험자는 보험 사고의 대상입니다."},
    {"id": "t5", "instruction": "해지환급금은 언제 받나요?", "output": "   "},
    {"id": "t6", "instruction": "보험금 청구 서류는 무엇인가요?", "output": "청구서, 신분증 사본, 진단서가 필요합니다."},
]
VALIDATION = [
    {"id": "v1", "instruction": "암보험의 면책기간은 얼마인가요?", "output": "보통 계약일로부터 90일입니다."},
    {"id": "v2", "instruction": "태아보험은 언제 가입하나요?", "output": "임신 22주 이내 가입을 권장합니다."},
]
# extra.xlsx sheet "SFT": (질문, 답변) cells, exactly as openpyxl stores them.
XLSX_SFT = [
    ("운전자보험과 자동차보험의 차이는?", "운전자보험은 형사·행정 책임을, 자동차보험은 민사 배상을 보장합니다."),
    ("보장 \"한도\"는\n어떻게 정하나요?", "약관의 \"보상한도\"를 따릅니다.\n특약마다 다릅니다."),
    ("빈 답변 행", None),
    ("숫자 답변 행 (정수)", 42),
    ("숫자 답변 행 (실수)", 3.5),
]
XLSX_EXTRA = [
    ("추가 시트 질문입니다", "추가 시트 답변입니다"),
]


def write_parquet():
    for name, rows in (("train", TRAIN), ("validation", VALIDATION)):
        table = pa.table({
            "id": pa.array([r["id"] for r in rows], pa.string()),
            "instruction": pa.array([r["instruction"] for r in rows], pa.string()),
            "output": pa.array([r["output"] for r in rows], pa.string()),
        })
        pq.write_table(table, os.path.join(OUT, f"{name}.parquet"), compression="snappy")


def write_xlsx():
    wb = Workbook()
    ws = wb.active
    ws.title = "SFT"
    ws.append(["질문", "답변"])
    for q, a in XLSX_SFT:
        ws.append([q, a])
    ws2 = wb.create_sheet("추가")
    ws2.append(["instruction", "response"])
    for q, a in XLSX_EXTRA:
        ws2.append([q, a])
    # Fixed document dates (openpyxl still stamps the zip entries with the time of writing).
    import datetime
    fixed = datetime.datetime(2024, 1, 1)
    wb.properties.created = fixed
    wb.properties.modified = fixed
    wb.save(os.path.join(OUT, "extra.xlsx"))


def write_text_formats():
    import csv
    rows = [r for r in TRAIN if r["output"] is not None]
    for name, delim in (("gold.csv", ","), ("gold.tsv", "\t")):
        with open(os.path.join(OUT, name), "w", newline="", encoding="utf-8") as f:
            w = csv.writer(f, delimiter=delim)
            w.writerow(["instruction", "output"])
            for r in rows:
                w.writerow([r["instruction"], r["output"]])
    with open(os.path.join(OUT, "gold.json"), "w", encoding="utf-8") as f:
        json.dump({"train": TRAIN, "validation": VALIDATION}, f, ensure_ascii=False, indent=1)
    with open(os.path.join(OUT, "gold.jsonl"), "w", encoding="utf-8") as f:
        for r in TRAIN:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")


def write_disk():
    from datasets import Dataset, DatasetDict
    path = os.path.join(OUT, "disk")
    shutil.rmtree(path, ignore_errors=True)
    dd = DatasetDict({
        "train": Dataset.from_list(TRAIN),
        "validation": Dataset.from_list(VALIDATION),
    })
    dd.save_to_disk(path)


def text_rule(cell):
    """docs/pairs.md's text rule: None/blank -> dropped; integral numbers -> int text."""
    if cell is None:
        return None
    if isinstance(cell, (int, float)) and not isinstance(cell, bool):
        return str(int(cell)) if float(cell).is_integer() else repr(float(cell))
    return None if cell.strip() == "" else cell


def write_samples_and_expected():
    """samples.jsonl in `prefer sample`'s output format: id (the row's id column, else
    FILE:ROW), sample_index, the input row's fields, prompt, prompt_token_count, text,
    token_ids, finish_reason, stop_reason, cumulative_logprob."""
    # (split, id, copied fields, instruction, gold output)
    gold = []
    for r in TRAIN:
        gold.append(("train", r["id"], dict(r), r["instruction"], r["output"]))
    for i, (q, a) in enumerate(XLSX_SFT):
        gold.append(("train", f"extra.xlsx:{i}", {"질문": q, "답변": a}, q, a))
    for r in VALIDATION:
        gold.append(("validation", r["id"], dict(r), r["instruction"], r["output"]))

    def sample(row_id, index, fields, prompt, text, finish):
        out = {"id": row_id, "sample_index": index}
        out.update({k: v for k, v in fields.items() if k != "id"})
        out.update({"prompt": prompt, "prompt_token_count": 17, "text": text, "token_ids": [5, 6, 7],
                    "finish_reason": finish, "stop_reason": None, "cumulative_logprob": -3.25})
        return out

    samples = []
    expected = {"train": [], "validation": []}
    for split, row_id, fields, instruction, output in gold:
        chosen = text_rule(output)
        if chosen is None:
            continue  # dropped at ingest (empty gold answer): not sampled either
        prompt = korean(instruction)
        rejected = f"모델의 답변 {row_id}: " + instruction[:10]
        samples.append(sample(row_id, 0, fields, prompt, rejected, "stop"))
        expected[split].append({"prompt": prompt, "chosen": chosen, "rejected": rejected})
    # Filter cases on the first train row (more samples of the same prompt and id).
    first = gold[0]
    p0, c0 = korean(first[3]), first[4]
    samples.append(sample(first[1], 1, first[2], p0, "길게 이어지다 잘린 답변", "length"))
    samples.append(sample(first[1], 2, first[2], p0, " \n ", "stop"))
    samples.append(sample(first[1], 3, first[2], p0, "  " + c0.replace(" ", "\n  ") + " ", "stop"))
    samples.append(sample(first[1], 4, first[2], p0, samples[0]["text"], "stop"))  # duplicate pair
    samples.append(sample("orphan", 0, {}, "짝이 없는 프롬프트", "x", "stop"))
    with open(os.path.join(OUT, "samples.jsonl"), "w", encoding="utf-8") as f:
        for s in samples:
            f.write(json.dumps(s, ensure_ascii=False) + "\n")
    with open(os.path.join(OUT, "expected.json"), "w", encoding="utf-8") as f:
        json.dump({"pairs": expected,
                   "korean_prompts": {r["instruction"]: korean(r["instruction"]) for r in TRAIN}},
                  f, ensure_ascii=False, indent=1)


def main():
    os.makedirs(OUT, exist_ok=True)
    write_parquet()
    write_xlsx()
    write_text_formats()
    write_disk()
    write_samples_and_expected()
    print("wrote", os.path.abspath(OUT), file=sys.stderr)


if __name__ == "__main__":
    main()
