#!/usr/bin/env python3
"""Build prefer's small fixture tokenizer: fixtures/tokenizer/.

A byte-level BPE (like GPT-2 / Llama-3 / Qwen2) trained with the `tokenizers`
library on a corpus embedded below (Korean and English instruction-style text,
the reference workflow's Korean prompt template, numbers, punctuation, code).
All 256 byte symbols are in the vocabulary, so any UTF-8 text encodes.

Ids 0..=3 are <pad>, <eos>, <bos>, <unk>; then <start_of_turn>, <end_of_turn>,
<|im_start|>, <|im_end|>. A TemplateProcessing post-processor prepends <bos> to
single sequences (as Gemma/Llama do), so `tok(text).input_ids` starts with 2.

The output is deterministic: the corpus order is fixed and BPE training on one
thread-independent word-count table gives the same merges every run (checked by
running the script twice and comparing bytes; see --check).

Needs: pip install tokenizers transformers jinja2 (transformers only for the
round-trip check at the end). Run from anywhere:

    python3 tools/make_tokenizer.py            # writes fixtures/tokenizer/
    python3 tools/make_tokenizer.py --check    # rebuild in a temp dir, compare bytes
"""

from __future__ import annotations

import argparse
import filecmp
import json
import os
import sys
import tempfile
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

REPO = Path(__file__).resolve().parent.parent
OUT_DIR = REPO / "fixtures" / "tokenizer"
GEMMA_TEMPLATE = REPO / "fixtures" / "templates" / "gemma.jinja"

# Total vocabulary size, special tokens included. Deliberately not a multiple
# of 8 so a model whose embedding is padded (vocab_size > len(tokenizer)) is a
# distinct case from one whose vocab equals the tokenizer's.
VOCAB_SIZE = 1003

SPECIAL_TOKENS = [
    "<pad>",  # 0
    "<eos>",  # 1
    "<bos>",  # 2
    "<unk>",  # 3
    "<start_of_turn>",  # 4
    "<end_of_turn>",  # 5
    "<|im_start|>",  # 6
    "<|im_end|>",  # 7
]

KOREAN_TEMPLATE = (
    "아래는 문제를 설명하는 지시사항입니다. 이 요청에 대해 적절하게 답변해주세요.\n\n"
    "###지시사항:\n{instruction}\n\n###답변:\n"
)

INSTRUCTIONS_KO = [
    "보험 계약을 해지하면 환급금은 얼마나 받을 수 있나요?",
    "자동차 보험의 자기부담금이 무엇인지 설명해 주세요.",
    "실손 의료보험과 정액형 보험의 차이를 알려주세요.",
    "다음 문장을 영어로 번역하세요: 오늘은 날씨가 맑습니다.",
    "파이썬으로 리스트의 합을 구하는 함수를 작성하세요.",
    "한국의 수도는 어디인가요?",
    "건강을 유지하기 위한 세 가지 방법을 제시하세요.",
    "다음 글을 세 문장으로 요약해 주세요.",
    "보험금 청구에 필요한 서류는 무엇인가요?",
    "암 진단비 특약의 보장 범위를 설명해 주세요.",
    "연금 보험은 언제부터 수령할 수 있나요?",
    "태풍으로 인한 차량 침수는 보상되나요?",
    "해외여행 중 병원비는 어떻게 청구하나요?",
    "피보험자와 계약자의 차이는 무엇인가요?",
    "1부터 100까지의 합을 계산하세요.",
    "서울에서 부산까지 기차로 몇 시간 걸리나요?",
]

ANSWERS_KO = [
    "계약을 해지하면 납입한 보험료에서 사업비 등을 뺀 해지환급금을 받을 수 있습니다.",
    "자기부담금은 사고가 났을 때 보험 가입자가 직접 부담하는 금액입니다.",
    "실손 의료보험은 실제로 쓴 의료비를 보상하고, 정액형 보험은 정해진 금액을 지급합니다.",
    "The weather is clear today.",
    "def total(xs):\n    return sum(xs)",
    "한국의 수도는 서울입니다.",
    "규칙적인 운동, 균형 잡힌 식사, 충분한 수면이 중요합니다.",
    "보험금 청구서, 신분증 사본, 진단서 또는 영수증이 필요합니다.",
    "암 진단비 특약은 약관에서 정한 암으로 진단 확정되었을 때 보험금을 지급합니다.",
    "연금 개시 나이는 계약할 때 정하며 보통 55세 이후부터 받을 수 있습니다.",
    "자기차량손해 담보에 가입했다면 태풍으로 인한 침수 피해도 보상받을 수 있습니다.",
    "현지 병원의 진료비 영수증과 진단서를 준비해 귀국 후 청구하면 됩니다.",
    "계약자는 보험료를 내는 사람이고, 피보험자는 보험 사고의 대상이 되는 사람입니다.",
    "1부터 100까지의 합은 5050입니다.",
    "KTX로 약 2시간 30분 정도 걸립니다.",
    "네, 알겠습니다. 더 궁금한 점이 있으면 말씀해 주세요!",
]

