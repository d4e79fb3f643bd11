"""The ``presso`` command line: compile, eval, run, passes, demo.

Errors print one line and a hint (``--debug`` shows the traceback) and exit non-zero.
"""
from __future__ import annotations

import argparse
import shutil
import sys
import traceback
from pathlib import Path

from presso.errors import ConfigError, ExportError, PressoError

DEFAULT_CALIBRATION = 16  # windows, for a pass that needs data when no recipe says how many
DEFAULT_SEQ_LEN = 128


def parse_pass(tokens: list[str]):
    """``["name", "key=value", ...]`` -> a configured pass."""
    import presso

    name, options = tokens[0], {}
    for item in tokens[1:]:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"pass option {item!r} of {name!r} is not key=value",
                              hint="write options as --pass NAME key=value key2=value2")
        options[key] = value
    return presso.make_pass(name, **options)


def check_writable(out: Path) -> None:
    """Fail before the slow work if ``out`` cannot be created or written; create nothing."""
    import os

    existing = out.resolve()
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        problem = "is not a folder" if not existing.is_dir() else "is not writable"
        raise ExportError(f"cannot write to {out}: {existing} {problem}", hint="choose a writable --out folder")


def cmd_compile(args: argparse.Namespace) -> int:
    import torch

    import presso
    from presso import distributed
    from presso import eval as ev

    recipe = load_recipe(args.recipe) if args.recipe else None
    passes = (recipe.make_passes() if recipe else []) + [parse_pass(tokens) for tokens in args.passes or []]
    out = Path(args.out)
    check_writable(out)
    print(f"loading {args.model} ...", file=sys.stderr)
    model, tokenizer, vocab = _open_model(args.model)
    # fixed tokens: every run (and every rank of one) checks the model on the same input
    example = torch.randint(3, min(vocab, 1000), (1, 16), generator=torch.Generator().manual_seed(0))
    calibration = None
    if any("calibration" in p.requires for p in passes):
        if tokenizer is None:
            raise PressoError(f"{args.model} has no tokenizer files, and the passes calibrate on text",
                              hint="copy the tokenizer files (tokenizer.json, tokenizer_config.json) into the folder")
        n = args.calibration or (recipe.calibration if recipe else 0) or DEFAULT_CALIBRATION
        seq_len = args.seq_len or (recipe.seq_len if recipe else DEFAULT_SEQ_LEN)
        print(f"calibrating on {n} x {seq_len} tokens of WikiText-2 validation ...", file=sys.stderr)
        calibration = ev.calibration_batches(tokenizer, n=n, seq_len=seq_len)
    # finished blocks are kept beside the output until the export is in place: a stopped run
    # given the same --out starts after its last finished block
    progress = out.parent / f".{out.name}.progress"
    with distributed.process_group():  # under torchrun: calibration shared by the processes
        compiled = presso.compile(model, passes, example_inputs=example, calibration=calibration, resume=progress)
        if not distributed.is_main():  # every rank holds the same model; rank 0 writes it
            return 0
        print(f"exporting to {out} ...", file=sys.stderr)
        compiled.export(out, tokenizer=tokenizer)
        shutil.rmtree(progress, ignore_errors=True)
    print(compiled.report.to_markdown())
    return 0


def _open_model(name: str):
    """A safetensors folder stays on disk (compile reads it block by block); anything else is loaded."""
    from presso import models

    folder = Path(name)
    if folder.is_dir() and any(folder.glob("*.safetensors")):
        from transformers import AutoConfig, AutoTokenizer

        config = AutoConfig.from_pretrained(str(folder), local_files_only=True)
        try:
            tokenizer = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
        except (OSError, ValueError):
            tokenizer = None
        vocab = getattr(config, "vocab_size", None) or getattr(config.get_text_config(), "vocab_size", 1000)
        return str(folder), tokenizer, vocab
    model, tokenizer = models.load(name)
    return model, tokenizer, tokenizer.vocab_size


def load_recipe(name: str):
    from presso.recipes import load_recipe as load

    return load(name)


def cmd_recipes(args: argparse.Namespace) -> int:
    from presso.recipes import list_recipes
    from presso.recipes import load_recipe as load

    print(f"{'recipe':<16} {'size':>9}  {'perplexity (Δ)':<17} {'measured on':<13} what it does")
    for name in list_recipes():
        print(load(name).row())
    print("run one: presso compile --model smollm2-135m --recipe NAME --out DIR (results: docs/results.md)")
    return 0


def artifact_tokenizer(artifact: str | Path):
    """The tokenizer saved beside an exported model (``presso compile`` writes it)."""
    from transformers import AutoTokenizer

    path = Path(artifact)
    return AutoTokenizer.from_pretrained(str(path if path.is_dir() else path.parent), local_files_only=True)


