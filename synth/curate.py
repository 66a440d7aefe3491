"""Quality control for synthetic dialogs: rule cleaning, LLM judge, high-quality selection, semantic dedup,
decontamination against eval sets.

Every step takes records and returns `(kept, removed)`. It leaves its scores on each record it looked at, under
`record["meta"]["qc"][step]`, and appends its name to `meta["filters_passed"]` of the records it kept, so the output
says why each dialog is there. The judge's prompts and verdict parsers live in synth/teacher.py.
"""

from __future__ import annotations

import dataclasses
import math
import re
import zlib
from pathlib import Path

import numpy as np

from posttrain.config import check_range, field
from posttrain.data import iter_raw
from rewards.judge import DIFFICULTY, dialog_text, judge_scores, quality_rubric
from synth.teacher import TAGS, Teacher, parse_tags


@dataclasses.dataclass
class RulesConfig:
    max_emojis: int = field(2, help="drop a dialog whose assistant turns hold more emojis than this")
    max_exclamations: int = field(3, help="drop a dialog whose assistant turns hold more '!' than this")
    max_apologies: int = field(1, help="drop a dialog whose assistant turns apologise ('I'm sorry', ...) more often")
    min_response_chars: int = field(1, help="drop a dialog whose last assistant turn is shorter (after stripping)")


@dataclasses.dataclass
class JudgeConfig:
    enabled: bool = field(True, help="ask the judge for quality, difficulty and intent tags")
    require_high_quality: bool = field(True, help="keep only high-quality dialogs: top RM quartile OR max judge score")
    rm_top_fraction: float = field(0.25, help="fraction of dialogs, by RM score, counted as high quality")
    max_new_tokens: int = field(256, help="tokens the judge may write per verdict")

    def __post_init__(self):
        check_range("rm_top_fraction", self.rm_top_fraction, low=0.0, high=1.0)


@dataclasses.dataclass
class DedupConfig:
    enabled: bool = field(True, help="semantic dedup of dialogs")
    threshold: float = field(0.9, help="drop a dialog whose cosine similarity to a kept one in its cluster is >= this")
    embedder: str = field("hashed-tfidf", help="hashed-tfidf (numpy, deterministic) or a sentence-transformers path")
    embed_dim: int = field(4096, help="hashed-tfidf vector size")
    cluster_size: int = field(256, help="k-means uses ceil(n / cluster_size) clusters")
    seed: int = field(0, help="k-means initialisation seed")

    def __post_init__(self):
        check_range("threshold", self.threshold, low=0.0, high=1.0)
        check_range("cluster_size", self.cluster_size, low=1)


@dataclasses.dataclass
class DecontamConfig:
    eval_sets: list[str] = field(default_factory=list, help="eval files: prompt records (JSONL, parquet, HF dir) "
                                                             "or .txt lines")
    ngram: int = field(13, help="word n-gram length; a dialog sharing one n-gram with an eval item is removed")

    def __post_init__(self):
        check_range("ngram", self.ngram, low=1)


@dataclasses.dataclass
class CurateConfig:
    rules: RulesConfig = field(default_factory=RulesConfig, help="rule cleaning thresholds")
    judge: JudgeConfig = field(default_factory=JudgeConfig, help="LLM judge: quality, difficulty, intent tags")
    dedup: DedupConfig = field(default_factory=DedupConfig, help="semantic dedup")
    decontam: DecontamConfig = field(default_factory=DecontamConfig, help="n-gram decontamination against eval sets")


def _qc(record: dict) -> dict:
    return record.setdefault("meta", {}).setdefault("qc", {})


def _passed(record: dict, step: str) -> None:
    record.setdefault("meta", {}).setdefault("filters_passed", []).append(step)


def _split(records: list[dict], keep: list[bool], step: str) -> tuple[list[dict], list[dict]]:
    kept, removed = [], []
    for rec, ok in zip(records, keep, strict=True):
        if ok:
            _passed(rec, step)
            kept.append(rec)
        else:
            rec["meta"]["removed_by"] = step
            removed.append(rec)
    return kept, removed


