#!/usr/bin/env python3
"""Render prefer's chat-template fixtures: fixtures/templates/cases.json.

The two templates, fixtures/templates/gemma.jinja and chatml.jinja, are
hand-written files (committed). Each case is rendered by transformers'
`apply_chat_template(messages, chat_template=..., tokenize=False,
add_generation_prompt=...)` with the fixture tokenizer (fixtures/tokenizer/),
so `expected` is exactly what transformers produces: jinja2 with trim_blocks
and lstrip_blocks, `tojson` without ASCII escaping, `raise_exception`, and the
tokenizer's special tokens (bos_token "<bos>", eos_token "<eos>") in scope.
A case whose template raises records "error": true and the message instead.

Needs: pip install "transformers==5.17.*" tokenizers jinja2 (no torch).

    python3 tools/gen_template_fixtures.py           # writes cases.json
    python3 tools/gen_template_fixtures.py --check   # re-render, compare with cases.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
TEMPLATES = REPO / "fixtures" / "templates"
TOKENIZER_DIR = REPO / "fixtures" / "tokenizer"

KOREAN_TEMPLATE = (
    "아래는 문제를 설명하는 지시사항입니다. 이 요청에 대해 적절하게 답변해주세요.\n\n"
    "###지시사항:\n보험 계약을 해지하면 환급금은 얼마나 받을 수 있나요?\n\n###답변:\n"
)


def U(content) -> dict:
    return {"role": "user", "content": content}


def A(content) -> dict:
    return {"role": "assistant", "content": content}


def S(content) -> dict:
    return {"role": "system", "content": content}


# (name, template, messages, add_generation_prompt)
CASES = [
    # --- gemma.jinja ---
    ("gemma_single_user", "gemma.jinja", [U("안녕하세요! 보험료는 어떻게 계산되나요?")], True),
    ("gemma_korean_template_prompt", "gemma.jinja", [U(KOREAN_TEMPLATE)], True),
    ("gemma_multi_turn_no_gen_prompt", "gemma.jinja",
     [U("첫 번째 질문: \"따옴표\"와 '작은따옴표'"), A("  답변입니다 {중괄호} 포함.\n\n  "),
      U("두 번째 질문\n여러 줄\n입니다")], False),
    ("gemma_system_folded", "gemma.jinja",
     [S("  당신은 보험 전문가입니다.\n항상 존댓말을 쓰세요.\n"), U("자기부담금이 뭔가요?"),
      A("사고 때 가입자가 직접 내는 금액입니다."), U("고마워요 🙂")], True),
    ("gemma_literal_template_syntax", "gemma.jinja",
     [U("Show me {{ this }} and {% that %} and {# a comment #} literally.")], True),
    ("gemma_system_only", "gemma.jinja", [S("시스템 메시지만 있습니다.")], True),
    ("gemma_error_two_users", "gemma.jinja", [U("하나"), U("둘")], True),
    ("gemma_error_assistant_first", "gemma.jinja", [A("제가 먼저 말합니다."), U("네?")], False),
    ("gemma_error_system_not_first", "gemma.jinja", [U("질문"), S("늦은 시스템 메시지")], True),
    # --- chatml.jinja ---
    ("chatml_default_system", "chatml.jinja", [U("한국의 수도는 어디인가요?")], True),
    ("chatml_own_system_no_gen_prompt", "chatml.jinja",
     [S("You are a terse assistant."), U("1+1?"), A("2")], False),
    ("chatml_metadata_tojson", "chatml.jinja",
     [U("메타데이터가 있는 질문"),
      A("답변", ) | {"metadata": {"출처": "약관 제3조", "quote": "그는 \"예\"라고 했다", "brace": "{열림",
                                 "html": "<b>굵게</b> & 'x'",
                                 "tags": ["보험", "자동차", 3, 2.5, True, None], "nested": {"k": "ü é 🙂"}}},
      U("다음 질문입니다.\n\t탭과 줄바꿈")], True),
    ("chatml_metadata_null_skipped", "chatml.jinja", [U("질문") | {"metadata": None}], True),
    ("chatml_multiline_korean", "chatml.jinja",
     [U(KOREAN_TEMPLATE), A("해지환급금은 납입 보험료에서\n사업비를 뺀 금액입니다.\n")], False),
    ("chatml_special_token_text", "chatml.jinja",
     [U("텍스트 안의 <|im_end|> 와 <eos> 문자열")], True),
]


def render_all() -> list[dict]:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(TOKENIZER_DIR))
    out = []
    for name, template, messages, add_gen in CASES:
        source = (TEMPLATES / template).read_text(encoding="utf-8")
        case = {
            "name": name,
            "template": template,
            "messages": messages,
            "add_generation_prompt": add_gen,
            "bos_token": tok.bos_token,
            "eos_token": tok.eos_token,
        }
        try:
            rendered = tok.apply_chat_template(
                messages, chat_template=source, tokenize=False, add_generation_prompt=add_gen
            )
            if not isinstance(rendered, str):
                raise TypeError(f"apply_chat_template returned {type(rendered).__name__}, expected str")
            case["expected"] = rendered
        except TypeError:
            raise
        except Exception as e:  # the template's raise_exception → jinja2 TemplateError
            case["error"] = True
            case["error_message"] = str(e)
        out.append(case)
    return out


def crosscheck(cases: list[dict]) -> None:
    """Re-render every case with a plain jinja2 sandbox configured as transformers documents
    (trim_blocks, lstrip_blocks, loopcontrols, non-escaping tojson, raise_exception) and
    require the same results; also show that both whitespace flags matter."""
    import jinja2
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def agreeing(trim_blocks: bool, lstrip_blocks: bool) -> int:
        env = ImmutableSandboxedEnvironment(
            trim_blocks=trim_blocks, lstrip_blocks=lstrip_blocks, extensions=["jinja2.ext.loopcontrols"]
        )
        env.filters["tojson"] = lambda x, indent=None: json.dumps(x, ensure_ascii=False, indent=indent)
        env.globals["raise_exception"] = raise_exception
        same = 0
        for c in cases:
            template = env.from_string((TEMPLATES / c["template"]).read_text(encoding="utf-8"))
            try:
                out = template.render(messages=c["messages"], add_generation_prompt=c["add_generation_prompt"],
                                      bos_token=c["bos_token"], eos_token=c["eos_token"])
                same += (not c.get("error")) and out == c["expected"]
            except jinja2.exceptions.TemplateError:
                same += bool(c.get("error"))
        return same

    full = agreeing(True, True)
    if full != len(cases):
        sys.exit(f"plain jinja2 agrees with transformers on only {full} of {len(cases)} cases")
    no_trim, no_lstrip = agreeing(False, True), agreeing(True, False)
    print(f"cross-check: jinja2 agrees on {full}/{len(cases)}; without trim_blocks {no_trim}, "
          f"without lstrip_blocks {no_lstrip}")


def dumps(cases: list[dict]) -> str:
    return json.dumps(cases, ensure_ascii=False, indent=1) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="re-render and compare with cases.json")
    args = parser.parse_args()
    import transformers

    cases = render_all()
    crosscheck(cases)
    text = dumps(cases)
    path = TEMPLATES / "cases.json"
    if args.check:
        if path.read_text(encoding="utf-8") != text:
            sys.exit(f"{path} differs from a fresh render (transformers {transformers.__version__})")
        print(f"ok: {path} matches transformers {transformers.__version__}")
        return
    errors = [c["name"] for c in cases if c.get("error")]
    expected_errors = [c[0] for c in CASES if "_error_" in c[0]]
    if errors != expected_errors:
        sys.exit(f"cases that raised: {errors}; expected exactly {expected_errors}")
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)
    print(f"wrote {path}: {len(cases)} cases ({len(errors)} raising), transformers {transformers.__version__}")


if __name__ == "__main__":
    main()
