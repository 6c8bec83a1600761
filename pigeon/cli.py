"""``pigeon …`` commands: each is a thin call into the library."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def _params(args: argparse.Namespace):
    from pigeon.config import load_params

    return load_params(args.params, args.profile, args.set or ())


def _add_params_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--params", default="params.yaml", help="params file (default: params.yaml)")
    p.add_argument("--profile", default=None, help="profile merged over the params (env PIGEON_PROFILE)")
    p.add_argument("--set", "-s", action="append", metavar="KEY=VALUE", help="override, e.g. dpo.beta=0.2")
    p.add_argument("--workspace", default=".", help="workspace root (default: current folder)")


def cmd_stage(args: argparse.Namespace) -> int:
    from pigeon.distributed import is_main
    from pigeon.paths import Workspace
    from pigeon.runtime import seed_everything, setup_torch
    from pigeon.stages import run_stage

    params = _params(args)
    setup_torch(params.threads)
    seed_everything(params.seed)
    result = run_stage(args.name, params, Workspace.at(args.workspace))
    if is_main():  # under `accelerate launch`, one summary for the run
        print(json.dumps(result, indent=None, default=str))
    return 0


def cmd_params(args: argparse.Namespace) -> int:
    from pigeon.config import dump_params
    from pigeon.io import atomic_write_text

    params = _params(args)
    # The written file is already merged: mark it `default` so loading it does not merge the profile again.
    text = f"# merged from profile {params.profile}\n" + dump_params(params.model_copy(update={"profile": "default"}))
    if args.write:
        atomic_write_text(args.write, text)
    else:
        sys.stdout.write(text)
    return 0


def cmd_data_fetch(args: argparse.Namespace) -> int:
    from pigeon.data.fetch import fetch_dataset

    params = _params(args)
    out = Path(args.out) if args.out else Path(args.workspace) / "data" / "raw"
    summary = fetch_dataset(params.data, out, cache_root=Path(args.workspace))
    print(json.dumps(summary, default=str))
    return 0


def cmd_data_ingest(args: argparse.Namespace) -> int:
    from pigeon.config import load_params
    from pigeon.data.ingest import last_day, record_dvc_version
    from pigeon.paths import Workspace
    from pigeon.stages import run_stage

    ws = Workspace.at(args.workspace)
    day = last_day(ws) + 1 if args.day is None else args.day
    params = load_params(args.params, args.profile, [*(args.set or ()), f"ingest.day={day}"])
    result = run_stage("ingest", params, ws)
    warning = record_dvc_version(ws)
    if warning:
        print(f"pigeon: warning: {warning}", file=sys.stderr)
    print(json.dumps(result, default=str))
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    from pigeon.paths import Workspace
    from pigeon.runtime import setup_torch
    from pigeon.serving import generate_file

    params = _params(args)
    setup_torch(params.threads)
    summary = generate_file(params, Workspace.at(args.workspace), args.history, args.reference, args.caption,
                            args.out, model_uri=args.model, alpha_ref=args.alpha_ref, seed=args.seed)
    print(json.dumps(summary))
    return 0


def cmd_promote(args: argparse.Namespace) -> int:
    from pigeon.paths import Workspace
    from pigeon.registry import promote, registry_client

    params = _params(args)
    client = registry_client(params, Workspace.at(args.workspace))
    name = params.register.model_name
    previous = promote(client, name, args.version, reason=f"manual: {args.reason}")
    print(json.dumps({"model": name, "champion": str(args.version), "previous": previous}))
    return 0


def cmd_rollback(args: argparse.Namespace) -> int:
    from pigeon.paths import Workspace
    from pigeon.registry import registry_client, rollback

    params = _params(args)
    name = params.register.model_name
    rolled_back, champion = rollback(registry_client(params, Workspace.at(args.workspace)), name,
                                     reason=f"manual: {args.reason}")
    print(json.dumps({"model": name, "champion": champion, "rolled_back": rolled_back}))
    return 0


def cmd_noise_study(args: argparse.Namespace) -> int:
    from pigeon.errors import ConfigError
    from pigeon.noise_study import DEFAULT_RATES, check_inputs, collect, markdown, run_study, write_study

    root = Path(args.workspace).resolve()
    if not args.collect_only:
        if args.jobs < 1:
            raise ConfigError(f"--jobs: must be at least 1 (got {args.jobs})")
        rates = list(args.rates or DEFAULT_RATES)
        run_study(root, rates, check_inputs(root, rates, args.profile, args.set or []), args.jobs, args.replace)
    frame = collect(root, args.rates or (None if args.collect_only else DEFAULT_RATES))
    paths = write_study(frame, root / "reports")
    sys.stdout.write(markdown(frame))
    print("\nwritten: " + ", ".join(str(path.relative_to(root)) for path in paths.values()))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pigeon", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    from pigeon.stages import STAGES

    p = sub.add_parser("stage", help="run one pipeline stage")
    p.add_argument("name", choices=STAGES)
    _add_params_args(p)
    p.set_defaults(func=cmd_stage)

    p = sub.add_parser("params", help="print (or --write) the validated, merged params")
    _add_params_args(p)
    p.add_argument("--write", default=None, help="write to this file instead of stdout")
    p.set_defaults(func=cmd_params)

    data = sub.add_parser("data", help="dataset commands").add_subparsers(dest="data_command", required=True)
    p = data.add_parser("fetch", help="build data/raw from the pinned package tarballs")
    _add_params_args(p)
    p.add_argument("--out", default=None, help="output folder (default: <workspace>/data/raw)")
    p.set_defaults(func=cmd_data_fetch)

    p = data.add_parser("ingest", help="add the next day of simulated interactions to data/log (audited first)")
    _add_params_args(p)
    p.add_argument("--day", type=int, default=None,
                   help="the last day the log should hold (default: the day after its last one)")
    p.set_defaults(func=cmd_data_ingest)

    p = sub.add_parser("generate", help="personalize one reference image for a history of images")
    _add_params_args(p)
    p.add_argument("--history", nargs="+", required=True, metavar="PNG", help="the user's history images")
    p.add_argument("--reference", required=True, metavar="PNG", help="the image whose content is kept")
    p.add_argument("--caption", required=True, help="what the reference shows, e.g. 'grinning face'")
    p.add_argument("--out", required=True, metavar="PNG", help="where the generated image is written")
    p.add_argument("--model", default=None, metavar="URI",
                   help="MLflow model, e.g. models:/pigeon@champion (default: the workspace's models/dpo)")
    p.add_argument("--alpha-ref", type=float, default=None, help="reference mask ratio in [0, 1]")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("noise-study", help="accuracy against simulate.noise_rate: one DVC experiment per rate")
    p.add_argument("--rates", nargs="+", type=float, default=None, metavar="R",
                   help="noise rates, one experiment `noise-R` each (default: 0.0 0.2 0.4; with --collect-only: "
                        "every finished noise-* experiment)")
    p.add_argument("--profile", default=None, help="passed to every experiment as `-S profile=NAME`")
    p.add_argument("--set", "-s", action="append", metavar="KEY=VALUE",
                   help="passed to every experiment as `-S KEY=VALUE`, e.g. threads=1")
    p.add_argument("--workspace", default=".", help="the DVC project (default: current folder)")
    p.add_argument("--jobs", type=int, default=1, help="experiments run at once (`dvc exp run --run-all --jobs`)")
    p.add_argument("--replace", action="store_true",
                   help="remove this commit's experiments of the same names first, then run them again")
    p.add_argument("--collect-only", action="store_true",
                   help="run nothing: read the finished experiments with `dvc exp show` and write the reports")
    p.set_defaults(func=cmd_noise_study)

    p = sub.add_parser("promote", help="make a registered model version the champion")
    _add_params_args(p)
    p.add_argument("--version", required=True, type=int, help="model version to promote")
    p.add_argument("--reason", default="promoted by hand", help="recorded in the champion history")
    p.set_defaults(func=cmd_promote)

    p = sub.add_parser("rollback", help="give the champion alias back to the previous champion")
    _add_params_args(p)
    p.add_argument("--reason", default="rolled back by hand", help="recorded in the champion history")
    p.set_defaults(func=cmd_rollback)
    return parser


def main(argv: list[str] | None = None) -> int:
    from pigeon.errors import PigeonError
    from pigeon.runtime import set_offline_env

    set_offline_env()
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except PigeonError as exc:
        print(f"pigeon: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("pigeon: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
