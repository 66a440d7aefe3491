"""The `posttrain` command: `posttrain run CONFIG.yaml [key=value ...]`, one subcommand per stage, and the tools
that read what the stages wrote (inspect, export, chat, status).

One error boundary for every subcommand: an error the user can fix (a bad config key or value, a bad record, a
missing or unreadable path: ValueError and OSError, which name the file, line and key) prints one line,
`posttrain STAGE: error: MESSAGE` (`config error:` for the config file and overrides), and exits 2; any other
exception is a bug and keeps its traceback. Ctrl-C prints where the stage stopped and the command that resumes it,
and exits 130. An unknown command prints one line naming the known ones and exits 2; `posttrain STAGE --help`
lists the stage's config keys with their types, defaults and help texts.
"""

from __future__ import annotations

import argparse
import importlib
import os
import shlex
import sys
from pathlib import Path

from posttrain.config import ConfigError, load_config
from posttrain.config_reference import format_keys

# subcommand -> (module, config dataclass, entry function taking the config)
STAGES = {
    "run": ("rounds.orchestrator", "RunConfig", "run", "run every round: RM -> RS -> SFT -> DPO -> average -> eval"),
    "sft": ("posttrain.sft", "SFTStageConfig", "train", "supervised fine-tuning on SFT records"),
    "rm": ("rewards.model", "RMStageConfig", "train", "train a Bradley-Terry reward model on preference records"),
    "sample": ("rounds.rejection", "SampleStageConfig", "run", "rejection sampling: K samples per prompt, scored"),
    "dpo": ("posttrain.dpo", "DPOStageConfig", "train", "Llama 3 DPO on preference pairs"),
    "synth": ("synth.pipeline", "SynthConfig", "run", "teacher-driven synthetic data"),
    "eval": ("rounds.evaluate", "EvalStageConfig", "run", "evaluate a policy on held-out tasks"),
}
# tool -> (module with main(argv), help)
TOOLS = {
    "inspect": ("posttrain.inspect", "print a record as the model sees it"),
    "export": ("posttrain.export", "write a model as an HF dir (adapter or merged), a Meta-native dir or a GGUF file"),
    "chat": ("posttrain.chat_cli", "talk to a model in its own chat template (one-shot with --prompt)"),
    "status": ("rounds.status", "what a run dir holds: stages done, what runs next, scores, disk used"),
}
USER_ERRORS = (ValueError, OSError)
EXIT_USER_ERROR, EXIT_INTERRUPTED = 2, 130


def error_line(command: str, e: BaseException) -> str:
    """The one line for a user error: an OSError as `path: reason`, anything else as its message."""
    if isinstance(e, OSError) and e.filename is not None:
        message = f"{e.filename}: {e.strerror or e}"
    else:
        message = str(e) or type(e).__name__
    kind = "config error" if isinstance(e, ConfigError) else "error"
    return f"posttrain {command}: {kind}: {' '.join(message.split())}"


def _output_dir(name: str, cfg) -> Path | None:
    if name == "run":
        return Path(cfg.runs_dir) / cfg.name
    train = getattr(cfg, "train", None)
    path = train.output_dir if train is not None else getattr(cfg, "output_dir", "")
    return Path(path) if path else None


def _progress(name: str, out: Path) -> str:
    """What `out` holds of an interrupted run: the last checkpoint of a training stage, the unfinished stage of a
    run."""
    from posttrain.stage import last_checkpoint

    if name == "run":
        from rounds.state import STAGES as RUN_STAGES

        unfinished = [d for r in sorted(out.glob("round_*")) for s in RUN_STAGES
                      if (d := r / s).is_dir() and not (d / "DONE").is_file()]
        return f"; unfinished: {unfinished[0].relative_to(out)}" if unfinished else ""
    if name in ("sft", "dpo", "rm"):
        found = last_checkpoint(out) or last_checkpoint(out / "checkpoints")
        return f"; last checkpoint: {Path(found).name}" if found else "; no checkpoint yet (see train.save_steps)"
    return ""


def interrupted_message(name: str, cfg, argv: list[str]) -> str:
    """Where the stage stopped and the command that carries on from there."""
    out = _output_dir(name, cfg)
    where = f" in {out}{_progress(name, out)}" if out is not None and out.is_dir() else ""
    command = ["posttrain", name, *argv]
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        command = ["accelerate", "launch", "...", "-m", *command]
    return f"interrupted{where}; resume with: {shlex.join(command)}"


def _stage_main(name: str, argv: list[str]) -> int:
    module_name, cls_name, fn_name, help_text = STAGES[name]
    module = importlib.import_module(module_name)
    parser = argparse.ArgumentParser(prog=f"posttrain {name}", description=help_text,
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog=f"config keys:\n{format_keys(getattr(module, cls_name))}")
    parser.add_argument("config", help="YAML config file")
    parser.add_argument("overrides", nargs="*", help="key=value overrides, dotted keys for nested fields")
    if name == "run":
        parser.add_argument("--force", default="", help="comma-separated stages to redo after a config change (or 'all')")
    args = parser.parse_args(argv)
    cfg = None
    try:
        cfg = load_config(getattr(module, cls_name), args.config, args.overrides)
        entry = getattr(module, fn_name)
        result = entry(cfg, force=args.force) if name == "run" else entry(cfg)
    except USER_ERRORS as e:
        print(error_line(name, e), file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        if os.environ.get("RANK", "0") == "0":
            resume = [args.config, *args.overrides]
            message = interrupted_message(name, cfg, resume) if cfg is not None else "interrupted"
            print(f"\nposttrain {name}: {message}", file=sys.stderr)
        return EXIT_INTERRUPTED
    return result if isinstance(result, int) else 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    commands = {**{k: v[3] for k, v in STAGES.items()}, **{k: v[1] for k, v in TOOLS.items()}}
    if not argv or argv[0] in ("-h", "--help"):
        width = max(map(len, commands))
        lines = "\n".join(f"  {k:<{width}}  {v}" for k, v in commands.items())
        print(f"usage: posttrain COMMAND ...\n\ncommands:\n{lines}")
        return 0
    if argv[0] not in commands:
        print(f"posttrain: error: unknown command {argv[0]!r}; commands: {', '.join(commands)}", file=sys.stderr)
        return EXIT_USER_ERROR
    if argv[0] in TOOLS:
        return _tool_main(argv[0], argv[1:])
    return _stage_main(argv[0], argv[1:])


def _tool_main(name: str, argv: list[str]) -> int:
    try:
        return importlib.import_module(TOOLS[name][0]).main(argv)
    except USER_ERRORS as e:
        print(error_line(name, e), file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
