"""The AST checker against BFCL's own: 1,000 entries generated in BFCL's format (functions, possible answers, model
results as pythonic text) — correct calls and corrupted ones, a third of the functions with dotted names.

BFCL's verdicts for this sample are in tests/data/bfcl_verdicts.json. bfcl-eval is no test dependency (it pins
numpy 1.26 and pulls model SDKs, sentence-transformers and faiss), so they were computed once with bfcl-eval
2026.3.23's decoder (`default_decode_ast_prompting`) and checker (`ast_checker`, Python), and every verdict that
differs from the generator's intent was checked by hand; the file records the sample's hash, so a changed generator
fails here instead of comparing against verdicts of another sample.
"""

from __future__ import annotations

import hashlib
import json
import random
from pathlib import Path

from posttrain.chat import parse_completion
from posttrain.tools import encode_tool_calls, make_call
from rewards.tool_eval import evaluate_tool_calls, from_bfcl

VERDICTS = Path(__file__).resolve().parent / "data" / "bfcl_verdicts.json"
CATEGORIES = ("simple", "multiple", "parallel", "parallel_multiple")
N_PER_CATEGORY = 250

# (name, description, {param: (type, required, acceptable values per answer)}); strings come with the spellings a
# grader accepts, numbers and lists as BFCL writes them
FUNCTIONS = [
    ("math.factorial", "Factorial of a number", {"number": ("integer", True, [[5], [7], [10]])}),
    ("geometry.area_circle", "Area of a circle", {"radius": ("float", True, [[3.0], [4.5], [10.0]]),
                                                  "units": ("string", False, [["meters", "m"], ["cm"]])}),
    ("finance.compound_interest", "Compound interest",
     {"principal": ("float", True, [[1000.0], [2500.5]]), "rate": ("float", True, [[0.05], [0.07]]),
      "years": ("integer", True, [[3], [10]]), "compounding": ("string", False, [["monthly"], ["yearly", "annual"]])}),
    ("weather.forecast.get", "Weather forecast", {"location": ("string", True, [["New York, NY", "NYC"],
                                                                                ["San Francisco, CA", "SF"]]),
                                                  "days": ("integer", False, [[3], [5]])}),
    ("get_stock_price", "Price of a stock", {"ticker": ("string", True, [["AAPL"], ["MSFT", "microsoft"]]),
                                             "exchange": ("string", False, [["NASDAQ"]])}),
    ("calculate_bmi", "Body mass index", {"weight_kg": ("float", True, [[70.0], [82.5]]),
                                          "height_m": ("float", True, [[1.75], [1.8]])}),
    ("book_flight", "Book a flight", {"origin": ("string", True, [["Paris"], ["Berlin"]]),
                                      "destination": ("string", True, [["Tokyo"], ["Rome"]]),
                                      "passengers": ("integer", False, [[1], [2]]),
                                      "refundable": ("boolean", False, [[True], [False]])}),
    ("sort_numbers", "Sort a list", {"numbers": ("array:integer", True, [[[3, 1, 2]], [[10, 20]]]),
                                     "descending": ("boolean", False, [[False], [True]])}),
    ("translate_text", "Translate text", {"text": ("string", True, [["Good morning"], ["Thank you"]]),
                                          "target_languages": ("array:string", True, [[["French", "German"]],
                                                                                      [["Spanish"]]])}),
    ("hotel.search", "Find hotels", {"city": ("string", True, [["Rome"], ["Lisbon"]]),
                                     "filters": ("dict", False, [[{"stars": [4], "pool": [True, ""]}]])}),
    ("music.playlist.create", "Make a playlist", {"name": ("string", True, [["Road trip"], ["Focus"]]),
                                                  "songs": ("array:string", False, [[["Yesterday", "Hey Jude"]]])}),
    ("convert_currency", "Convert money", {"amount": ("float", True, [[100.0], [250.0]]),
                                           "from_currency": ("string", True, [["USD"], ["EUR"]]),
                                           "to_currency": ("string", True, [["JPY"], ["GBP"]])}),
]


def _definition(name: str, description: str, params: dict) -> dict:
    properties = {}
    for key, (kind, _, _) in params.items():
        base, _, items = kind.partition(":")
        properties[key] = {"type": base, "description": key.replace("_", " ")}
        if items:
            properties[key]["items"] = {"type": items}
        if base == "dict":
            properties[key]["properties"] = {"stars": {"type": "integer"}, "pool": {"type": "boolean"}}
    required = [key for key, (_, req, _) in params.items() if req]
    return {"name": name, "description": description,
            "parameters": {"type": "dict", "properties": properties, "required": required}}


def _answer(rng: random.Random, params: dict) -> dict:
    """A possible answer for one call: each required argument some acceptable values; optional ones marked with ""
    (or, now and then, absent: then giving them is wrong)."""
    answer = {}
    for key, (_, required, choices) in params.items():
        values = list(rng.choice(choices))
        if not required:
            if rng.random() < 0.2:
                continue
            values.append("")
        answer[key] = values
    return answer


def _value(rng: random.Random, values: list):
    picked = rng.choice([v for v in values if v != ""])
    if isinstance(picked, dict):  # a dict answer: each key's acceptable values
        return {k: rng.choice([x for x in vs if x != ""]) for k, vs in picked.items() if vs != [""]}
    return picked


def _correct_call(rng: random.Random, name: str, answer: dict) -> dict:
    args = {}
    for key, values in answer.items():
        if "" in values and rng.random() < 0.4:
            continue
        value = _value(rng, values)
        if isinstance(value, str) and rng.random() < 0.3:  # a spelling BFCL's normalisation accepts
            value = rng.choice([value.upper(), value.lower(), value.replace(" ", ""), value + "."])
        args[key] = value
    return make_call(name, args)


