"""The `crossvit` command. Each subcommand imports what it needs when it runs.

Errors raised on purpose (`CrossViTError`) are caught once here, printed as one line and
mapped to an exit code; anything else is an internal error, printed as one line too
(set CROSSVIT_DEBUG=1 for the traceback).
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
from pathlib import Path

from crossvit import __version__
from crossvit.arguments import Parser, non_negative_number, positive_int, positive_number, printable, seed
from crossvit.contract import MAX_BATCH, PRECISION_NAMES, VARIANT_NAMES
from crossvit.runtime.session import BACKEND_NAMES
from crossvit.errors import ConfigError, CrossViTError, UsageError


def _say(msg: str) -> None:
    print(f"  .. {printable(msg)}", file=sys.stderr, flush=True)


def _warn_random(info_random: bool, what: str) -> None:
    if info_random:
        from crossvit.model.loader import RANDOM_WEIGHTS_NOTE

        print(f"crossvit: warning: {printable(what)} was exported with {RANDOM_WEIGHTS_NOTE.split(': ', 1)[1]}: "
              "its predictions mean nothing", file=sys.stderr)


def _add_model_source(p: argparse.ArgumentParser, positional: bool = True) -> None:
    if positional:
        p.add_argument("checkpoint", nargs="?", type=Path,
                       help="checkpoint: our .safetensors, or a foreign .pt/.pth/.bin/.safetensors "
                            "state dict (then also give --model or --config)")
    p.add_argument("--model", metavar="NAME", help="registered model name (see `crossvit models`)")
    p.add_argument("--config", metavar="FILE.json", type=Path,
                   help="config of a foreign checkpoint: vit-pytorch's or timm's constructor arguments")
    p.add_argument("--init-seed", type=seed, default=None, metavar="N",
                   help="seed of the random weights of a registered model that ships none (default 0: the "
                        "same weights every run, recorded in the files' metadata)")


def _load(args, init_seed: int | None = None):
    """The model the arguments name; a weightless one drawn from --init-seed, else `init_seed` (the
    seed a deploy folder's files record, for --retune), else the default seed."""
    from crossvit.model import DEFAULT_INIT_SEED, DEFAULT_MODEL, RANDOM_WEIGHTS_NOTE, load_model

    checkpoint = getattr(args, "checkpoint", None)
    if checkpoint is None and args.model is None:
        args.model = DEFAULT_MODEL
    given = getattr(args, "init_seed", None)
    seed = next(s for s in (given, init_seed, DEFAULT_INIT_SEED) if s is not None)
    loaded = load_model(checkpoint, name=args.model, config=args.config, init_seed=seed)
    if given is not None and not loaded.info.random_weights:  # it would be silently ignored
        raise UsageError(f"--init-seed seeds the random weights of a registered model that ships none; "
                         f"{printable(str(checkpoint or args.model))} has weights")
    if loaded.info.random_weights:
        print(f"crossvit: warning: {args.model}: {RANDOM_WEIGHTS_NOTE} (init seed {seed})", file=sys.stderr,
              flush=True)
    return loaded


def _batch_sizes(text: str | None) -> list[int] | None:
    if not text:
        return None
    try:
        sizes = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise ConfigError(f"--batch-sizes must be comma-separated integers, got {text!r}") from None
    if not sizes or min(sizes) < 1:
        raise ConfigError(f"--batch-sizes must be integers >= 1, got {text!r}")
    if max(sizes) > MAX_BATCH:
        raise ConfigError(f"--batch-sizes {max(sizes)} is over the limit of {MAX_BATCH}")
    return list(dict.fromkeys(sizes))  # each size once, in the order given


# -- subcommands -----------------------------------------------------------------------------

def cmd_models(args) -> int:
    from crossvit.benchmarks.limits import model_gflops
    from crossvit.model import build_model, get_spec, list_models
    import torch

    rows = []
    for name in list_models():
        spec = get_spec(name)
        # the official family's FLOPs come from its config (no weights needed); the seed's are counted by a run
        with torch.device("meta" if spec.architecture == "official" else "cpu"):
            model = build_model(spec.architecture, spec.config)
        n = sum(p.numel() for p in model.parameters())
        rows.append((spec.architecture != "seed", n, name, spec, model_gflops(model)))  # embedded first, then by size
    print(f"{'name':<26} {'family':<9} {'params':>8} {'GFLOP':>6} {'input':>11}  description")
    for _, n, name, spec, gflops in sorted(rows, key=lambda r: r[:3]):
        c, h, w = spec.preprocessing.input_size
        shipped = " [weights shipped]" if spec.weights else ""
        print(f"{name:<26} {spec.architecture:<9} {n / 1e6:7.2f}M {gflops:6.2f} {f'{c}x{h}x{w}':>11}  "
              f"{spec.description}{shipped}")
    print("GFLOP: one image's forward pass, 2 per multiply-add (the CrossViT paper counts multiply-adds: half)")
    return 0


def cmd_info(args) -> int:
    path: Path | None = args.artifact
    from crossvit.contract import to_json

    if path is not None and path.suffix.lower() in (".onnx", ".plan", ".engine"):
        from crossvit.runtime.artifact import read_artifact

        if args.config is not None:  # it would be silently ignored
            raise UsageError(f"--config is for a foreign checkpoint; {printable(path.name)} describes itself")

        info = read_artifact(path)
        d = {"kind": info.kind, "precision": info.precision, "batch": [info.batch_min, info.batch_max],
             "input": [info.input_name, list(info.input_shape)], "output": info.output_name,
             "classes": info.num_classes, "architecture": info.model.get("architecture"),
             "name": info.model.get("name"), "random_weights": info.random_weights,
             **({"init_seed": (info.model.get("provenance") or {}).get("init_seed")} if info.random_weights else {}),
             "preprocessing": info.preprocessing, "source": info.raw.get("source"),
             "exporter": info.raw.get("exporter")}
    else:
        from crossvit.model import DEFAULT_MODEL, load_model

        loaded = load_model(path, name=args.model or (DEFAULT_MODEL if path is None else None), config=args.config)
        d = loaded.info.to_dict()
        d["labels"] = d["labels"][:10] + (["..."] if len(d["labels"]) > 10 else [])
        d["parameters"] = sum(p.numel() for p in loaded.model.parameters())
        d["sha256"] = loaded.sha256
    print(to_json(d, indent=2))
    return 0


def cmd_convert(args) -> int:
    from crossvit.files import check_output_path
    from crossvit.model import save_checkpoint

    check_output_path(args.output, suffix=".safetensors", inputs=(args.checkpoint, args.config))
    loaded = _load(args)
    out = save_checkpoint(loaded.model, args.output, labels=loaded.info.labels,
                          preprocessing=loaded.info.preprocessing, name=loaded.info.name,
                          provenance={**loaded.info.provenance, "source_sha256": loaded.sha256})
    print(f"wrote {printable(str(out))} ({out.stat().st_size / 1e6:.2f} MB)")
    return 0


def cmd_export(args) -> int:
    from crossvit.contract import get_precision
    from crossvit.errors import ExportError
    from crossvit.export.onnx import SUPPORTED_OPSETS, BatchRange, export_onnx
    from crossvit.files import check_output_path, temporary_folder

    batch = BatchRange.parse(args.batch)
    if args.opset not in SUPPORTED_OPSETS:
        raise ExportError(f"opset {args.opset} is not supported by the exporter (supported: "
                          f"{SUPPORTED_OPSETS.start}..{SUPPORTED_OPSETS.stop - 1})")
    out: Path = check_output_path(args.output, suffix=".onnx")  # before any work
    precision = get_precision(args.precision)
    if precision.name != "fp32":  # a missing ModelOpt/NNCF is said before the fp32 export, not after it
        from crossvit.export.precision import require_toolchain

        require_toolchain(precision.name)
    loaded = _load(args)
    if precision.name == "fp32":
        result = export_onnx(loaded, out, batch=batch, opset=args.opset, progress=_say)
        print(f"wrote {printable(str(result.path))} ({result.size_bytes / 1e6:.2f} MB, {result.seconds:.1f} s)")
        return 0
    from crossvit.export.calibration import calibration_batch
    from crossvit.export.precision import convert_precision

    # Check the calibration set before the (slow) export; the fp32 graph is an intermediate.
    calib = calibration_batch({"model": loaded.info.to_dict()}, args.calibration,
                              need=precision.calibration == "required")
    with temporary_folder() as tmp:
        fp32 = export_onnx(loaded, tmp / out.name, batch=batch, opset=args.opset, progress=_say).path
        convert_precision(fp32, out, args.precision, calib, progress=_say)
    print(f"wrote {printable(str(out))} ({args.precision}, {out.stat().st_size / 1e6:.2f} MB)")
    return 0


def cmd_check(args) -> int:
    from crossvit.contract import source_checkpoint
    from crossvit.export.parity import check_parity, gate_thresholds
    from crossvit.files import check_output_path
    from crossvit.model import load_model
    from crossvit.runtime.artifact import read_artifact

    if args.json:
        check_output_path(args.json, inputs=(args.artifact, args.reference, args.config))
    if args.images is not None:
        from crossvit.runtime.images import list_images

        list_images(args.images)  # a missing or empty folder: said before the reference is loaded
    info = read_artifact(args.artifact)
    _warn_random(info.random_weights, args.artifact.name)
    reference = None
    if args.reference is None and args.model is None and info.random_weights:
        # a random initialization is rebuilt from the seed and digest its metadata records
        from crossvit.model import rebuild_random_init

        reference = rebuild_random_init(info.model, printable(args.artifact.name))
    elif args.reference is None and args.model is None:
        # The artifact names its model; only a model whose weights ship with the package can be
        # rebuilt without its checkpoint.
        from crossvit.model import get_spec, list_models

        name = info.model.get("name")
        if name not in list_models() or get_spec(name).weights is None:
            raise ConfigError(f"{args.artifact.name} was exported from "
                              f"{(info.raw.get('source') or {}).get('name') or name or 'a checkpoint'}: "
                              "give that checkpoint with --reference CHECKPOINT")
        args.model = name
    if reference is None:
        reference = load_model(args.reference, name=args.model, config=args.config)
    origin = source_checkpoint(info.raw.get("source"))  # a variant's or engine's: its fp32 file's checkpoint
    if origin and reference.sha256 and origin["sha256"] != reference.sha256:
        _say(f"note: the reference's sha256 differs from the checkpoint {args.artifact.name} was made from"
             f"{' (' + printable(origin['name']) + ')' if origin.get('name') else ''}")
    thresholds = gate_thresholds(info.precision, info.random_weights or reference.info.random_weights).tightened(
        max_abs=args.max_abs, rel_l2=args.rel_l2, top1_agreement=args.min_top1)
    report = check_parity(args.artifact, reference, images=args.images, batch_sizes=args.batch_sizes,
                          thresholds=thresholds, seed=args.seed, progress=_say)
    print(report.table())
    if args.json:
        report.save(args.json)
        print(f"wrote {printable(str(args.json))}")
    return {"pass": 0, "fail": 2, "not run": 4}[report.verdict]


def cmd_predict(args) -> int:
    from crossvit.contract import to_json
    from crossvit.errors import InputError
    from crossvit.runtime.images import IMAGE_SUFFIXES
    from crossvit.runtime.session import open_session

    files: list[Path] = []
    for item in args.images:
        try:
            is_dir = item.is_dir()
        except OSError:  # a name too long: reported per file, with the others
            is_dir = False
        if is_dir:
            found = sorted(p for p in item.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
            if not found:
                raise InputError(f"{item}: contains no images ({', '.join(IMAGE_SUFFIXES)})")
            files.extend(found)
        else:
            files.append(item)  # missing or bad files are reported per file, after the rest
    failed = 0
    width = max((len(printable(str(f))) for f in files), default=0)  # the file column, as wide as its longest name
    with open_session(args.artifact, backend=args.backend, device=args.device, exact=args.exact) as session:
        _warn_random(session.info.random_weights, args.artifact.name)
        if not args.json:
            print(f"# {printable(session.info.path.name)} on {session.describe()}", file=sys.stderr)
        if session.chosen:
            print(f"# running {printable(session.chosen)}; --exact runs the file given", file=sys.stderr)
        elif session.passed_over:  # other CPU paths lie beside the file: why none of them runs
            print(f"# running {printable(session.passed_over)}", file=sys.stderr)
        step = args.batch or min(session.info.batch_max, 32)
        # each label as wide as the longest (up to 30 characters), so the columns line up
        label_width = min(30, max((len(printable(str(l))) for l in session.labels), default=0))
        for start in range(0, len(files), step):
            if len(files) > step:
                _say(f"{min(start + step, len(files))}/{len(files)} images")
            for p in session.predict(files[start:start + step], top_k=args.top_k, batch_size=step):
                failed += not p.ok
                if args.json:
                    print(to_json(p.to_dict()), flush=True)
                elif p.ok:
                    tops = "  ".join(f"{printable(l):<{label_width}} {pr:7.2%}" for l, pr in zip(p.labels, p.probs))
                    print(f"{printable(p.source):<{width}}  {tops}", flush=True)
                else:
                    print(f"{printable(p.source):<{width}}  ERROR: {printable(p.error)}", flush=True)
    if failed:
        print(f"crossvit predict: {failed} of {len(files)} inputs failed", file=sys.stderr)
    return 1 if failed else 0


def cmd_build(args) -> int:
    from crossvit.export.engine import BuildOptions, build_engine

    options = BuildOptions(batch=args.batch, workspace_gib=args.workspace, opt_level=args.opt_level,
                           timing_cache=args.timing_cache, hardware_compat=args.hardware_compat,
                           version_compatible=args.version_compatible, library=args.library,
                           compute_capabilities=tuple(args.compute_capability) if args.compute_capability else None)
    manifest = build_engine(args.onnx, args.output, options, progress=_say)
    b, trt = manifest["batch"], manifest["tensorrt"]
    library = "TensorRT-RTX" if trt["library"] == "tensorrt-rtx" else "TensorRT"
    where = (f"for compute capability {', '.join('.'.join(map(str, cc)) for cc in trt['target_compute_capabilities'])}"
             if manifest["device"] is None else manifest["device"]["name"])
    print(f"wrote {printable(str(args.output))} ({manifest['precision']}, batch {b['min']}..{b['max']} tuned for {b['opt']}, "
          f"{library} {trt['version']}, {where})")
    return 0


def _compute_capabilities(text: str) -> list[tuple[int, int]]:
    """An argparse type: '8.6' or '8.6,8.9'."""
    from crossvit.runtime.trt_library import parse_compute_capability

    try:
        return [parse_compute_capability(part) for part in text.split(",")]
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _add_library_option(p) -> None:
    from crossvit.runtime.trt_library import LIBRARY_CHOICES

    p.add_argument("--library", default="auto", choices=LIBRARY_CHOICES,
                   help="which TensorRT builds the engine: tensorrt (TensorRT 10/11, for every NVIDIA GPU; builds "
                        "on the GPU it targets) or tensorrt-rtx (TensorRT for RTX, for Ampere and later RTX GPUs "
                        "and the A100; builds without a GPU). auto: tensorrt where it is installed and a GPU is "
                        "present, else tensorrt-rtx where installed")


def cmd_serve(args) -> int:
    import asyncio

    from crossvit.runtime.serving.server import ServeOptions, Server, is_loopback

    options = ServeOptions(host=args.host, http_port=args.http_port, grpc_port=args.grpc_port,
                           model_name=args.model_name, max_batch=args.max_batch, max_delay_ms=args.max_delay_ms,
                           max_queue=args.max_queue, backend=args.backend, device=args.device, exact=args.exact)
    if not is_loopback(args.host):
        print(f"crossvit serve: warning: listening on {printable(args.host)}, beyond this machine; the server "
              "has no authentication: put it behind a proxy that has", file=sys.stderr)
    server = Server(args.artifact, options, say=_say)
    _warn_random(server.session.info.random_weights, args.artifact.name)
    asyncio.run(server.run())
    return 0


def cmd_bench(args) -> int:
    from crossvit.benchmarks.suite import main as bench

    return bench(args, _say)


def _batch_list(text: str) -> list[int]:
    try:
        sizes = _batch_sizes(text)
    except ConfigError as e:  # argparse would print only "invalid value" for a ValueError
        raise argparse.ArgumentTypeError(str(e)) from None
    if not sizes:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers >= 1, got {text!r}")
    return sizes


BENCH_BACKENDS = ("autocast", "compile", "cuda-graph", "onnxruntime", "openvino", "tensorrt", "served")


def _backend_list(text: str) -> list[str]:
    names = list(dict.fromkeys(x.strip() for x in text.split(",") if x.strip()))
    if not names or any(n not in BENCH_BACKENDS for n in names):
        raise argparse.ArgumentTypeError(f"expected comma-separated rows from {', '.join(BENCH_BACKENDS)}, "
                                         f"got {text!r}")
    return names


def _precision_list(text: str) -> list[str]:
    from crossvit.contract import PRECISION_TABLE

    names = list(dict.fromkeys(x.strip() for x in text.split(",") if x.strip()))
    unknown = [n for n in names if n not in PRECISION_TABLE]
    if not names or unknown:
        raise argparse.ArgumentTypeError(f"expected comma-separated precisions from {', '.join(PRECISION_TABLE)}, "
                                         f"got {text!r}")
    return names


def retune_model(folder: Path) -> tuple[str, dict | None]:
    """The registered model whose deploy `folder` holds, for `deploy --retune -o DIR` given no model,
    and that file's model metadata: the name in the metadata of its one `*.fp32.onnx` (deploy's own
    retune hint names no model), or the default model and None where the folder holds no such file
    (retune then says what is missing). The PyTorch baseline is built from it: only its speed is
    used, never its answers."""
    from crossvit.model import DEFAULT_MODEL, list_models
    from crossvit.runtime.artifact import read_artifact

    fp32s = sorted(folder.glob("*.fp32.onnx")) if folder.is_dir() else []
    if not fp32s:
        return DEFAULT_MODEL, None
    if len(fp32s) > 1:
        raise UsageError(f"--retune: {printable(str(folder))} holds the deploys of several models "
                         f"({', '.join(printable(p.name) for p in fp32s)}): say which with --model NAME or its checkpoint")
    try:
        model = read_artifact(fp32s[0]).model or {}
    except CrossViTError as e:
        raise UsageError(f"--retune: {e}") from None
    name = model.get("name")
    if name not in list_models():
        raise UsageError(f"--retune: {printable(fp32s[0].name)} was not made from a registered model: give the "
                         "checkpoint it was deployed from (and its --config, if foreign)")
    return name, model


def cmd_deploy(args) -> int:
    from crossvit.export.onnx import BatchRange
    from crossvit.files import check_output_dir
    from crossvit.pipeline import deploy, retune

    if args.retune:
        found, seed_used = None, None
        if getattr(args, "checkpoint", None) is None and args.model is None and args.config is None:
            args.model, found = retune_model(args.output)
            made_from = (found or {}).get("provenance")
            seed_used = made_from.get("init_seed") if isinstance(made_from, dict) else None
        # the baseline's weights are those its files were made from (only its speed is used)
        loaded = _load(args, init_seed=seed_used if type(seed_used) is int and seed_used >= 0 else None)
        if found is not None and loaded.info.config != found.get("config"):
            raise UsageError(f"--retune: {args.model} as registered is not the model its deploy in "
                             f"{printable(str(args.output))} was made from: give that checkpoint")
        result = retune(loaded, args.output, images=args.images, progress=_say)
        print(result.table())
        if result.cpu_path:
            print(f"{result.cpu_path}; predict/serve run it on this CPU (--exact runs the fp32 file in ONNX Runtime)")
        else:
            _say_cpu_path(result.out_dir)
        return 0
    variants = tuple(v for v in (args.variants.split(",") if args.variants else VARIANT_NAMES) if v)
    unknown = [v for v in variants if v not in VARIANT_NAMES]
    if unknown:
        raise ConfigError(f"unknown variants {unknown}; choose from {', '.join(VARIANT_NAMES)}")
    batch = BatchRange.parse(args.batch)
    check_output_dir(args.output)
    loaded = _load(args)
    result = deploy(loaded, args.output, variants=variants, calibration=args.calibration, images=args.images,
                    batch=batch, library=args.library, progress=_say)
    print(result.table())
    print(f"wrote {printable(str(args.output / 'summary.json'))} ({result.seconds:.0f} s)")
    if result.cpu_path:
        print(f"{result.cpu_path}; predict/serve run it on this CPU (--exact runs the fp32 file in ONNX Runtime)")
    else:
        _say_cpu_path(result.out_dir)
    failed, left_out = gate_failures(result.rows)
    from crossvit.runtime.cpu_choice import gate_report_path

    for r in left_out:
        print(f"note: {r.candidate.label} failed its gate "
              f"({gate_report_path(result.out_dir, r.candidate).name}): left out of the CPU choice")
    return 2 if failed else 0


def gate_failures(rows: list) -> tuple[list, list]:
    """(rows that fail the deploy, rows only left out of the CPU choice). A file deploy wrote that
    fails its gate fails the deploy (exit 2). A file run another way (OpenVINO with a hint: the fp32
    file in fp32 or bf16, int8-ov's float layers in bf16) is only a candidate for the CPU path:
    failing its gate leaves it out of the choice, as designed (OpenVINO bf16 on the embedded model
    sits near its 1e-2 limit: relative L2 0.006-0.011 on fresh random inputs, so it fails some runs)."""
    hint = [r for r in rows if r.parity == "fail" and getattr(r, "candidate", None) is not None
            and r.candidate.hint is not None]
    return [r for r in rows if r.parity == "fail" and r not in hint], hint


def _say_cpu_path(out: Path) -> None:
    """What `predict`/`serve` of each fp32 file here will run on this CPU (open_session's choice)."""
    from crossvit.runtime.cpu_choice import decide_cpu_path

    for fp32 in sorted(out.glob("*.fp32.onnx")):
        candidate, why = decide_cpu_path(fp32)
        if candidate is not None:
            print(f"on this CPU, predict/serve {printable(fp32.name)} run {printable(candidate.label)}: "
                  f"{printable(why)}; --exact runs the fp32 file in ONNX Runtime")
        else:
            print(f"on this CPU, predict/serve {printable(fp32.name)} run it as is in ONNX Runtime: "
                  f"{printable(why or 'no other CPU path beside it')}")


# -- parser ---------------------------------------------------------------------------------

def _add_session_options(p: argparse.ArgumentParser) -> None:
    """--backend, --device and --exact: how `open_session` picks what runs (predict, serve)."""
    p.add_argument("--backend", default="auto", choices=BACKEND_NAMES,
                   help="auto: by the artifact's kind (a .plan that cannot run here falls back to its ONNX); "
                        "ort-tensorrt: ONNX Runtime's TensorRT provider")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"),
                   help="auto: the GPU for a .plan (and for ONNX Runtime with onnxruntime-gpu), else the CPU")
    p.add_argument("--exact", action="store_true",
                   help="run the file given as it is; without it, an fp32 .onnx on a CPU runs the CPU "
                        "path `crossvit deploy` measured fastest on this CPU (NAME.cpu.json beside it: OpenVINO "
                        "int8-ov or bf16, ONNX Runtime int8-cpu, ...), else the first of them this CPU's flags "
                        "favour; only a path whose parity gate passed for the very bytes beside it runs")


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="crossvit",
        description="Deploy CrossViT image classifiers: checkpoint -> verified ONNX -> precision "
                    "variants -> parity report -> TensorRT engine -> predict, serve (Open Inference "
                    "Protocol) and benchmark. Without a checkpoint, commands use the embedded default "
                    "model (crossvit_digits).",
        epilog="Set CROSSVIT_DEBUG=1 to see tracebacks of internal errors.")
    parser.add_argument("--version", action="version", version=f"crossvit {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=Parser)

    p = sub.add_parser("models", help="list the registered model names")
    p.set_defaults(func=cmd_models)

    p = sub.add_parser("info", help="show what a checkpoint or ONNX file says about itself")
    p.add_argument("artifact", type=Path, nargs="?", default=None,
                   help=".safetensors/.pt/.pth/.bin checkpoint, .onnx or .plan file (default: the embedded "
                        "model, or --model NAME)")
    p.add_argument("--model", metavar="NAME", help="model name, for a foreign checkpoint (alone: a registered model)")
    p.add_argument("--config", metavar="FILE.json", type=Path, help="config, for a foreign checkpoint")
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("convert", help="rewrite a (foreign) checkpoint as our self-describing .safetensors")
    _add_model_source(p)
    p.add_argument("-o", "--output", type=Path, required=True, metavar="OUT.safetensors")
    p.set_defaults(func=cmd_convert)

    p = sub.add_parser("export", help="export to ONNX (dynamic batch, metadata inside, checked)")
    _add_model_source(p)
    p.add_argument("-o", "--output", type=Path, required=True, metavar="OUT.onnx")
    p.add_argument("--opset", type=int, default=20, help="ONNX opset (18..23, default 20)")
    p.add_argument("--batch", default="1:64", metavar="MIN:MAX", help="batch range (default 1:64)")
    p.add_argument("--precision", default="fp32", choices=PRECISION_NAMES,
                   help="fp32; fp16/bf16/int8/fp8 for TensorRT's strongly typed networks (needs "
                        "ModelOpt); int8-cpu for fast ONNX Runtime on CPUs")
    p.add_argument("--calibration", type=Path, metavar="DIR",
                   help="folder of calibration images for int8/fp8 (default: the shipped images "
                        "for the embedded model)")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("check", help="parity gate: the artifact (ONNX Runtime or TensorRT) vs the PyTorch reference",
                       description="The parity gate: the artifact against its PyTorch reference on fresh random "
                                   "inputs and real images, with the precision's thresholds (flags can only tighten "
                                   "them). Exit 0 pass, 2 fail, 4 not run (the backend cannot run this artifact "
                                   "here), 1 bad input, 3 a missing backend.")
    p.add_argument("artifact", type=Path, metavar="MODEL.onnx|MODEL.plan")
    p.add_argument("--reference", type=Path, metavar="CHECKPOINT",
                   help="reference checkpoint (default: --model's, or the embedded model)")
    p.add_argument("--model", metavar="NAME", help="registered model name of the reference")
    p.add_argument("--config", metavar="FILE.json", type=Path, help="config, for a foreign reference")
    p.add_argument("--images", type=Path, metavar="DIR",
                   help="real images (with labels.csv for accuracy); default: the shipped held-out set")
    p.add_argument("--batch-sizes", type=_batch_list, metavar="1,2,7,MAX",
                   help="random-input batch sizes (default 1,2,7,max)")
    p.add_argument("--json", type=Path, metavar="REPORT.json", help="write the report as JSON")
    p.add_argument("--seed", type=seed, default=None, help="seed for the random inputs (default: fresh)")
    p.add_argument("--max-abs", type=float, help="tighten the max abs error limit")
    p.add_argument("--rel-l2", type=float, help="tighten the relative L2 error limit")
    p.add_argument("--min-top1", type=float, help="tighten the top-1 agreement limit (fraction)")
    p.set_defaults(func=cmd_check)

    p = sub.add_parser("predict", help="classify image files or folders with an artifact")
    p.add_argument("artifact", type=Path, metavar="ARTIFACT",
                   help=".onnx, a TensorRT .plan (from `crossvit build`) or a checkpoint (torch backend)")
    p.add_argument("images", type=Path, nargs="+", metavar="IMAGE_OR_DIR",
                   help="image files, or folders searched recursively for .png/.jpg/... files")
    p.add_argument("--top-k", type=positive_int, default=5, help="classes shown per image (default 5)")
    p.add_argument("--batch", type=positive_int, default=None,
                   help="images per inference call (default: the artifact's largest batch, at most 32)")
    p.add_argument("--json", action="store_true", help="print one JSON object per image")
    _add_session_options(p)
    p.set_defaults(func=cmd_predict)

    p = sub.add_parser("build", help="build a TensorRT or TensorRT-RTX engine (.plan + manifest) from an ONNX",
                       description="Build a TensorRT engine from a crossvit ONNX (fp32 or a TensorRT variant "
                                   "from `export --precision`) through Polygraphy: a strongly typed network, so the "
                                   "engine computes in the ONNX's precision. Writes MODEL.plan and MODEL.plan.json "
                                   "(the manifest the runtime checks against the machine). Standard TensorRT 10/11 "
                                   "needs an NVIDIA GPU and cuda-python; TensorRT-RTX builds on any machine, "
                                   "one without a GPU included (running the plan needs an RTX/Ampere+ GPU).")
    p.add_argument("onnx", type=Path, metavar="MODEL.onnx")
    p.add_argument("-o", "--output", type=Path, required=True, metavar="MODEL.plan")
    p.add_argument("--batch", default=None, metavar="MIN:OPT:MAX",
                   help="optimization profile (default: the ONNX's batch range, tuned for a middle size)")
    p.add_argument("--workspace", type=float, default=None, metavar="GiB", help="builder workspace limit")
    p.add_argument("--opt-level", type=int, default=None, metavar="0-5",
                   help="builder optimization level (TensorRT's default 3; higher builds longer)")
    p.add_argument("--timing-cache", type=Path, default=None, metavar="FILE",
                   help="kernel timing cache: loaded if present, saved after the build")
    p.add_argument("--hardware-compat", default="none", choices=("none", "ampere+", "same-cc"),
                   help="standard TensorRT: run on other GPUs: ampere+ (any compute capability >= 8.0, slower "
                        "kernels; not fp8) or same-cc (any GPU of this compute capability)")
    p.add_argument("--version-compatible", action="store_true",
                   help="standard TensorRT: runs on later TensorRT versions of the same or the next major version")
    _add_library_option(p)
    p.add_argument("--compute-capability", type=_compute_capabilities, default=None, metavar="8.6[,8.9]",
                   help="TensorRT-RTX: the GPUs the plan runs on (default: every one it builds for, 8.0, 8.6, 8.9, "
                        "12.x, that computes in the ONNX's precision)")
    p.set_defaults(func=cmd_build)

    p = sub.add_parser("serve", help="serve an artifact over the Open Inference Protocol (HTTP + gRPC, as Triton)",
                       description="Serve one artifact (.onnx, or a TensorRT .plan) over KServe v2 / the Open "
                                   "Inference Protocol, HTTP and gRPC, as Triton Inference Server speaks it, so "
                                   "tritonclient and KServe clients work unchanged. Concurrent requests are "
                                   "batched dynamically. SIGINT/SIGTERM answer the requests in flight, then exit 0. "
                                   "Needs the [serve] extra.")
    p.add_argument("artifact", type=Path, metavar="ARTIFACT", help=".onnx or .plan")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: loopback only)")
    p.add_argument("--http-port", type=int, default=8000, help="HTTP/REST port (default 8000; 0: any free port)")
    p.add_argument("--grpc-port", type=int, default=8001, help="gRPC port (default 8001; 0: any free port)")
    p.add_argument("--model-name", default=None, metavar="NAME",
                   help="name clients use (default: the artifact's model name)")
    p.add_argument("--max-batch", type=positive_int, default=None,
                   help="rows per session call, within the artifact's batch range; larger requests are split "
                        "(default 32, or the artifact's batch max where smaller). An int8-cpu session runs a "
                        "call's rows one at a time (its int8 scales would depend on batch-mates)")
    p.add_argument("--max-delay-ms", type=float, default=2.0,
                   help="how long a request waits, from its arrival, for others to join its batch "
                        "(Triton's max_queue_delay; default 2 ms)")
    p.add_argument("--max-queue", type=positive_int, default=256,
                   help="requests waiting beyond this are refused at once with 503 (default 256)")
    _add_session_options(p)
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("bench", help="every backend side by side against this machine's GEMM rates",
                       description="Time PyTorch eager fp32 (the baseline), bf16 autocast (CPUs with bf16), "
                                   "torch.compile (--compile: fp32, and on CPUs with bf16 the bf16 model with "
                                   "inductor's freezing), ONNX Runtime per .onnx, OpenVINO per fp32 .onnx (fp32 "
                                   "and its bf16 hint) and per int8-ov .onnx, and TensorRT per .plan, in "
                                   "one process on the same inputs, in interleaved turns. Reports p50/p90/p99, "
                                   "images/s, achieved GFLOP/s, the fraction of the best GEMM rate of the precision "
                                   "measured here, and the ratio to eager; flags rows whose turns disagree. Without "
                                   "artifacts, exports the model's fp32 and --precisions variants first.")
    p.add_argument("artifacts", nargs="*", type=Path, metavar="ARTIFACT", help=".onnx or .plan files")
    p.add_argument("--model", metavar="NAME", help="registered model for the PyTorch baseline (default: the "
                                                   "artifact's, or the embedded model)")
    p.add_argument("--checkpoint", type=Path, help="checkpoint for the PyTorch baseline")
    p.add_argument("--precisions", type=_precision_list, default=["fp32", "int8-cpu", "int8-ov"],
                   metavar="fp32,int8-cpu,int8-ov", help="variants to build when no artifact is given (int8-ov "
                   "needs NNCF and calibration images: --calibration, or the shipped ones for the embedded model)")
    p.add_argument("--calibration", type=Path, metavar="DIR",
                   help="real images to calibrate the variants that need it (int8-ov) when no artifact is given")
    p.add_argument("--batch-sizes", type=_batch_list, default=[1, 8, 32], metavar="1,8,32")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"),
                   help="where the PyTorch rows run (default: the GPU if PyTorch sees one); on cuda the rows are "
                        "eager fp32 (TF32 off), fp16/bf16 autocast, a CUDA graph of the fp16 model, "
                        "timed by CUDA events")
    p.add_argument("--runs", type=positive_int, default=30, help="timed runs per backend and batch (3 turns)")
    p.add_argument("--max-seconds", type=positive_number, default=20.0, help="time limit per backend and batch")
    p.add_argument("--min-time", type=non_negative_number, default=0.0, metavar="S",
                   help="timed seconds per backend and batch at least, beyond --runs (capped by --max-seconds)")
    p.add_argument("--backends", type=_backend_list, default=None, metavar="autocast,onnxruntime,...",
                   help="only these rows besides the eager fp32 baseline, from " + ", ".join(BENCH_BACKENDS) +
                        " (default: all that apply here; compile and served also by --compile/--served)")
    p.add_argument("--compile", action="store_true", help="also time torch.compile (compiling takes minutes)")
    p.add_argument("--served", action="store_true",
                   help="also time the first .onnx through `crossvit serve` with the real tritonclient, over HTTP "
                        "and gRPC (needs the serve extra)")
    p.add_argument("--no-accuracy", action="store_true",
                   help="skip the parity gate of each artifact (its accuracy line); the PyTorch rows are "
                        "still compared with eager fp32, one call per batch size")
    p.add_argument("--json", type=Path, metavar="OUT.json")
    p.add_argument("--csv", type=Path, metavar="OUT.csv")
    p.add_argument("--plot", type=Path, metavar="OUT.png",
                   help="latency and throughput vs batch, in the format the suffix names (.png, .svg, .pdf; "
                        "needs matplotlib: the bench extra)")
    p.set_defaults(func=cmd_bench)

    from crossvit.export.triton import add_parser as add_triton_repo

    add_triton_repo(sub)

    p = sub.add_parser("deploy", help="the whole path: export, variants, parity, engines, latency, summary",
                       description="The whole path into one folder: export the fp32 ONNX, build the precision "
                                   "variants, gate each (random inputs and real images; a report beside each "
                                   "file), build TensorRT engines where a TensorRT library is installed, time every "
                                   "CPU path against PyTorch eager in interleaved turns, record the fastest gated "
                                   "one for this CPU (NAME.cpu.json, which predict/serve run), and write "
                                   "DIR/summary.json. Exit 0, or 2 when a file failed its gate.")
    _add_model_source(p)
    p.add_argument("-o", "--output", type=Path, default=Path("deploy-out"), metavar="DIR",
                   help="output folder (default deploy-out); files in it this run did not write are named in a "
                        "warning")
    p.add_argument("--variants", default=None, metavar=",".join(VARIANT_NAMES),
                   help="precision variants to build (default: all of them)")
    p.add_argument("--calibration", type=Path, metavar="DIR", help="calibration images (int8/fp8)")
    p.add_argument("--images", type=Path, metavar="DIR", help="real images for the parity gate")
    p.add_argument("--batch", default="1:64", metavar="MIN:MAX", help="batch range of the artifacts")
    p.add_argument("--retune", action="store_true",
                   help="only time the CPU paths of an earlier deploy in -o DIR again, on this machine, and record "
                        "the fastest gated one for this CPU (NAME.cpu.json): for a folder copied to another machine. "
                        "An OpenVINO path gated on another CPU or with another OpenVINO is gated again here first "
                        "(--images as for deploy)")
    _add_library_option(p)
    p.set_defaults(func=cmd_deploy)
    return parser


