"""Regenerate docs/spec.md from the spec models: python docs/gen_spec.py > docs/spec.md"""
from raygen.spec.schema import JobSpec
from pydantic import BaseModel
import typing

def rows(model, prefix):
    out = []
    for name, field in model.model_fields.items():
        ann = field.annotation
        path = f"{prefix}{name}"
        sub = None
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            sub = ann
        if sub is not None:
            out.append((path, "section", "", field.description or ""))
            out += rows(sub, path + ".")
            continue
        default = field.get_default(call_default_factory=True) if not field.is_required() else "(required)"
        t = str(ann).replace("typing.", "").replace("<class '", "").replace("'>", "")
        out.append((path, t, repr(default), field.description or ""))
    return out

print("# The job spec\n")
print("One YAML file describes a run. Every key below can be set in the file or")
print("overridden on the command line with `--set key.path=value`; unknown keys and")
print("bad values fail before anything starts, naming the key's path.")
print("`raygen spec schema` prints the JSON schema; `raygen spec show FILE` the")
print("resolved spec; `raygen spec validate FILE` makes every check `raygen train`")
print("and `raygen tune` make before they start (each trial of `tune.space` too).\n")
print("Model options (`model.options`) belong to the family named by")
print("`model.family`: see [models/seqimg.md](models/seqimg.md) and")
print("[metrics.md](metrics.md) (family `clip`).\n")
print("| key | type | default | meaning |\n| --- | --- | --- | --- |")
for path, t, d, desc in rows(JobSpec, ""):
    if t == "section":
        print(f"| **{path}** | section | | {desc} |")
    else:
        esc = lambda x: x.replace("|", "&#124;")
        print(f"| `{path}` | {esc(t)} | {esc(d)} | {esc(desc)} |")