SENTENCES_KO = [
    "안녕하세요. 무엇을 도와드릴까요?",
    "이 요청에 대해 적절하게 답변해주세요.",
    "아래는 문제를 설명하는 지시사항입니다.",
    "질문에 대한 답변을 작성하세요.",
    "###질문:\n보험료는 어떻게 계산되나요?\n\n###답변:\n",
    "감사합니다. 좋은 하루 보내세요.",
    "죄송하지만 그 질문에는 답변할 수 없습니다.",
    "가입 조건과 보장 내용은 상품마다 다릅니다.",
    "자세한 내용은 약관을 확인하시기 바랍니다.",
    "고객센터 전화번호는 1588-0000입니다.",
    "2024년 3월 15일에 계약이 체결되었습니다.",
    "월 보험료는 35,000원이며 20년 동안 납입합니다.",
    "“따옴표”와 ‘작은따옴표’, 그리고 (괄호)와 [대괄호]를 사용합니다.",
    "한글, 영어, 숫자 123, 기호 !@#$%^&*()가 섞인 문장입니다.",
    "맑은 날씨에는 산책을 하는 것이 좋습니다.",
    "인공지능 모델은 데이터로부터 학습합니다.",
    "선호도 학습은 선택된 답변과 거절된 답변을 비교합니다.",
]

SENTENCES_EN = [
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.",
    "### Instruction:\nSummarize the following paragraph.\n\n### Response:\n",
    "The quick brown fox jumps over the lazy dog.",
    "Explain the difference between a list and a tuple in Python.",
    "What is the capital of France? The capital of France is Paris.",
    "Please answer the question in one sentence.",
    "You are a helpful assistant.",
    "Translate the following sentence into Korean.",
    "Insurance premiums are paid monthly, quarterly or yearly.",
    "The model generates a response for every prompt in the dataset.",
    "Direct preference optimization trains on chosen and rejected responses.",
    "Numbers: 0 1 2 3 4 5 6 7 8 9 10 42 100 256 1024 3.14159 -7 1e-5 2,048",
    "Dates like 2024-03-15 and times like 09:30:00 appear in logs.",
    "Punctuation: , . ; : ! ? ' \" ( ) [ ] { } < > / \\ | - _ + = * & ^ % $ # @ ~ `",
    "I can't believe it's already December! Isn't it?",
    "Hello, world! How are you today?",
]

CODE = [
    "def add(a, b):\n    return a + b\n",
    "for i in range(10):\n    print(i * i)\n",
    "import json\n\nwith open('data.json') as f:\n    rows = json.load(f)\n",
    'fn main() {\n    println!("Hello, {}!", name);\n}\n',
    "let mut total = 0;\nfor x in xs.iter() {\n    total += x;\n}\n",
    "if (x > 0 && y < 10) { return x; } else { return -1; }",
    "SELECT name, age FROM users WHERE age >= 20 ORDER BY name;",
    '{"prompt": "질문", "chosen": "좋은 답변", "rejected": "나쁜 답변"}',
    "\t\tindented with tabs\n    indented with spaces\n",
]


def corpus() -> list[str]:
    """The training corpus, in a fixed order (determinism)."""
    lines: list[str] = []
    for instruction, answer in zip(INSTRUCTIONS_KO, ANSWERS_KO):
        lines.append(KOREAN_TEMPLATE.format(instruction=instruction) + answer)
    lines += INSTRUCTIONS_KO + ANSWERS_KO + SENTENCES_KO + SENTENCES_EN + CODE
    # Chat-format pieces, so the special-token neighbourhoods get merges too.
    for instruction, answer in zip(INSTRUCTIONS_KO[:6], ANSWERS_KO[:6]):
        lines.append(f"<start_of_turn>user\n{instruction}<end_of_turn>\n<start_of_turn>model\n{answer}<end_of_turn>\n")
        lines.append(f"<|im_start|>user\n{instruction}<|im_end|>\n<|im_start|>assistant\n{answer}<|im_end|>\n")
    return lines


def build() -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        min_frequency=1,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus(), trainer=trainer)
    bos_id = tok.token_to_id("<bos>")
    tok.post_processor = processors.TemplateProcessing(
        single="<bos> $A",
        pair="<bos> $A <bos>:1 $B:1",
        special_tokens=[("<bos>", bos_id)],
    )
    return tok