def cmd_eval(args: argparse.Namespace) -> int:
    import presso
    from presso import eval as ev
    from presso import models

    target = Path(args.target)
    if (target / "manifest.json").exists() or target.suffix == ".onnx":
        model = presso.runtime.load(target)
        tokenizer = artifact_tokenizer(target)
        size = f"{model.manifest.get('bytes_on_disk', 0) / 1e6:.1f} MB on disk"
    else:
        model, tokenizer = models.load(args.target)
        size = f"{sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters (float32)"
    ppl = ev.perplexity(model, tokenizer, seq_len=args.seq_len, windows=args.windows)
    print(f"{args.target}: perplexity {ppl:.3f} (WikiText-2 test, {args.windows} x {args.seq_len} tokens), {size}")
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    import presso

    model = presso.runtime.load(args.artifact)
    if not hasattr(model, "generate"):
        raise PressoError(f"{args.artifact} is not a causal language model export",
                          hint="export a causal LM, e.g. presso compile --model smollm2-135m --out DIR")
    tokenizer = artifact_tokenizer(args.artifact)
    ids = prompt_ids(tokenizer, args.prompt, chat=not args.raw)
    out = model.generate(ids, max_new_tokens=args.max_new_tokens, eos_token_id=tokenizer.eos_token_id)
    print(tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip())
    return 0


def prompt_ids(tokenizer, prompt: str, chat: bool = True):
    """Token ids of a prompt, through the chat template when the tokenizer has one."""
    if chat and getattr(tokenizer, "chat_template", None):
        ids = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                            return_tensors="pt")
        return ids if not isinstance(ids, dict) and hasattr(ids, "shape") else ids["input_ids"]
    return tokenizer(prompt, return_tensors="pt").input_ids


def cmd_passes(args: argparse.Namespace) -> int:
    from presso.pass_api import describe_options
    from presso.plugins.registry import get_registry

    registry = get_registry()
    for name in sorted(registry.passes):
        cls = registry.passes[name]
        print(f"{name}  [{registry.source_of('pass', name)}]\n    {cls.summary}\n"
              f"    options: {describe_options(cls.Config) or '(none)'}")
    print("importances (prune_structured importance=...): " + ", ".join(
        f"{n} [{registry.source_of('importance', n)}]" for n in sorted(registry.importances)))
    for failure in registry.failures:
        print(f"warning: {failure}", file=sys.stderr)
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from presso.demo import run_demo

    run_demo(args.out, windows=args.windows)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="presso", description="Compress PyTorch models: trace, rewrite, lower.")
    parser.add_argument("--debug", action="store_true", help="show the full traceback on errors")
    sub = parser.add_subparsers(dest="command", required=True)

    c = sub.add_parser("compile", help="compile a model with passes and export it to ONNX")
    c.add_argument("--model", default="smollm2-135m", help="embedded name, local HF folder or .gguf file")
    c.add_argument("--pass", dest="passes", action="append", nargs="+", metavar="NAME [key=value]",
                   help="a pass and its options; repeat for several passes")
    c.add_argument("--out", required=True, help="output folder (model.onnx, manifest.json, report.md, tokenizer)")
    c.add_argument("--recipe", help="a named recipe (presso recipes lists them); --pass adds passes after it")
    c.add_argument("--calibration", type=int, default=None,
                   help=f"calibration windows, for passes that need data (default: the recipe's, else "
                        f"{DEFAULT_CALIBRATION})")
    c.add_argument("--seq-len", type=int, default=None,
                   help=f"calibration window length in tokens (default: the recipe's, else {DEFAULT_SEQ_LEN})")
    c.set_defaults(func=cmd_compile)

    e = sub.add_parser("eval", help="perplexity of an exported folder or a model")
    e.add_argument("target", help="export folder, .onnx file, embedded model name or HF folder")
    e.add_argument("--windows", type=int, default=64)
    e.add_argument("--seq-len", type=int, default=256)
    e.set_defaults(func=cmd_eval)

    r = sub.add_parser("run", help="generate text with an exported causal LM")
    r.add_argument("artifact", help="export folder")
    r.add_argument("--prompt", required=True)
    r.add_argument("--max-new-tokens", type=int, default=64)
    r.add_argument("--raw", action="store_true", help="do not apply the chat template")
    r.set_defaults(func=cmd_run)

    sub.add_parser("passes", help="list registered passes with their options").set_defaults(func=cmd_passes)
    sub.add_parser("recipes", help="list the named recipes with what they measured").set_defaults(func=cmd_recipes)

    d = sub.add_parser("demo", help="compile the embedded SmolLM2 with int8, evaluate it and let it answer")
    d.add_argument("--out", default="out/demo", help="export folder (default: out/demo)")
    d.add_argument("--windows", type=int, default=8, help="perplexity windows of 256 tokens (default: 8)")
    d.set_defaults(func=cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except PressoError as exc:
        if args.debug:
            traceback.print_exc()
        print(f"error: {exc.problem}", file=sys.stderr)
        if exc.hint:
            print(f"hint: {exc.hint}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # noqa: BLE001 - the CLI reports, --debug shows where
        if args.debug:
            traceback.print_exc()
        first = (str(exc).strip().splitlines() or [""])[0]
        print(f"error: {type(exc).__name__}: {first}", file=sys.stderr)
        print("hint: run again with --debug for the traceback", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
