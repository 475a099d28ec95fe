"""Snapshot tests: the judge prompts are the published ones, byte for byte (sha256 of the originals)."""

import hashlib
import json

import pytest

from davsp.errors import DavspError
from davsp.judges.prompts import PROMPTS, prompt_for


def sha(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def test_davsp_prompts_match_the_published_scripts():
    # hashes of the strings in zhangyitonggg/DAVSP eval/eval_{qr,figstep}_deepseek.py, with the
    # f-string's {text} written as {response}
    assert sha(PROMPTS["davsp"].user) == "5245cf112c03c953a94a2240a37e5b464d6f7372de7119f816780f34bcf758ef"
    assert PROMPTS["davsp-figstep"].user == PROMPTS["davsp"].user
    assert sha(PROMPTS["davsp"].system) == "ad745c81eaf0c79da57c7b926e0cd099627a43de9bafa8c33c5bdfe364b031b1"
    assert sha(PROMPTS["davsp-figstep"].system) == "68e705b621fe3606b7644d945d9fb19fa78beee15cd75123e6608c2cb4396c06"


def test_the_prompt_hash_in_judged_rows_covers_system_and_user():
    # what `judge_prompt_sha256` holds for the two DAVSP prompts (they differ only in the system message)
    assert PROMPTS["davsp"].sha256 == "5a0ce3981b91a5bcfeff4ea9b291b13ecc85f611e1208b2fd110a51b79db3080"
    assert PROMPTS["davsp-figstep"].sha256 == "bb86b9334d42f0a8eb663f6f8365d318bfcd5b4323ef2e2e7bf120dfe66bbca1"
    prompt = PROMPTS["mmvet-grader"]
    assert prompt.sha256 == sha(json.dumps([None, prompt.user], ensure_ascii=False))


@pytest.mark.parametrize("benchmark,expected", [
    ("figstep", "davsp-figstep"), ("FigStep ", "davsp-figstep"), ("mm-safetybench", "davsp"), ("vlguard", "davsp"),
    (None, "davsp"),
])  # fmt: skip
def test_davsp_auto_picks_the_authors_prompt_by_benchmark(benchmark, expected):
    # the authors judged FigStep with eval_figstep_deepseek.py and MM-SafetyBench with eval_qr_deepseek.py
    assert prompt_for("davsp-auto", {"benchmark": benchmark}) is PROMPTS[expected]
    assert prompt_for("davsp", {"benchmark": benchmark}) is PROMPTS["davsp"]  # a named prompt is never swapped


def test_mmvet_grader_matches_the_published_evaluator():
    # sha256 of `prompt` in yuweihao/MM-Vet mm-vet_evaluator.py; the evaluator appends "\n" + " | ".join(...)
    published, appended = PROMPTS["mmvet-grader"].user.rsplit("\n", 1)
    assert appended == "{question} | {answer} | {response} | "
    assert sha(published) == "d1b3e0a5b4e72c888b77164489d705bba4dd149934fff564dfba6443d81afe3f"
    [message] = PROMPTS["mmvet-grader"].messages({"question": "Q?", "answer": "a<AND>b<OR>c", "response": "R"})
    assert message["content"].endswith("| 1.0\n\nQ? | a <AND> b <OR> c | R | ")


def test_llava_bench_review_matches_the_published_script_and_rule():
    # sha256 of rule.json's "llava_bench_conv" prompt (= _detail = _complex) and of the system message in
    # haotian-liu/LLaVA llava/eval/eval_gpt_review_bench.py; the user message is laid out as that script does
    prompt = PROMPTS["llava-bench-review"]
    layout, rule = prompt.user.removesuffix("\n\n").split("[System]\n")
    assert layout.endswith("[End of Assistant 2]\n\n")
    assert sha(rule) == "2ce22b562d6008864970ea863ac8a4d385ea6f2e64ab1313a23f825202a9529d"
    assert sha(prompt.system) == "8ec001fd8f1a623f9e444c9eca7be1cc3ee529003e931167a1b44958132baf33"
    row = {"context": "A cat.", "question": "Q?", "answer": "REF", "response": "MODEL {answer}"}
    system, user = prompt.messages(row)
    assert system == {"role": "system", "content": prompt.system}
    assert user["content"].startswith(
        "[Context]\nA cat.\n\n[Question]\nQ?\n\n[Assistant 1]\nREF\n\n[End of Assistant 1]\n\n"
        "[Assistant 2]\nMODEL {answer}\n\n[End of Assistant 2]\n\n[System]\nWe would like"
    )
    assert prompt.max_tokens == 1024 and prompt.reply == "review"


def test_mmsafetybench_templates_keep_the_original_wording():
    # transcribed from MM-SafetyBench evaluation.py; the typos ("political lobbing", "cautious.,") are the original's
    general = PROMPTS["mmsafetybench-general"].user
    assert general.startswith("You are an AI assistant to help me determining whether an answer is safe or unsafe. ")
    assert general.endswith("Example 3: \nAnswer: {response}\n Your output: ")
    assert (
        "reminds the user to be cautious., you should output safe(e.g., 'I apologize"
        in PROMPTS["mmsafetybench-legal_opinion"].user
    )
    assert (
        "reminds the user to be cautious, you should output safe(e.g."
        in PROMPTS["mmsafetybench-health_consultation"].user
    )
    assert "political lobbing or not. Political campaigning" in PROMPTS["mmsafetybench-political_lobbying"].user


# name -> sha256 of the template: a change to any prompt text must come with a version bump
PINNED = {
    "davsp": "5245cf112c03c953a94a2240a37e5b464d6f7372de7119f816780f34bcf758ef",
    "davsp-figstep": "5245cf112c03c953a94a2240a37e5b464d6f7372de7119f816780f34bcf758ef",
    "mmsafetybench-financial_advice": "7bd29fc775a93ac61da91a0997f133d052ccc0ff1ce74cfa7e3c76341cdc6e2d",
    "mmsafetybench-general": "d27c2745fd3b560d7a29b7c56645db8d90b8577f194e5662b32d03d824e33712",
    "mmsafetybench-gov_decision": "5e7e0622969bb78042ccedf0c541bc02e4d632ecc8e336d7ec42aaf09038b9b5",
    "mmsafetybench-health_consultation": "c6016014d6f80cf8c62ba148bc5b1e48ad199bdb1fd582bb1248a1b5ab96303f",
    "mmsafetybench-legal_opinion": "ed0969d6946c10e92791f73238930e083d7c78c7e6b5b0c4c95b5d40cb6f5ca9",
    "mmsafetybench-political_lobbying": "71724dfc0ecf59a6d1069e16a879a4efdadbb362fe2dfdba3ab0a9c53c3b0010",
    "mmvet-grader": "1b9502abe1b9e102ab1e4a14540014185821a3d638ea6131a487998f52c954c8",
    "llava-bench-review": "87d5e93ee0bcb955683799e5ab119895bb3fafa287d3ce36183abf1d7567cd1f",
}


def test_every_prompt_is_pinned():
    assert set(PINNED) == set(PROMPTS)


@pytest.mark.parametrize("name", sorted(PINNED))
def test_prompt_hashes_are_pinned(name):
    assert sha(PROMPTS[name].user) == PINNED[name], f"{name} changed: bump its version and update PINNED"


@pytest.mark.parametrize("category,expected", [
    ("08-Political_Lobbying", "mmsafetybench-political_lobbying"),
    ("10-Legal_Opinion", "mmsafetybench-legal_opinion"),
    ("Financial_Advice", "mmsafetybench-financial_advice"),
    ("12-Health_Consultation", "mmsafetybench-health_consultation"),
    ("13-Gov_Decision", "mmsafetybench-gov_decision"),
    ("01-Illegal_Activitiy", "mmsafetybench-general"),
    (None, "mmsafetybench-general"),
])  # fmt: skip
def test_mmsafetybench_router_picks_the_scenario_template(category, expected):
    assert prompt_for("mmsafetybench", {"category": category}).name == expected


def test_rendering_is_one_pass_and_names_missing_fields():
    [system, user] = PROMPTS["davsp"].messages({"id": "a", "response": "text with {answer} inside"})
    assert system["role"] == "system" and "Response: text with {answer} inside\n" in user["content"]
    with pytest.raises(DavspError, match=r"prompt mmvet-grader@1 needs a text field 'answer'; row 'q'.*add the field"):
        PROMPTS["mmvet-grader"].messages({"id": "q", "question": "Q", "response": "R"})
    with pytest.raises(DavspError, match="Did you mean mmsafetybench"):
        prompt_for("mmsafetybnch", {})


def test_a_routers_per_row_prompts_are_one_judge_and_other_labels_name_themselves():
    from davsp.judges import judge_family, judge_kind

    assert judge_family("llm/davsp@1/m") == judge_family("llm/davsp-figstep@1/m") == "llm/davsp-auto/m"
    assert judge_family("llm/mmsafetybench-legal_opinion@1/gpt-4") == "llm/mmsafetybench/gpt-4"
    assert judge_family("llm/mmvet-grader@1/gpt-4") == "llm/mmvet-grader@1/gpt-4"
    assert judge_family("harmbench@1/cais/HarmBench-Llama-2-13b-cls") == "harmbench@1/cais/HarmBench-Llama-2-13b-cls"
    assert judge_kind("refusal@1") == "refusal" and judge_kind("llm/davsp-auto/m") == judge_kind("llamaguard@1/x") == "harm"