def write(out_dir: Path) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    tok = build()
    for i, name in enumerate(SPECIAL_TOKENS):
        got = tok.token_to_id(name)
        if got != i:
            sys.exit(f"special token {name!r} got id {got}, expected {i}")
    tok.save(str(out_dir / "tokenizer.json"), pretty=True)

    chat_template = GEMMA_TEMPLATE.read_text(encoding="utf-8")
    added = {
        str(i): {
            "content": name,
            "lstrip": False,
            "normalized": False,
            "rstrip": False,
            "single_word": False,
            "special": True,
        }
        for i, name in enumerate(SPECIAL_TOKENS)
    }
    config = {
        "add_bos_token": True,
        "add_eos_token": False,
        "added_tokens_decoder": added,
        "additional_special_tokens": SPECIAL_TOKENS[4:],
        "bos_token": "<bos>",
        "chat_template": chat_template,
        "clean_up_tokenization_spaces": False,
        "eos_token": "<eos>",
        "model_max_length": 4096,
        "pad_token": "<pad>",
        "padding_side": "left",
        "tokenizer_class": "PreTrainedTokenizerFast",
        "unk_token": "<unk>",
    }
    (out_dir / "tokenizer_config.json").write_text(
        json.dumps(config, ensure_ascii=False, indent=2) + "\n", encoding="utf-8"
    )
    special_map = {
        "additional_special_tokens": SPECIAL_TOKENS[4:],
        "bos_token": "<bos>",
        "eos_token": "<eos>",
        "pad_token": "<pad>",
        "unk_token": "<unk>",
    }
    (out_dir / "special_tokens_map.json").write_text(
        json.dumps(special_map, ensure_ascii=False, indent=2) + "\n", encoding="utf-8"
    )


def verify(out_dir: Path) -> None:
    """Load with transformers exactly as gen_fixtures.py will, and check round trips."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(out_dir))
    n = len(tok)
    if n != VOCAB_SIZE:
        sys.exit(f"len(tokenizer) = {n}, expected {VOCAB_SIZE} (corpus too small for the merges?)")
    # Every byte symbol must be in the vocabulary (byte-level alphabet present),
    # so no text can ever need <unk>.
    vocab = Tokenizer.from_file(str(out_dir / "tokenizer.json")).get_vocab()
    missing = [c for c in pre_tokenizers.ByteLevel.alphabet() if c not in vocab]
    if missing:
        sys.exit(f"byte symbols missing from the vocabulary: {missing}")
    for text in [
        KOREAN_TEMPLATE.format(instruction="보험금은 언제 지급되나요?"),
        "Mixed 한국어 and English, 숫자 12345, emoji 🙂🚀, 漢字.",
        "  leading and trailing spaces  \n\n\ttab",
        "텍스트 안의 <eos> 특수 토큰",
    ]:
        ids = tok(text).input_ids
        if ids[0] != tok.bos_token_id:
            sys.exit(f"no <bos> prepended: {ids[:5]}")
        back = tok.decode(ids, skip_special_tokens=False)
        if back != "<bos>" + text:
            sys.exit(f"round trip failed:\n{text!r}\n{back!r}")
        plain = tok(text, add_special_tokens=False).input_ids
        if tok.decode(plain) != text:
            sys.exit(f"round trip without specials failed: {text!r}")
    rendered = tok.apply_chat_template(
        [{"role": "user", "content": "안녕?"}], tokenize=False, add_generation_prompt=True
    )
    if rendered != "<bos><start_of_turn>user\n안녕?<end_of_turn>\n<start_of_turn>model\n":
        sys.exit(f"chat template renders unexpectedly: {rendered!r}")
    print(f"ok: {out_dir} (len {n}, bos {tok.bos_token_id}, eos {tok.eos_token_id}, pad {tok.pad_token_id})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="rebuild in a temp dir and compare with fixtures/tokenizer")
    parser.add_argument("--out", type=Path, default=OUT_DIR)
    args = parser.parse_args()
    if args.check:
        with tempfile.TemporaryDirectory() as tmp:
            write(Path(tmp))
            names = sorted(os.listdir(tmp))
            _, mismatch, errors = filecmp.cmpfiles(tmp, OUT_DIR, names, shallow=False)
            if mismatch or errors:
                sys.exit(f"fixtures/tokenizer differs from a fresh build: {mismatch + errors}")
            print("ok: fixtures/tokenizer matches a fresh build")
        return
    write(args.out)
    verify(args.out)


if __name__ == "__main__":
    main()
