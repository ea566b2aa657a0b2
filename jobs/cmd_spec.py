"""`raygen spec validate|show|schema`."""
from __future__ import annotations

import json

import yaml


def register(sub) -> None:
    p = sub.add_parser("spec", help="validate, show or describe job specs")
    s = p.add_subparsers(dest="spec_command", metavar="ACTION", required=True)
    v = s.add_parser("validate", help="check a spec file as `raygen train` and `raygen tune` would; "
                                      "exit 2 with the problems if they would reject it")
    v.add_argument("file")
    v.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="dotted override")
    v.set_defaults(func=validate)
    sh = s.add_parser("show", help="print the resolved spec with defaults and overrides applied")
    sh.add_argument("file")
    sh.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="dotted override")
    sh.set_defaults(func=show)
    sc = s.add_parser("schema", help="print the JSON schema of job specs (for editors)")
    sc.set_defaults(func=schema)


def validate(args) -> int:
    from raygen.spec import load_spec
    from raygen.spec.checks import check_runnable
    from raygen.spec.loader import read_spec_file
    from raygen.spec.pipeline import is_pipeline
    if is_pipeline(read_spec_file(args.file)):
        return validate_pipeline_file(args)
    spec = load_spec(args.file, args.set)
    check_runnable(spec, tune=None)  # the checks train and tune make before they start
    sweep = f", tune.space of {len(spec.tune.space)} key(s)" if spec.tune.space else ""
    from raygen.train.worker import describe_strategy
    print(f"{args.file}: ok ({spec.model.family} model, {spec.scale.workers} worker(s), {describe_strategy(spec)}{sweep})")
    return 0


def validate_pipeline_file(args) -> int:
    """Every stage checked as `raygen train` will run it (earlier stages' models stand in as placeholders)."""
    from raygen.spec.checks import check_runnable
    from raygen.spec.errors import SpecError
    from raygen.spec.pipeline import load_pipeline, validate_pipeline
    pipeline, base = load_pipeline(args.file, args.set)
    stages = validate_pipeline(pipeline, base)
    for name, spec in stages.items():
        if pipeline.stages[name].encode is not None:
            continue  # an encode stage: its references were checked by validate_pipeline
        try:
            check_runnable(spec, tune=False)
        except SpecError as err:
            raise SpecError([f"stages.{name}: {p}" for p in err.problems], args.file) from None
    print(f"{args.file}: ok (pipeline of {len(stages)} stage(s): "
          + ", ".join(f"{n} ({'encode' if pipeline.stages[n].encode is not None else s.model.family})"
                      for n, s in stages.items()) + ")")
    return 0


def show(args) -> int:
    from raygen.spec import load_spec
    from raygen.spec.loader import spec_to_dict
    print(yaml.safe_dump(spec_to_dict(load_spec(args.file, args.set)), sort_keys=False), end="")
    return 0


def schema(args) -> int:
    from raygen.spec.json_schema import job_spec_json_schema
    print(json.dumps(job_spec_json_schema(), indent=2))
    return 0