def _corrupt_value(rng: random.Random, value):
    if isinstance(value, bool):
        return rng.choice([not value, int(value), str(value).lower()])
    if isinstance(value, int):
        return rng.choice([value + 1, float(value), str(value), True])  # float(value): a float for an int
    if isinstance(value, float):
        return rng.choice([value * 2, int(value) if value.is_integer() else value + 0.5, str(value)])
    if isinstance(value, str):
        return rng.choice([value + " extra", value[::-1], value.replace(value[0], "Z"), [value]])
    if isinstance(value, list):
        return rng.choice([value[::-1], value[:-1], value + value[-1:], [str(v).upper() for v in value]])
    return {**value, "stars": 2} if rng.random() < 0.5 else {"pool": True}


def _corrupt(rng: random.Random, calls: list, functions: list, by_name: dict) -> list:
    """One mistake in one call (or in the list of calls): what a grader must tell apart from a right answer."""
    calls = [make_call(c["function"]["name"], dict(c["function"]["arguments"])) for c in calls]
    at = rng.randrange(len(calls))
    fn = calls[at]["function"]
    name, args = fn["name"], fn["arguments"]
    kind = rng.choice(["name", "missing", "extra", "value", "value", "value", "number", "count", "swap"])
    if kind == "name":
        near = {name.replace(".", "_"), name.split(".")[-1], name.upper(), name + "s"} - {name}
        fn["name"] = rng.choice(sorted(near) + [f["name"] for f in functions if f["name"] != name])
    elif kind == "missing" and args:
        del args[rng.choice(sorted(args))]
    elif kind == "extra":
        undeclared = [k for k in by_name[name][2] if k not in args]
        args[rng.choice(undeclared) if undeclared and rng.random() < 0.5 else "verbose"] = rng.choice([1, "yes"])
    elif kind == "number" and any(type(v) in (int, float) for v in args.values()):
        # BFCL takes an int for a float, never a float for an int nor a bool for a number
        key = rng.choice(sorted(k for k, v in args.items() if type(v) in (int, float)))
        value = args[key]
        args[key] = (rng.choice([int(value), round(value)]) if isinstance(value, float)
                     else rng.choice([float(value), value == 1]))
    elif kind == "count":
        return calls + [calls[at]] if rng.random() < 0.5 or len(calls) == 1 else calls[:-1]
    elif kind == "swap" and len(calls) > 1:
        return calls[::-1]  # order does not matter in parallel categories: still right
    elif args:
        key = rng.choice(sorted(args))
        args[key] = _corrupt_value(rng, args[key])
    return calls


def bfcl_sample(seed: int = 0) -> list[dict]:
    """Entries with BFCL's fields: id, question, function (definitions), ground_truth, result (the model's text)."""
    rng = random.Random(seed)
    entries = []
    for category in CATEGORIES:
        for i in range(N_PER_CATEGORY):
            many = category in ("multiple", "parallel_multiple")
            offered = rng.sample(FUNCTIONS, rng.randint(2, 4)) if many else [rng.choice(FUNCTIONS)]
            by_name = {f[0]: f for f in offered}
            if category == "simple" or category == "multiple":
                called = [rng.choice(offered)]
            elif category == "parallel":
                called = offered * rng.randint(2, 3)
            else:
                called = [rng.choice(offered) for _ in range(rng.randint(2, 4))]
            truth = [{f[0]: _answer(rng, f[2])} for f in called]
            calls = [_correct_call(rng, name, answer) for call in truth for name, answer in call.items()]
            functions = [_definition(*f) for f in offered]
            if rng.random() < 0.55:
                calls = _corrupt(rng, calls, functions, by_name)
            # strings single-quoted, or double-quoted as ChatFormat writes them (one call: its back-to-back lists
            # of several are no BFCL output)
            reference = rng.choice(["prompt_format", "chat_format"]) if len(calls) == 1 else "prompt_format"
            entries.append({"id": f"{category}_{i}", "question": [[{"role": "user", "content": f"Task {i}."}]],
                            "function": functions, "ground_truth": truth,
                            "result": encode_tool_calls(calls, "pythonic", reference)})
    return entries


def sample_hash(entries: list[dict]) -> str:
    return hashlib.sha256(json.dumps(entries, sort_keys=True).encode()).hexdigest()


def our_verdicts(entries: list[dict]) -> dict[str, bool]:
    records = [from_bfcl(e, {"id": e["id"], "ground_truth": e["ground_truth"]}) for e in entries]
    metrics = evaluate_tool_calls(records, [parse_completion(e["result"]) for e in entries])
    return {r["id"]: r["correct"] for r in metrics["results"]}


def test_agrees_with_bfcl_on_1000_generated_entries():
    entries = bfcl_sample()
    expected = json.loads(VERDICTS.read_text())
    assert sample_hash(entries) == expected["sample_sha256"], "the generator changed: the verdicts are another sample's"
    assert len(entries) == 1000
    dotted = sum("." in c for e in entries for call in e["ground_truth"] for c in call)
    assert dotted > 300
    bfcl = expected["verdicts"]
    ours = our_verdicts(entries)
    agree = sum(ours[i] == bfcl[i] for i in bfcl) / len(bfcl)
    assert agree >= 0.999, [i for i in bfcl if ours[i] != bfcl[i]]
    # both kinds are there in earnest: right answers (some with other spellings) and wrong ones
    assert 0.3 < sum(bfcl.values()) / len(bfcl) < 0.7
