"""What each round changed: per-round metrics read from a run dir, a plain-text table, report.png and report.html.

Everything comes from files: `round_NN/eval.json` (held-out accuracy, mean reward, mean length) and the stage
manifests (RM held-out pairwise accuracy, preference pairs collected, RS kept/pairs/mean reward, SFT and DPO final
losses). report.html is self-contained: the table, the plots as an embedded PNG and the resolved config.
"""

from __future__ import annotations

import base64
import html
import io
import json
from pathlib import Path

from posttrain.data import atomic_write_bytes, atomic_write_text, iter_raw

# (row key, column header, format)
COLUMNS = (
    ("accuracy", "eval acc", "{:.1%}"),
    ("mean_reward", "eval reward", "{:.3f}"),
    ("mean_length", "eval len", "{:.1f}"),
    ("prefs_pairs", "pref pairs", "{:d}"),
    ("rm_accuracy", "RM acc", "{:.1%}"),
    ("rs_kept", "RS kept", "{:d}"),
    ("rs_pairs", "RS pairs", "{:d}"),
    ("rs_reward", "RS reward", "{:.3f}"),
    ("sft_loss", "SFT loss", "{:.4f}"),
    ("dpo_loss", "DPO loss", "{:.4f}"),
    ("rs_accepted", "RS prompts ok", "{:d}"),
    ("rs_pass", "RS pass", "{:.1%}"),
    ("rs_picked", "pick", "{:.1%}"),
    ("rs_random", "random", "{:.1%}"),
    ("rs_oracle", "oracle", "{:.1%}"),
)
# the RS columns from "RS prompts ok" on: prompts with an accepted sample; the share of RS SFT records that pass the
# task's verifier; how often the reward alone picks a passing sample, a random sample passes, any sample passes


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {}


def _metrics(stage_dir: Path) -> dict:
    """A finished stage's metrics ({} when it has not finished or was skipped)."""
    if not (stage_dir / "DONE").is_file():
        return {}
    return _read_json(stage_dir / "manifest.json").get("metrics") or {}


def round_dirs(root: Path) -> list[tuple[int, Path]]:
    found = [(int(d.name.removeprefix("round_")), d) for d in Path(root).glob("round_*") if d.name[6:].isdigit()]
    return sorted(found)


def _check(rs: dict) -> dict:
    """The RS pass rates of the task's verifier, else of the first pass/fail source ({} when none)."""
    checks = rs.get("checks") or {}
    return checks.get("task_verifier") or next(iter(checks.values()), {})


def round_row(round_idx: int, d: Path) -> dict:
    """One round's numbers; a missing one is None."""
    ev, rm, prefs = _read_json(d / "eval.json"), _metrics(d / "rm"), _metrics(d / "prefs")
    rs, sft, dpo = _metrics(d / "samples"), _metrics(d / "sft"), _metrics(d / "dpo")
    synth = _metrics(d / "synth")
    check = _check(rs)
    others = list((ev.get("evals") or {}).items())[1:]  # the first eval is the headline: accuracy above
    return {
        "round": round_idx,
        "accuracy": ev.get("accuracy"),
        "mean_reward": ev.get("mean_reward"),
        "mean_length": ev.get("mean_length"),
        "prefs_pairs": prefs.get("pairs"),
        "rm_accuracy": rm.get("eval_accuracy"),
        "rs_kept": rs.get("kept"),
        "rs_pairs": rs.get("pairs"),
        "rs_reward": rs.get("mean_reward"),
        "sft_loss": sft.get("final_loss"),
        "dpo_loss": dpo.get("loss", dpo.get("train_loss")),
        "rs_accepted": rs.get("prompts_accepted"),
        "rs_pass": check.get("kept_pass_rate"),
        "rs_picked": check.get("picked"),
        "rs_random": check.get("random"),
        "rs_oracle": check.get("oracle"),
        **{f"eval:{name}": m.get("accuracy") for name, m in others},
        **({"synth_kept": synth.get("kept"), "synth_decontam": synth.get("decontaminated"),
            "sft_mix": _mix_text(d / "sft")} if synth else {}),
    }


def _mix_text(sft_dir: Path) -> str | None:
    """The SFT set as trained: training examples per source ("rs 120, synth:general 30")."""
    from rounds.synth_step import mix_as_trained

    if not (sft_dir / "DONE").is_file():
        return None
    mix = mix_as_trained(_read_json(sft_dir / "manifest.json"))
    return ", ".join(f"{tag} {n}" for tag, n in mix.items()) or None


def collect_rows(root: str | Path) -> list[dict]:
    return [round_row(r, d) for r, d in round_dirs(Path(root))]


def _cell(value, fmt: str) -> str:
    if value is None:
        return "-"
    return fmt.format(int(value) if fmt == "{:d}" else value)


SYNTH_COLUMNS = (("synth_kept", "synth kept", "{:d}"), ("synth_decontam", "decontam", "{:d}"),
                 ("sft_mix", "SFT mix (examples)", "{}"))