# ---------------------------------------------------------------- rule cleaning

# Emoji blocks (pictographs, emoticons, transport, flags, dingbats, supplemental symbols).
_EMOJI = re.compile("[\U0001f000-\U0001faff\u2600-\u27bf\U0001f1e6-\U0001f1ff]")
_APOLOGY = re.compile(r"\b(?:i'?m sorry|i am sorry|i apologi[sz]e|my apologies|apologies for)\b", re.IGNORECASE)


def rule_counts(text: str) -> dict[str, int]:
    """Emojis, '!' and apologies in prose (code is skipped: `!=` is not an exclamation)."""
    text = re.sub(r"```.*?(?:```|$)|`[^`\n]*`", " ", text, flags=re.DOTALL).replace("\u2019", "'")
    return {"emojis": len(_EMOJI.findall(text)), "exclamations": text.count("!"),
            "apologies": len(_APOLOGY.findall(text))}


def rule_clean(records: list[dict], cfg: RulesConfig) -> tuple[list[dict], list[dict]]:
    """Drop dialogs whose assistant turns overuse emojis, exclamation marks or apologies, or whose answer is empty."""
    keep = []
    for rec in records:
        replies = [m.get("content") or "" for m in rec["messages"] if m["role"] == "assistant"]
        counts = rule_counts("\n".join(replies))
        counts["response_chars"] = len(replies[-1].strip()) if replies else 0
        _qc(rec)["rules"] = counts
        keep.append(
            counts["emojis"] <= cfg.max_emojis
            and counts["exclamations"] <= cfg.max_exclamations
            and counts["apologies"] <= cfg.max_apologies
            and counts["response_chars"] >= cfg.min_response_chars
        )
    return _split(records, keep, "rules")


# ---------------------------------------------------------------- judge step and high-quality selection


def judge(records: list[dict], judge_teacher: Teacher, cfg: JudgeConfig) -> dict[str, int]:
    """Ask the judge for quality (rubric by kind), difficulty (1-3) and topic + intent tags; store them under
    qc["judge_quality"], qc["judge_difficulty"], qc["tags"]. Returns the count of unparseable verdicts per question."""
    dialogs = [r["messages"] for r in records]
    unparseable = {"quality": 0, "difficulty": 0, "tags": 0}
    questions = (("quality", [quality_rubric(r) for r in records]), ("difficulty", [DIFFICULTY] * len(records)))
    for name, rubrics in questions:
        for rec, rubric, (score, parts, verdict) in zip(
                records, rubrics, judge_scores(judge_teacher, dialogs, rubrics, max_new_tokens=cfg.max_new_tokens)):
            entry = {"score": score, "max": rubric.high, "parts": parts}
            if score is None:
                unparseable[name] += 1
                entry["unparsed_verdict"] = str(verdict)[:500]
            _qc(rec)[f"judge_{name}"] = entry
    tag_prompts = [[{"role": "user", "content": TAGS.format(dialog=dialog_text(d))}] for d in dialogs]
    verdicts = judge_teacher.complete(tag_prompts, n=1, temperature=0.0, top_p=1.0, max_new_tokens=cfg.max_new_tokens)
    for rec, (verdict,) in zip(records, verdicts, strict=True):
        tags = parse_tags(verdict)
        unparseable["tags"] += tags is None
        _qc(rec)["tags"] = tags or {"topic": None, "intents": []}
    return unparseable


def mark_high_quality(records: list[dict], cfg: JudgeConfig) -> tuple[list[dict], list[dict]]:
    """High quality = RM score in the top `rm_top_fraction` of this batch OR the judge's maximum quality score.
    Stores qc["high_quality"]; removes the rest when `require_high_quality`."""
    rm = [_qc(r).get("rm", {}).get("score") for r in records]
    scored = [s for s in rm if s is not None]
    cutoff = float(np.quantile(scored, 1.0 - cfg.rm_top_fraction)) if scored and cfg.rm_top_fraction > 0 else math.inf
    keep = []
    for rec, score in zip(records, rm):
        verdict = _qc(rec).get("judge_quality", {})
        flags = {"rm_top": score is not None and score >= cutoff,
                 "judge_max": verdict.get("score") is not None and verdict["score"] == verdict.get("max")}
        flags["value"] = flags["rm_top"] or flags["judge_max"]
        _qc(rec)["high_quality"] = flags
        keep.append(flags["value"] or not cfg.require_high_quality)
    return _split(records, keep, "high_quality")


