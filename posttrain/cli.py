"""The `posttrain` command: `posttrain run CONFIG.yaml [key=value ...]` and one subcommand per stage."""

from __future__ import annotations

import argparse
import importlib
import sys

from posttrain.config import ConfigError, load_config

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


def _stage_main(name: str, argv: list[str]) -> int:
    module_name, cls_name, fn_name, help_text = STAGES[name]
    parser = argparse.ArgumentParser(prog=f"posttrain {name}", description=help_text)
    parser.add_argument("config", help="YAML config file")
    parser.add_argument("overrides", nargs="*", help="key=value overrides, dotted keys for nested fields")
    if name == "run":
        parser.add_argument("--force", default="", help="comma-separated stages to redo after a config change (or 'all')")
    args = parser.parse_args(argv)
    module = importlib.import_module(module_name)
    try:
        cfg = load_config(getattr(module, cls_name), args.config, args.overrides)
    except ConfigError as e:
        print(f"posttrain {name}: config error: {e}", file=sys.stderr)
        return 2
    entry = getattr(module, fn_name)
    result = entry(cfg, force=args.force) if name == "run" else entry(cfg)
    return result if isinstance(result, int) else 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    commands = {**{k: v[3] for k, v in STAGES.items()}, "inspect": "print a record as the model sees it"}
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in commands:
        width = max(map(len, commands))
        lines = "\n".join(f"  {k:<{width}}  {v}" for k, v in commands.items())
        print(f"usage: posttrain COMMAND ...\n\ncommands:\n{lines}", file=sys.stderr if argv else sys.stdout)
        return 0 if not argv or argv[0] in ("-h", "--help") else 2
    if argv[0] == "inspect":
        from posttrain.inspect import main as inspect_main

        return inspect_main(argv[1:])
    return _stage_main(argv[0], argv[1:])


if __name__ == "__main__":
    sys.exit(main())
