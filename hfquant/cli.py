"""``hfquant`` command line: quantize, eval, compare, recommend, qat, push, export.

MODEL is a local folder or a Hub id; left out, it is the bundled SmolLM2-135M (built once into
``$HFQUANT_CACHE`` or ``~/.cache/hfquant``). ``--dataset`` takes a preset (wikitext2, c4,
pile-val), a local .txt/.json/.jsonl file; left out, the bundled Brown corpus.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from huggingface_hub import HfApi
from transformers import AutoTokenizer

from hfquant import qat, recommend, workflows
from hfquant.calibration.data import load_text
from hfquant.evaluation.perplexity import tokenize_corpus
from hfquant.qat import train as qat_train
from hfquant.activations import ACTIVATION_MODES
from hfquant.algorithms import get_method, method_names
from hfquant.calibration.observers import OBSERVERS
from hfquant.hf.config import HfQuantConfig
from hfquant.calibration.data import calibration_batches
from hfquant.bundled.model import MODEL_NAME, ArtefactError, cache_root
from hfquant.evaluation import markdown_table
from hfquant.formats import format_names
from hfquant.hf.saving import check_output_folder, save_quantized

DEFAULT_SPECS = ["int8", "int4-g128", "int3-g128", "int2-g64"]


def _add_format_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--format", default=None, metavar="NAME",
                        help=f"weight format, one of: {', '.join(format_names())} (default int4)")
    parser.add_argument("--bits", type=int, default=None, help="shorthand for --format intN (N = 2, 3, 4, 8)")
    parser.add_argument("--group-size", type=int, default=None,
                        help="columns per scale; -1 = per channel (default: the format's own, e.g. 128 for int4)")
    parser.add_argument("--sym", action=argparse.BooleanOptionalAction, default=None,
                        help="symmetric integer grid (default: symmetric at 8 bits, asymmetric below)")
    parser.add_argument("--rules", default=None, metavar="RULES.json", type=_read_rules,
                        help="per-layer overrides: a JSON object {pattern: format name | {scheme fields} | null}, "
                             "first match wins (see README, 'Per-layer rules')")
    _add_method_arg(parser)


def _add_method_arg(parser: argparse.ArgumentParser) -> None:
    methods = "; ".join(f"{name}: {get_method(name).description.rstrip('.')}" for name in method_names())
    parser.add_argument("--method", default="rtn", help=f"{methods} (default rtn)")


def _add_calibration_args(parser: argparse.ArgumentParser) -> None:
    """Calibration flags; their default None means "not given" (HfQuantConfig's default)."""
    parser.add_argument("--calib-dataset", default=None, help="calibration text (default: bundled corpus)")
    parser.add_argument("--num-samples", type=int, default=None, help="calibration samples (default 128)")
    parser.add_argument("--calib-seqlen", type=int, default=None, help="calibration sequence length (default 2048)")
    parser.add_argument("--seed", type=int, default=None, help="calibration sampling seed (default 0)")


def _add_activation_args(parser: argparse.ArgumentParser) -> None:
    """Activation quantization flags; None means "not given" (HfQuantConfig's default)."""
    parser.add_argument("--activations", default=None, metavar="MODE",
                        help=f"quantize layer inputs too: one of {', '.join(ACTIVATION_MODES)} (default: weight-only; "
                             "int8 modes need --format int8 --group-size -1, fp8-dynamic --format fp8; int8-static "
                             "calibrates on data, also with --method rtn)")
    parser.add_argument("--observer", default=None, choices=list(OBSERVERS),
                        help="how int8-static input scales are chosen from the calibration inputs (default mse)")
    parser.add_argument("--observer-percentile", type=float, default=None, metavar="P",
                        help="the percentile of |x| --observer percentile clips at (default 99.99)")


def _read_rules(path: str) -> dict[str, Any]:
    """The JSON object of a ``--rules`` file, in file order (the order is the precedence)."""
    try:
        rules = json.loads(Path(path).read_text())
    except OSError as error:
        raise argparse.ArgumentTypeError(f"cannot read {path!r}: {error.strerror or error}") from error
    except json.JSONDecodeError as error:
        raise argparse.ArgumentTypeError(f"{path!r} is not JSON: {error}") from error
    if not isinstance(rules, dict):
        raise argparse.ArgumentTypeError(f"{path!r} holds a {type(rules).__name__}; expected a JSON object "
                                         '{"pattern": "int8" | {"format": ..., "group_size": ...} | null, ...}')
    return rules


def _add_eval_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--dataset", default=None, help="evaluation text (default: bundled Brown corpus)")
    parser.add_argument("--split", default="test")
    parser.add_argument("--protocol", choices=["gptq", "strided", "both"], default="both")
    parser.add_argument("--seqlen", type=int, default=2048, help="window length of both protocols")
    parser.add_argument("--stride", type=int, default=512, help="stride of the strided protocol")
    parser.add_argument("--max-tokens", type=int, default=None, help="score only the first N tokens")
    parser.add_argument("--batch-size", type=int, default=1)


# calibration flags of `quantize` -> HfQuantConfig field; their parser default is None ("not given")
_CALIBRATION_FLAGS = {"calib_dataset": "dataset", "num_samples": "num_samples", "calib_seqlen": "seqlen",
                      "seed": "seed"}


def _quant_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """HfQuantConfig keyword arguments of `quantize`; calibration flags given to an uncalibrated method
    (rtn) are an error, as ``HfQuantConfig(dataset=...)`` is in the API."""
    kwargs: dict[str, Any] = {"format": args.format, "bits": args.bits, "group_size": args.group_size,
                              "sym": args.sym, "rules": args.rules, "method": args.method}
    if args.target_bits is not None or args.candidates is not None:
        kwargs.update(target_bits=args.target_bits, candidates=args.candidates)
    kwargs.update({field: getattr(args, field) for field in ("activations", "observer", "observer_percentile",
                                                             "smoothquant", "embeddings")
                   if getattr(args, field) is not None})
    given = _calibration_kwargs(args)
    if given and not HfQuantConfig(**kwargs).calibrated:
        raise ValueError(f"{_flags(given)} given, but --method {args.method} uses no calibration data; drop "
                         f"{'it' if len(given) == 1 else 'them'} or use a calibrated method (e.g. --method gptq) "
                         "or calibrated activations (--activations int8-static)")
    return {**kwargs, **given}


def _calibration_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """The calibration flags given, as HfQuantConfig keyword arguments."""
    return {field: getattr(args, flag) for flag, field in _CALIBRATION_FLAGS.items() if getattr(args, flag) is not None}


def _flags(kwargs: dict[str, Any]) -> str:
    by_field = {field: flag for flag, field in _CALIBRATION_FLAGS.items()}
    return ", ".join(f"--{by_field[field].replace('_', '-')}" for field in kwargs)


def _eval_settings(args: argparse.Namespace) -> workflows.EvalSettings:
    protocols = workflows.PROTOCOLS if args.protocol == "both" else (args.protocol,)
    return workflows.EvalSettings(dataset=args.dataset, split=args.split, protocols=protocols, seqlen=args.seqlen,
                                  stride=args.stride, max_tokens=args.max_tokens, batch_size=args.batch_size)


def cmd_quantize(args: argparse.Namespace) -> None:
    kwargs = _quant_kwargs(args)
    # OUT is checked before anything is built, downloaded, loaded or quantized
    model_folder = args.model if args.model is not None else cache_root() / "models" / MODEL_NAME
    check_output_folder(args.out, model_folder, args.overwrite)
    path = workflows.resolve_model(args.model)
    model, seconds = workflows.load(path, kwargs)
    print(f"quantized {path} in {seconds:.1f} s")
    out = save_quantized(model, args.out, tokenizer=AutoTokenizer.from_pretrained(path), overwrite=args.overwrite,
                         model_path=path)
    print(f"saved to {out}")


def cmd_eval(args: argparse.Namespace) -> None:
    path = workflows.resolve_model(args.model)
    settings = _eval_settings(args)
    model, _ = workflows.load(path)
    base = workflows.load(args.base)[0] if args.base else None
    ids = workflows.eval_tokens(AutoTokenizer.from_pretrained(path), settings)
    report = workflows.evaluate(model, ids, settings, model_id=path, base=base)
    print(markdown_table([report]))
    if args.out:
        report.to_json(args.out)


def cmd_compare(args: argparse.Namespace) -> None:
    calibrated = any(get_method(workflows.parse_spec(spec).get("method", "rtn")).calibrated for spec in args.configs)
    given = _calibration_kwargs(args)
    if given and not calibrated:
        raise ValueError(f"{_flags(given)} given, but no spec of --configs uses a calibrated method "
                         "(e.g. gptq:int4-g128)")
    extra = {"rules": args.rules} if args.rules else {}
    result = workflows.compare(args.model, args.configs, _eval_settings(args), args.out, quant_extra=extra,
                               calibration_extra=given)
    print(result.table)
    print(f"table, plot and JSON in {args.out}")


def cmd_recommend(args: argparse.Namespace) -> None:
    hardware = recommend.probe_hardware(args.device)
    print("\n".join(hardware.lines()))
    path = workflows.resolve_model(args.model)
    tokenizer = AutoTokenizer.from_pretrained(path)
    settings = workflows.EvalSettings(dataset=args.dataset, split="validation", seqlen=args.seqlen,
                                      max_tokens=args.tokens, progress=False)
    eval_ids = workflows.eval_tokens(tokenizer, settings)
    calibration = calibration_batches(tokenizer, args.dataset, num_samples=args.num_samples, seqlen=args.seqlen,
                                      seed=0)
    rows = recommend.measure(path, args.candidates, eval_ids, calibration, args.device, args.prefill_tokens,
                             args.target_bits, seqlen=args.seqlen)
    print(f"\nmeasured here; KL on {len(eval_ids)} validation tokens in windows of {args.seqlen}; speed of the linear "
          f"layers (best of 5):\n")
    print(recommend.markdown(rows, args.prefill_tokens))
    choice = recommend.pick(rows, args.bits, args.target_bits, args.max_mb)
    if choice is None:
        raise ValueError("no candidate fits the budget given; allowed: a larger --bits/--target-bits/--max-mb, or "
                         "other --candidates")
    print(f"\npick: {choice.spec} (lowest mean KL within the budget)")
    print("  " + recommend.command_line(choice, args.model))
    print("  hfquant.HfQuantConfig(" + ", ".join(f"{k}={v!r}" for k, v in choice.kwargs.items()) + ")")


def cmd_qat(args: argparse.Namespace) -> None:
    """Fake-quantize MODEL, train on the bundled corpus's train split, evaluate on test, convert and save."""
    model_folder = args.model if args.model is not None else cache_root() / "models" / MODEL_NAME
    check_output_folder(args.out, model_folder, args.overwrite)
    path = workflows.resolve_model(args.model)
    kwargs = {"format": args.format, "bits": args.bits, "group_size": args.group_size, "sym": args.sym,
              "rules": args.rules, "method": args.method, "qat": True, "qat_learn_scales": args.learn_scales}
    model, _ = workflows.load(path, kwargs)
    tokenizer = AutoTokenizer.from_pretrained(path)
    teacher = workflows.load(path)[0] if args.distill else None
    ids = tokenize_corpus(tokenizer, load_text(None, split="train"))
    result = qat_train.train(model, ids, args.steps, args.batch_size, args.train_seqlen, args.lr, teacher)
    print(f"trained {args.steps} steps in {result.seconds:.1f} s; loss {result.losses[0]:.4f} -> {result.losses[-1]:.4f}")
    packed = qat.convert(model)
    settings = _eval_settings(args)
    report = workflows.evaluate(packed, workflows.eval_tokens(tokenizer, settings), settings, model_id=path)
    print(markdown_table([report]))
    out = save_quantized(packed, args.out, tokenizer=tokenizer, overwrite=args.overwrite, model_path=path)
    print(f"saved to {out}")


def cmd_push(args: argparse.Namespace) -> None:
    folder = Path(args.folder)
    if not (folder / "config.json").exists():
        raise SystemExit(f"error: folder={str(folder)!r} has no config.json; save a model there first")
    config = json.loads((folder / "config.json").read_text())
    if config.get("quantization_config", {}).get("quant_method") != "hfquant":
        raise SystemExit(f"error: {folder} is not an hfquant checkpoint (no quant_method='hfquant' in config.json)")
    api = HfApi(token=args.token)
    try:
        api.create_repo(args.repo_id, private=args.private, exist_ok=True)
        api.upload_folder(folder_path=str(folder), repo_id=args.repo_id, commit_message="Upload hfquant checkpoint")
    except Exception as error:  # network/auth errors of huggingface_hub, reported plainly
        raise SystemExit(f"error: upload to {args.repo_id!r} failed ({type(error).__name__}: {error}); "
                         "check the network and the token (--token or `huggingface-cli login`)") from error
    print(f"pushed {folder} to https://huggingface.co/{args.repo_id}")


def cmd_export(args: argparse.Namespace) -> None:
    from hfquant.export import export

    report = export(args.folder, args.out, to=args.to, overwrite=args.overwrite)
    print(report.summary())
    print(f"exported to {args.out} (per-layer report: hfquant-export.json)")


def cmd_install_hook(args: argparse.Namespace) -> None:
    from hfquant.hook import install_hook, remove_hook

    if args.remove:
        removed = remove_hook(args.site_dir)
        print(f"removed {removed}" if removed else "no hfquant hook was installed there")
        return
    path = install_hook(args.site_dir)
    print(f"wrote {path}: Python processes of this environment now load hfquant checkpoints without "
          "`import hfquant` (undo: hfquant install-hook --remove)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hfquant", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    quantize = sub.add_parser("quantize", help="quantize MODEL and save it (weights, config, tokenizer, card) to OUT")
    quantize.add_argument("model", nargs="?", default=None)
    quantize.add_argument("out")
    _add_format_args(quantize)
    quantize.add_argument("--target-bits", type=float, default=None, metavar="BITS",
                        help="allocate a format per layer from --candidates to this average of stored bits per "
                             "weight, by measured sensitivity (needs calibration data; see README, 'Bit allocation')")
    quantize.add_argument("--candidates", nargs="+", default=None, metavar="SPEC",
                        help="formats --target-bits chooses from (default: int2-g64 int3-g128 int4-g128 int8)")
    _add_activation_args(quantize)
    quantize.add_argument("--smoothquant", type=float, default=None, metavar="ALPHA",
                          help="SmoothQuant migration strength in [0, 1] (e.g. 0.5) before quantizing the weights; "
                               "needs calibration data, works with rtn, hqq and gptq")
    quantize.add_argument("--embeddings", default=None, metavar="SPEC",
                          help="format of the token embedding and output head, e.g. int8 (a tied head shares the "
                               "embedding's table; default: both stay float)")
    _add_calibration_args(quantize)
    quantize.add_argument("--overwrite", action="store_true",
                          help="replace OUT even if it is a non-empty folder that is not an hfquant checkpoint "
                               "(its contents are deleted once the new checkpoint is in place)")
    quantize.set_defaults(func=cmd_quantize)

    evaluate = sub.add_parser("eval", help="perplexity of MODEL, and drift from --base")
    evaluate.add_argument("model", nargs="?", default=None)
    evaluate.add_argument("--base", default=None, help="float model to measure KL / top-1 agreement against")
    evaluate.add_argument("--out", default=None, help="write the report as JSON here")
    _add_eval_args(evaluate)
    evaluate.set_defaults(func=cmd_eval)

    comp = sub.add_parser("compare", help="quantize MODEL in several configurations; Markdown table + PNG plot")
    comp.add_argument("model", nargs="?", default=None)
    comp.add_argument("--configs", nargs="+", default=DEFAULT_SPECS, metavar="SPEC",
                      help=f"[method:]format[-gN|-gc][-sym|-asym], methods {method_names()}, formats "
                           f"{format_names()}; e.g. nf4-g64 ternary fp8 gptq:int4-g128 (default: %(default)s)")
    comp.add_argument("--out", default="hfquant-compare")
    comp.add_argument("--rules", default=None, metavar="RULES.json", type=_read_rules,
                      help="per-layer overrides applied to every spec (as for quantize)")
    _add_calibration_args(comp)
    _add_eval_args(comp)
    comp.set_defaults(func=cmd_compare)

    rec = sub.add_parser("recommend", help="measure candidate formats and methods on this machine and MODEL; pick one")
    rec.add_argument("model", nargs="?", default=None)
    budget = rec.add_mutually_exclusive_group()
    budget.add_argument("--bits", type=int, default=None, help="largest code width allowed (e.g. 4)")
    budget.add_argument("--target-bits", type=float, default=None,
                        help="largest stored bits/weight allowed; also measures an automatic allocation to it")
    budget.add_argument("--max-mb", type=float, default=None, help="largest checkpoint size allowed, in MB")
    rec.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    rec.add_argument("--candidates", nargs="+", default=list(recommend.DEFAULT_CANDIDATES), metavar="SPEC",
                     help="[method:]format specs to measure (default: %(default)s)")
    rec.add_argument("--dataset", default=None, help="text for the KL slice and calibration (default: bundled corpus)")
    rec.add_argument("--tokens", type=int, default=2048, help="validation tokens the KL is measured on")
    rec.add_argument("--seqlen", type=int, default=256, help="window and calibration sequence length")
    rec.add_argument("--num-samples", type=int, default=8, help="calibration sequences for calibrated candidates")
    rec.add_argument("--prefill-tokens", type=int, default=128, help="tokens of the timed prefill")
    rec.set_defaults(func=cmd_recommend)

    train = sub.add_parser("qat", help="quantization-aware training of MODEL on the bundled corpus; convert and "
                                       "save the packed model to OUT")
    train.add_argument("model", nargs="?", default=None)
    train.add_argument("out")
    _add_format_args(train)
    train.add_argument("--steps", type=int, required=True, help="training steps")
    train.add_argument("--batch-size-train", dest="batch_size", type=int, default=4, help="sequences per step")
    train.add_argument("--train-seqlen", type=int, default=256, help="tokens per training sequence")
    train.add_argument("--lr", type=float, default=1e-5, help="Adam learning rate")
    train.add_argument("--distill", action="store_true", help="KL to the float model's logits instead of CE")
    train.add_argument("--learn-scales", action="store_true", help="learn the per-group scales (LSQ)")
    train.add_argument("--overwrite", action="store_true")
    _add_eval_args(train)
    train.set_defaults(func=cmd_qat)

    push = sub.add_parser("push", help="upload a saved hfquant folder (weights, config, card) to the Hub")
    push.add_argument("folder")
    push.add_argument("repo_id")
    push.add_argument("--token", default=None)
    push.add_argument("--private", action="store_true")
    push.set_defaults(func=cmd_push)

    from hfquant.export import TARGETS

    export = sub.add_parser("export", help="write a saved hfquant FOLDER for a runtime that does not import hfquant")
    export.add_argument("folder")
    export.add_argument("out")
    export.add_argument("--to", required=True, choices=list(TARGETS),
                        help="; ".join(f"{name}: {target.consumer}" for name, target in TARGETS.items()))
    export.add_argument("--overwrite", action="store_true",
                        help="replace OUT even if it is a non-empty folder hfquant did not write")
    export.set_defaults(func=cmd_export)

    hook = sub.add_parser("install-hook", help="let processes of this environment that never import hfquant load "
                          "its checkpoints (a .pth start-up hook in site-packages)")
    hook.add_argument("--remove", action="store_true", help="remove the hook instead")
    hook.add_argument("--site-dir", default=None, help="the site-packages folder (default: this environment's)")
    hook.set_defaults(func=cmd_install_hook)
    return parser


# What a user can cause (bad values, missing or unwritable paths, unreachable presets or Hub, broken JSON,
# failed downloads of the bundled artefacts): one line on stderr, exit status 2. Anything else is a bug
# and keeps its traceback.
USER_ERRORS = (ValueError, OSError, ArtefactError)


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except USER_ERRORS as error:
        print(f"error: {_one_line(error)}", file=sys.stderr)
        raise SystemExit(2) from error


def _one_line(error: BaseException) -> str:
    text = " ".join(str(error).split())
    return text or type(error).__name__