def rank_key(record: dict) -> tuple[float, int]:
    """(quality x difficulty, number of intents): what dedup keeps first among near-duplicates.

    quality = judge score / max (0 when unjudged); difficulty = judge difficulty 1-3 (1 when unjudged)."""
    qc = record.get("meta", {}).get("qc", {})
    verdict = qc.get("judge_quality") or {}
    quality = verdict["score"] / verdict["max"] if verdict.get("score") is not None and verdict.get("max") else 0.0
    difficulty = (qc.get("judge_difficulty") or {}).get("score") or 1
    return quality * difficulty, len((qc.get("tags") or {}).get("intents") or [])


# ---------------------------------------------------------------- semantic dedup


def hashed_tfidf(texts: list[str], dim: int = 4096, ngram_chars: tuple[int, ...] = (3, 4, 5)) -> np.ndarray:
    """Unit-norm TF-IDF vectors of hashed character n-grams: [N, dim] float32, deterministic (crc32, no model)."""
    counts = np.zeros((len(texts), dim), dtype=np.float32)
    for i, text in enumerate(texts):
        text = " ".join(text.lower().split())
        for n in ngram_chars:
            idx = [zlib.crc32(text[j:j + n].encode()) % dim for j in range(max(len(text) - n + 1, 0))]
            np.add.at(counts[i], idx, 1.0)
    df = (counts > 0).sum(axis=0)
    idf = np.log((1.0 + len(texts)) / (1.0 + df)) + 1.0
    vecs = np.where(counts > 0, 1.0 + np.log(np.maximum(counts, 1.0)), 0.0) * idf
    norms = np.linalg.norm(vecs, axis=1, keepdims=True)
    return (vecs / np.maximum(norms, 1e-12)).astype(np.float32)


def embed(texts: list[str], cfg: DedupConfig) -> np.ndarray:
    """[N, D] unit vectors: hashed TF-IDF, or a sentence-transformers model when `cfg.embedder` is its path."""
    if cfg.embedder == "hashed-tfidf":
        return hashed_tfidf(texts, cfg.embed_dim)
    try:
        from sentence_transformers import SentenceTransformer
    except ImportError:
        raise ValueError(f"curate.dedup.embedder: {cfg.embedder!r} needs `pip install sentence-transformers`") from None
    model = SentenceTransformer(cfg.embedder, device="cpu")
    return np.asarray(model.encode(texts, normalize_embeddings=True), dtype=np.float32)


def kmeans(vecs: np.ndarray, k: int, seed: int, iters: int = 20) -> np.ndarray:
    """Spherical k-means (cosine) with k-means++ seeding from `seed`; returns the cluster of each row: [N] int."""
    rng = np.random.default_rng(seed)
    k = min(k, len(vecs))
    centers = [vecs[rng.integers(len(vecs))]]
    for _ in range(1, k):
        dist = np.maximum(1.0 - np.max(vecs @ np.stack(centers).T, axis=1), 0.0)
        probs = dist / dist.sum() if dist.sum() > 0 else np.full(len(vecs), 1.0 / len(vecs))
        centers.append(vecs[rng.choice(len(vecs), p=probs)])
    centers = np.stack(centers)
    labels = np.zeros(len(vecs), dtype=np.int64)
    for step in range(iters):
        new = np.argmax(vecs @ centers.T, axis=1)
        if step > 0 and np.array_equal(new, labels):
            break
        labels = new
        for c in range(k):
            members = vecs[labels == c]
            if len(members):
                mean = members.mean(axis=0)
                centers[c] = mean / max(np.linalg.norm(mean), 1e-12)
    return labels