def columns(rows: list[dict]) -> tuple:
    """COLUMNS, the synth step's when a round ran it, then one accuracy column per further eval (named after it)."""
    extra = dict.fromkeys(k for row in rows for k in row if k.startswith("eval:"))
    synth = SYNTH_COLUMNS if any("synth_kept" in row for row in rows) else ()
    return (*COLUMNS, *synth, *((k, k.removeprefix("eval:"), "{:.1%}") for k in extra))


def format_table(rows: list[dict]) -> str:
    """Plain-text table: the base before round 1 (round 0), then the policy after every round."""
    cols = columns(rows)
    header = ["round", *(h for _, h, _ in cols)]
    body = [[("0 (base)" if row["round"] == 0 else str(row["round"])), *(_cell(row.get(k), f) for k, _, f in cols)]
            for row in rows]
    widths = [max(len(line[i]) for line in [header, *body]) for i in range(len(header))]
    lines = ["  ".join(cell.rjust(w) for cell, w in zip(line, widths)) for line in [header, *body]]
    return "\n".join([lines[0], "-" * len(lines[0]), *lines[1:]])


def _distributions(root: Path) -> tuple[dict[int, list[float]], dict[int, list[int]]]:
    """Per round: the rewards of every RS sample, and the lengths of the eval responses (tokens)."""
    rewards, lengths = {}, {}
    for r, d in round_dirs(root):
        shards = sorted((d / "samples" / "samples").glob("shard-*.jsonl"))
        values = [c["reward"] for shard in shards for _, record in iter_raw(shard) for c in record["completions"]]
        if values:
            rewards[r] = values
        results = _read_json(d / "eval.json").get("results") or []
        if results:
            lengths[r] = [n for res in results for n in res["num_tokens"]]
    return rewards, lengths


def plot(rows: list[dict], root: Path) -> bytes:
    """PNG: held-out accuracy (and RM pairwise accuracy) per round, RS reward distributions, eval lengths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rewards, lengths = _distributions(root)
    fig, (ax_acc, ax_rew, ax_len) = plt.subplots(1, 3, figsize=(15, 4.2))
    evals = [(k, f"eval {k.removeprefix('eval:')}") for k, _, _ in columns(rows) if k.startswith("eval:")]
    for key, label in (("accuracy", "held-out accuracy"), ("rm_accuracy", "RM pairwise accuracy"), *evals):
        points = [(row["round"], row.get(key)) for row in rows if row.get(key) is not None]
        if points:
            ax_acc.plot(*zip(*points), marker="o", label=label)
    ax_acc.set(xlabel="round (0 = base)", ylabel="accuracy", ylim=(0, 1), title="accuracy per round",
               xticks=[row["round"] for row in rows])
    ax_acc.legend(loc="lower right")
    for ax, data, title, ylabel, what in (
            (ax_rew, rewards, "RS sample rewards (weighted sum of sources)", "summed reward", "RS samples"),
            (ax_len, lengths, "eval response lengths (greedy)", "tokens per response", "eval responses")):
        if data:
            boxes = ax.boxplot(list(data.values()), tick_labels=[str(r) for r in data])
            ax.legend([boxes["medians"][0], boxes["boxes"][0]],
                      [f"median of the round's {what}", "quartiles; whiskers 1.5 IQR"], loc="best", fontsize=8)
        ax.set(xlabel="round", ylabel=ylabel, title=title)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=90)
    plt.close(fig)
    return buffer.getvalue()


def to_html(rows: list[dict], png: bytes, config_text: str, name: str) -> str:
    cols = columns(rows)
    header = "".join(f"<th>{html.escape(h)}</th>" for h in ["round", *(h for _, h, _ in cols)])
    body = "".join(
        "<tr>" + f"<td>{'0 (base)' if row['round'] == 0 else row['round']}</td>"
        + "".join(f"<td>{html.escape(_cell(row.get(k), f))}</td>" for k, _, f in cols) + "</tr>"
        for row in rows
    )
    image = base64.b64encode(png).decode()
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><title>posttrain run {html.escape(name)}</title>
<style>body{{font-family:sans-serif;margin:2em}} table{{border-collapse:collapse}}
td,th{{border:1px solid #ccc;padding:4px 10px;text-align:right}} pre{{background:#f6f6f6;padding:1em}}</style>
</head><body>
<h1>posttrain run {html.escape(name)}</h1>
<p>Round 0 is the base model, measured before round 1; every other row is the policy that round produced.</p>
<table><tr>{header}</tr>{body}</table>
<img alt="metrics per round" src="data:image/png;base64,{image}">
<h2>config</h2><pre>{html.escape(config_text)}</pre>
</body></html>
"""


def write_report(root: str | Path) -> list[dict]:
    """Write report.png and report.html into the run dir; returns the per-round rows."""
    root = Path(root)
    rows = collect_rows(root)
    png = plot(rows, root)
    config = root / "config.yaml"
    atomic_write_bytes(root / "report.png", png)
    atomic_write_text(root / "report.html", to_html(rows, png, config.read_text() if config.is_file() else "",
                                                    root.name))
    return rows
