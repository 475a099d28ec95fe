"""Judged-row builders shared by the metric and evaluate tests."""


def judged(safe, verdict=None, judge="refusal@1", **fields):
    """One judged row; verdict follows `safe` (as the refusal judge's classes, or a harm judge's safe /
    unsafe when `judge` is not the refusal judge) unless given."""
    if verdict is None:
        refusal = judge.startswith("refusal@")
        verdict = "error" if safe is None else (
            ("full_refusal" if safe else "full_compliance") if refusal else ("safe" if safe else "unsafe"))
    return {"id": fields.pop("id", "q"), "benchmark": "mm-safetybench", "defense": "none",
            "question": "q", "response": "r", "verdict": verdict, "safe": safe, "judge": judge, **fields}


def mme_row(subtask, image, answer, response):
    return {"id": f"{subtask}/{image}/{answer}", "benchmark": "mme", "defense": "none", "question": "?",
            "subtask": subtask, "image_id": image, "answer": answer, "response": response}