class _Terminated(BaseException):
    """Raised in the main thread by SIGTERM; BaseException so no `except Exception` swallows it."""


_terminated = False


def _terminate(signum, frame):
    global _terminated
    _terminated = True  # a library may wrap the exception in its own (torch.export does)
    raise _Terminated()


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 0
    # SIGTERM (a container stop, `kill`) unwinds like Ctrl-C, so temp files are removed
    signal.signal(signal.SIGTERM, _terminate)
    try:
        return args.func(args) or 0
    except BaseException as e:
        return _report(args.command, e)


def _report(command: str, e: BaseException) -> int:
    """One line for whatever ended the command, and its exit code."""
    if _terminated:  # checked first: a library may have wrapped our _Terminated in its own error
        print(f"crossvit {command}: terminated", file=sys.stderr)
        return 143
    if isinstance(e, CrossViTError):
        print(f"crossvit {command}: error: {printable(str(e))}", file=sys.stderr)
        return e.exit_code
    if isinstance(e, BrokenPipeError):  # `crossvit ... | head`
        sys.stderr.close()
        return 0
    if isinstance(e, KeyboardInterrupt):
        print(f"crossvit {command}: interrupted", file=sys.stderr)
        return 130
    if not isinstance(e, Exception) or os.environ.get("CROSSVIT_DEBUG"):
        raise e
    # a bug: still one line unless asked for the traceback
    print(f"crossvit {command}: internal error: {type(e).__name__}: {printable(str(e))} "
          "(set CROSSVIT_DEBUG=1 for the traceback)", file=sys.stderr)
    return 70


if __name__ == "__main__":
    sys.exit(main())
