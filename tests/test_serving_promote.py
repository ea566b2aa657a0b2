"""`raygen promote` moves a registry alias only when the candidate's metric is better, records
why on the version, and a server given `models:/NAME@champion` loads the version it points at."""
from __future__ import annotations

import time
from pathlib import Path

import pytest
import torch

from raygen.exports import export_generator
from raygen.models import build_model, get_family
from raygen.spec import parse_spec


def _register(tmp_path: Path, uri: str, fids: list[float | None]) -> list[str]:
    """One logged, registered seqimg model per fid (a run each, with its fid metric)."""
    from raygen.tracking.models import log_and_register
    from raygen.tracking.store import open_run

    config, info = get_family("seqimg").debug()["lstm-label"][:2]
    spec = parse_spec({"name": "promo", "model": {"family": "seqimg", "options": config.model_dump(mode="json")}})
    uris = []
    for i, fid in enumerate(fids):
        torch.manual_seed(i)
        model = build_model("seqimg", config, info)
        export = export_generator(tmp_path / f"run{i}" / "export", model.state_dict(), spec, info,
                                  {"step": 1, "run_id": f"r{i}"})
        run = open_run(uri, "promo", f"promo-{i}", spec=spec)
        if fid is not None:
            run.log_metrics({"fid": fid}, step=1)
        uris.append(log_and_register(uri, run.run_id, export, "promo", step=1))
        run.finish()
    return uris


@pytest.fixture(scope="module")
def registry(tmp_path_factory) -> str:
    """A registry with versions 1..4 of 'promo', runs r0..r3, fids 20, 25, 12.5 and none."""
    tmp_path = tmp_path_factory.mktemp("registry")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    assert _register(tmp_path, uri, [20.0, 25.0, 12.5, None]) == [f"models:/promo/{v}" for v in (1, 2, 3, 4)]
    return uri


def test_promote_only_when_better_and_records_why(registry, capsys):
    from raygen.jobs.cli import main
    from raygen.jobs.cmd_promote import direction, promote
    from raygen.serving.app import load_plan
    from raygen.serving.loading import registry_info
    from raygen.tracking.store import client

    uri = registry
    c = client(uri)
    first = promote(uri, "promo", 1, if_better="fid")  # nobody holds champion yet
    assert first.promoted and first.previous is None
    worse = promote(uri, "promo", 2, if_better="fid")
    assert not worse.promoted and "25 ≥ 20" in worse.reason
    assert str(c.get_model_version_by_alias("promo", "champion").version) == "1"
    tags = c.get_model_version("promo", "2").tags
    assert tags["raygen.promotion.result"] == "refused" and "lower is better" in tags["raygen.promotion.reason"]
    # the CLI: a better fid moves the alias (exit 0); a version without the metric is refused in one line
    assert main(["promote", "promo", "3", "--if-better", "fid", "--tracking-uri", uri]) == 0
    assert "promoted: fid 12.5 < 20" in capsys.readouterr().out
    assert str(c.get_model_version_by_alias("promo", "champion").version) == "3"
    assert c.get_model_version("promo", "3").tags["raygen.promotion.previous"] == "1"
    assert main(["promote", "promo", "4", "--if-better", "fid", "--tracking-uri", uri]) == 2
    assert "no recorded 'fid'" in capsys.readouterr().err
    assert main(["promote", "promo", "9", "--tracking-uri", uri]) == 2
    assert (direction("fid"), direction("eval_val_loss"), direction("clip_score"), direction("fid", "max")) == \
        ("min", "min", "max", "max")
    # a server following the alias loads the version it points at and says which
    assert registry_info("models:/promo@champion", uri) == {"name": "promo", "version": 3, "alias": "champion"}
    assert registry_info("models:/promo/2", uri) == {"name": "promo", "version": 2, "alias": None}
    assert registry_info("/some/folder", uri) is None
    plan = load_plan({"model": "models:/promo@champion", "tracking_uri": uri})
    assert plan.models[0].card["run_id"] == "r2"


def test_unknown_alias_is_one_line(registry):
    from raygen.exports import ModelLoadError
    from raygen.serving.app import load_plan

    with pytest.raises((ModelLoadError, ValueError)) as info:
        load_plan({"model": "models:/promo@nobody", "tracking_uri": registry})
    assert "\n" not in str(info.value).strip()


@pytest.mark.slow
def test_a_server_following_the_alias_swaps_without_dropping_requests(registry):
    """A stream of requests while the alias moves: no failure, and run_id switches over once."""
    import httpx

    from raygen.jobs.cmd_promote import promote
    from raygen.serving.local import LocalServer, build_local

    promote(registry, "promo", 3)
    app = build_local({"model": "models:/promo@champion", "tracking_uri": registry, "alias_poll_s": 0.2})
    seen, failures = [], []
    try:
        with LocalServer(app.api) as server, httpx.Client(base_url=server.url, timeout=30) as http:
            def one(i):
                r = http.post("/v1/generate", json={"seed": i, "label": i % 3})
                if r.status_code != 200:
                    failures.append((r.status_code, r.text))
                else:
                    seen.append(r.json()["run_id"])

            for i in range(5):
                one(i)
            promote(registry, "promo", 1)
            deadline = time.monotonic() + 60
            i = 5
            while (not seen or seen[-1] != "r0") and time.monotonic() < deadline:
                one(i)
                i += 1
            for j in range(5):
                one(i + j)
            models = http.get("/v1/models").json()["models"]
    finally:
        app.close()
    assert failures == []
    switch = seen.index("r0")
    assert set(seen[:switch]) == {"r2"} and set(seen[switch:]) == {"r0"}, seen
    assert app.slots["promo"].swaps == 1
    assert models[0]["registry"] == {"name": "promo", "version": 1, "alias": "champion"}
