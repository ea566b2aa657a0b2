"""Serving rules that need no server: request resolution, PNG encoding, app args,
serve-spec overrides, the example Serve config and the CLI's flags."""
from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from raygen.serving.app import AppArgs, _scorer_available, resolve_serve_spec
from raygen.serving.images import grid, png_bytes, to_uint8
from raygen.serving.loading import parse_model_arg
from raygen.serving.requests import RequestError, resolve
from raygen.serving.schema import GenerateRequest
from raygen.spec import SpecError, ServeSpec

REPO = Path(__file__).resolve().parents[1]


def _info(name, conditioning, num_classes=0, class_names=(), options=None):
    return {"name": name, "conditioning": conditioning,
            "data": {"resolution": 8, "channels": 1, "num_classes": num_classes, "class_names": list(class_names),
                     "has_captions": conditioning == "caption"},
            "sampling_options": options if options is not None else
            {"temperature": {"type": "float", "default": 1.0, "help": ""},
             "top_k": {"type": "int", "default": 0, "help": ""},
             "use_cache": {"type": "bool", "default": True, "help": ""}}}


INFOS = {"cls": _info("cls", "label", 3, ["cat", "dog", "Bird"]),
         "plain": _info("plain", "none"),
         "text": _info("text", "caption", options={})}


def plan(body: dict, reranking: str = "ready", max_n: int = 8):
    return resolve(GenerateRequest.model_validate(body), INFOS, default_model="cls", max_n=max_n,
                   reranking=reranking, rng_seed=123)


def rejected(body: dict, reranking: str = "ready") -> RequestError:
    with pytest.raises(RequestError) as info:
        plan(body, reranking)
    return info.value


def test_defaults_and_options():
    p = plan({"temperature": 1, "top_k": 5})
    assert (p.model, p.job.n, p.keep, p.job.seed, p.job.label, p.format) == ("cls", 1, 1, 123, None, "base64")
    assert p.job.options == {"temperature": 1.0, "top_k": 5} and isinstance(p.job.options["temperature"], float)


def test_label_by_index_or_name():
    assert plan({"label": 1}).job.label == 1
    assert plan({"label": "dog"}).job.label == 1
    assert plan({"label": "bird"}).job.label == 2  # names match without regard to case


def test_prompt_is_the_caption_of_a_text_model():
    assert plan({"model": "text", "prompt": "a red circle"}).job.caption == "a red circle"
    assert plan({"model": "text", "caption": "x", "prompt": "y"}).job.caption == "x"


@pytest.mark.parametrize("body, field, status", [
    ({"n": 9}, "n", 422),
    ({"label": 3}, "label", 422),
    ({"label": -1}, "label", 422),
    ({"label": "horse"}, "label", 422),
    ({"model": "plain", "label": 0}, "label", 422),
    ({"model": "text", "label": 0}, "label", 422),
    ({"caption": "a cat"}, "caption", 422),
    ({"model": "plain", "prompt": "a cat"}, "prompt", 422),
    ({"model": "nope"}, "model", 404),
    ({"temperature": "hot"}, "temperature", 422),
    ({"top_k": 1.5}, "top_k", 422),
    ({"use_cache": 1}, "use_cache", 422),
    ({"top_k": True}, "top_k", 422),
    ({"steps": 4}, "steps", 422),
    ({"model": "text", "temperature": 1.0}, "temperature", 422),
    ({"k": 2}, "k", 422),
    ({"best_of": 9, "prompt": "x"}, "best_of", 422),
    ({"best_of": 2, "k": 3, "prompt": "x"}, "k", 422),
    ({"best_of": 4, "n": 2, "k": 3, "prompt": "x"}, "k", 422),
    ({"model": "plain", "best_of": 4}, "prompt", 422),
])
def test_rejections_name_the_field(body, field, status):
    err = rejected(body)
    assert (err.field, err.status) == (field, status), err.message


def test_best_of_needs_a_working_scorer():
    assert (rejected({"best_of": 4, "prompt": "x"}, "off").status, rejected({"best_of": 4}, "off").field) == (400, "best_of")
    assert rejected({"best_of": 4, "prompt": "x"}, "unavailable").status == 501


def test_best_of_plan():
    p = plan({"best_of": 6, "k": 2, "prompt": "a cat", "seed": 4})
    assert (p.job.n, p.keep, p.rerank_text, p.job.seed) == (6, 2, "a cat", 4)
    # a class name is the text to score against when no prompt is given
    assert plan({"best_of": 3, "label": "dog"}).rerank_text == "dog"
    # on a model without captions the prompt is only the reranking text, never a condition
    p = plan({"model": "plain", "best_of": 3, "n": 2, "prompt": "bright"})
    assert (p.job.caption, p.keep, p.rerank_text) == (None, 2, "bright")


