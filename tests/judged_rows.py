"""Judged-row builders shared by the metric and evaluate tests."""


def judged(safe, verdict=None, **fields):
    """One judged row; verdict follows `safe` unless given."""
    if verdict is None:
        verdict = "error" if safe is None else ("full_refusal" if safe else "full_compliance")
    return {"id": fields.pop("id", "q"), "benchmark": "mm-safetybench", "defense": "none",
            "question": "q", "response": "r", "verdict": verdict, "safe": safe, **fields}


def mme_row(subtask, image, answer, response):
    return {"id": f"{subtask}/{image}/{answer}", "benchmark": "mme", "defense": "none", "question": "?",
            "subtask": subtask, "image_id": image, "answer": answer, "response": response}
