"""One error type for everything a user can get wrong in a spec."""
from __future__ import annotations


class SpecError(ValueError):
    """A spec problem, one line per offending key: `path: message (got value)`."""

    def __init__(self, problems: list[str], source: str | None = None):
        self.problems = problems
        self.source = source
        where = f"{source}: " if source else ""
        super().__init__(where + "; ".join(problems) if len(problems) == 1
                         else where + "invalid spec:\n  " + "\n  ".join(problems))


def format_pydantic_errors(err, prefix: tuple = ()) -> list[str]:
    """Turn a pydantic ValidationError into `a.b.c: message (got X)` lines."""
    lines = []
    for e in err.errors():
        loc = [str(p) for p in (*prefix, *e["loc"])]
        path = ".".join(loc) or "<root>"
        kind = e["type"]
        nested = (e.get("ctx") or {}).get("error")
        if isinstance(nested, SpecError):
            # a sub-config validated inside a validator: keep its own key paths
            lines += [(path + "." if path != "<root>" else "") + p for p in nested.problems]
            continue
        value = e.get("input")
        if kind == "extra_forbidden":
            msg = f"unknown key '{loc[-1]}'; remove it or check the spelling"
        elif kind == "missing":
            msg = "required key is missing"
        else:
            msg = e["msg"]
            if msg.startswith("Value error, "):
                msg = msg[len("Value error, "):]
        shown = "" if kind in ("extra_forbidden", "missing") or isinstance(value, dict) else f" (got {value!r})"
        lines.append(f"{path}: {msg}{shown}")
    return lines