def test_schema_is_strict_about_types():
    from pydantic import ValidationError
    for body in ({"n": "2"}, {"n": 2.0}, {"seed": -1}, {"format": "gif"}, {"label": 1.5}, {"n": True}):
        with pytest.raises(ValidationError):
            GenerateRequest.model_validate(body)


def test_png_and_grid():
    images = np.random.default_rng(0).random((5, 3, 8, 8)).astype(np.float32)
    u8 = to_uint8(images)
    assert u8.shape == (5, 8, 8, 3) and u8.dtype == np.uint8
    decoded = np.asarray(Image.open(io.BytesIO(png_bytes(u8[0]))))
    assert np.array_equal(decoded, u8[0])
    g = grid(u8, pad=2)
    assert g.shape == (2 * 8 + 3 * 2, 3 * 8 + 4 * 2, 3)  # 5 images: 3 columns, 2 rows
    gray = Image.open(io.BytesIO(png_bytes(to_uint8(images[:1, :1])[0])))
    assert gray.mode == "L" and gray.size == (8, 8)
    assert to_uint8(np.full((1, 1, 2, 2), np.nan))[0].max() == 0  # NaN is black, not noise


def test_model_args():
    assert parse_model_arg("best=runs/a/model") == ("best", "runs/a/model")
    assert parse_model_arg("models:/toy/3") == (None, "models:/toy/3")
    assert parse_model_arg("/data/x=y/model") == (None, "/data/x=y/model")


def test_app_args_from_the_serve_run_command_line():
    # `serve run raygen.serving.app:build_app model=a imports=x.py,y serve=max_n=4,replicas=2` passes strings
    args = AppArgs.model_validate({"model": "a", "models": "b,c", "imports": "x.py,y",
                                   "serve": "max_n=4,replicas=2", "replica_cpus": "0.5"})
    assert args.models == ["a", "b", "c"] and args.imports == ["x.py", "y"]
    assert args.serve == {"max_n": 4, "replicas": 2} and args.replica_cpus == 0.5
    with pytest.raises(ValueError, match="at least one model"):
        AppArgs.model_validate({})
    with pytest.raises(ValueError):
        AppArgs.model_validate({"model": "a", "modle": "b"})


def test_serve_spec_overrides():
    base = ServeSpec(max_n=4)
    spec = resolve_serve_spec(base, ["serve.max_batch_size=2", "replicas=3"])
    assert (spec.max_n, spec.max_batch_size, spec.replicas) == (4, 2, 3)
    assert resolve_serve_spec(None, {"request_timeout_s": 5}).request_timeout_s == 5.0
    with pytest.raises(SpecError, match="serve.max_n"):
        resolve_serve_spec(base, ["serve.max_n=0"])
    with pytest.raises(SpecError, match="unknown key 'max_m'"):
        resolve_serve_spec(base, ["serve.max_m=3"])
    with pytest.raises(SpecError, match="only serve"):
        resolve_serve_spec(base, ["train.steps=3"])


def test_scorer_availability_is_checked_before_deploying():
    assert _scorer_available("raygen.metrics:load_scorer") is None
    assert "no_such_loader" in _scorer_available("raygen.metrics:no_such_loader")
    assert "MODULE:FUNCTION" in _scorer_available("raygen.metrics")


def test_example_serve_config_is_valid():
    from ray.serve.schema import ServeDeploySchema

    config = yaml.safe_load((REPO / "serving" / "config_example.yaml").read_text())
    schema = ServeDeploySchema.model_validate(config)
    assert schema.http_options.host == "127.0.0.1" and schema.http_options.request_timeout_s
    app = config["applications"][0]
    assert app["import_path"] == "raygen.serving.app:build_app"
    args = AppArgs.model_validate(app["args"])
    resolve_serve_spec(None, args.serve)  # the overrides in the example are valid serve settings


def test_cli_registers_serve():
    from raygen.jobs.cli import build_parser

    args = build_parser().parse_args(["serve", "--model", "a", "--model", "b=c", "--set", "serve.max_n=3",
                                      "--port", "8123", "--scorer", "hf:/clip", "--import", "fam.py"])
    assert (args.model, args.set, args.port, args.scorer, args.imports) == \
        (["a", "b=c"], ["serve.max_n=3"], 8123, "hf:/clip", ["fam.py"])
    assert args.host is None  # falls back to serve.host, 127.0.0.1