def semantic_dedup(records: list[dict], cfg: DedupConfig) -> tuple[list[dict], list[dict]]:
    """Cluster dialog embeddings; within a cluster, visit dialogs best rank_key first and keep one only if its max
    cosine similarity to those already kept is below `cfg.threshold`. Stores qc["dedup"]."""
    if not records:
        return [], []
    vecs = embed([dialog_text(r["messages"]) for r in records], cfg)
    labels = kmeans(vecs, math.ceil(len(records) / cfg.cluster_size), cfg.seed)
    keep = [False] * len(records)
    for cluster in np.unique(labels):
        members = sorted(np.flatnonzero(labels == cluster), key=lambda i: (tuple(-x for x in rank_key(records[i])), i))
        kept: list[int] = []
        for i in members:
            sims = vecs[kept] @ vecs[i] if kept else np.zeros(0)
            best = int(np.argmax(sims)) if len(sims) else -1
            max_sim = float(sims[best]) if len(sims) else 0.0
            entry = {"cluster": int(cluster), "max_sim": round(max_sim, 4)}
            if max_sim >= cfg.threshold:
                entry["duplicate_of"] = records[kept[best]].get("id")
            else:
                kept.append(i)
                keep[i] = True
            _qc(records[i])["dedup"] = entry
    return _split(records, keep, "dedup")


# ---------------------------------------------------------------- decontamination

# Eval items shorter than n words are matched whole, down to this length (GPT-3's floor for short benchmarks).
_MIN_EVAL_WORDS = 8
_TEXT_FIELDS = ("messages", "prompt", "question", "text", "input", "problem")


def words(text: str) -> list[str]:
    return re.findall(r"\w+", text.lower())


def _eval_item_text(raw, where: str) -> str:
    if isinstance(raw, str):
        return raw
    for key in _TEXT_FIELDS:
        value = raw.get(key) if isinstance(raw, dict) else None
        if isinstance(value, str):
            return value
        if isinstance(value, list):
            return " ".join(m.get("content") or "" for m in value if isinstance(m, dict))
    raise ValueError(f"{where}: expected one of the fields {', '.join(_TEXT_FIELDS)}")


def eval_ngrams(paths: list[str], n: int) -> dict[int, dict[tuple[str, ...], str]]:
    """{length: {word n-gram: source file}} of every eval item: all n-grams of an item of >= n words, the whole
    item for a shorter one (of at least 8 words)."""
    index: dict[int, dict[tuple[str, ...], str]] = {}
    for path in paths:
        if Path(path).suffix == ".txt":
            lines = Path(path).read_text(encoding="utf-8").splitlines()
            items = [(f"{path}:{i}", line) for i, line in enumerate(lines, start=1) if line.strip()]
        else:
            items = list(iter_raw(path))
        for where, raw in items:
            toks = words(_eval_item_text(raw, where))
            length = min(n, len(toks))
            if length < min(n, _MIN_EVAL_WORDS):
                continue
            grams = index.setdefault(length, {})
            for j in range(len(toks) - length + 1):
                grams.setdefault(tuple(toks[j:j + length]), Path(path).name)
    return index


def decontaminate(records: list[dict], index: dict[int, dict[tuple[str, ...], str]]) -> tuple[list[dict], list[dict]]:
    """Remove dialogs sharing a word n-gram with an eval item; stores qc["decontam"] (the first overlap found)."""
    keep = []
    for rec in records:
        toks = words(dialog_text(rec["messages"]))
        hit = None
        for length, grams in sorted(index.items(), reverse=True):
            hit = next((g for g in zip(*(toks[j:] for j in range(length))) if g in grams), None)
            if hit is not None:
                _qc(rec)["decontam"] = {"overlap": " ".join(hit), "eval_set": grams[hit]}
                break
        if hit is None:
            _qc(rec)["decontam"] = {"overlap": None}
        keep.append(hit is None)
    return _split(records, keep, "decontam")
