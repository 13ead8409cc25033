"""Command-line round trips on tiny models, JSON outputs against schemas, exit codes, plots."""

from __future__ import annotations

import json
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import jsonschema
import pytest
import torch

from initopt.cli import main

TINY = ["--model", "mlp", "--model-arg", "depth=2", "--model-arg", "width=8", "--batch-size", "32", "--quiet"]

RESULT_SCHEMA = {
    "type": "object",
    "required": ["method", "config", "scales", "history", "seconds", "stages", "unscalable", "before", "after"],
    "properties": {
        "method": {"type": "string"},
        "config": {"type": ["object", "array"]},
        "scales": {"type": "object", "additionalProperties": {"type": "number"}},
        "history": {"type": "array", "items": {"type": "object"}},
        "seconds": {"type": "number", "minimum": 0},
        "stages": {"type": "array"},
        "unscalable": {"type": "array", "items": {"type": "string"}},
        "before": {"type": "object"},
        "after": {"type": "object"},
    },
}

STAT = {"anyOf": [{"type": "null"}, {"type": "array", "items": {"type": "number"}, "minItems": 2, "maxItems": 2}]}
COMPARE_SCHEMA = {
    "type": "object",
    "required": ["config", "summary", "runs"],
    "properties": {
        "config": {"type": "object", "required": ["inits", "seeds", "steps", "batch_size", "optimizer", "lr"]},
        "summary": {
            "type": "array",
            "items": {
                "type": "object",
                "required": [
                    "init",
                    "seeds",
                    "diverged",
                    "epoch1_test_loss",
                    "final_test_loss",
                    "final_test_acc",
                    "init_seconds",
                ],
                "properties": {"final_test_loss": STAT, "final_test_acc": STAT, "init_seconds": STAT},
            },
        },
        "runs": {
            "type": "array",
            "items": {
                "type": "object",
                "required": ["init", "seed", "train_loss", "final_test_loss", "final_test_acc", "diverged"],
                "properties": {"train_loss": {"type": "array", "items": {"type": "number"}}},
            },
        },
    },
}


def check_png(path: Path) -> None:
    """A valid PNG (signature, IHDR, CRCs) whose pixels are not all one colour."""
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, idat = 8, b""
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos : pos + 4])
        kind, body = data[pos + 4 : pos + 8], data[pos + 8 : pos + 8 + length]
        (crc,) = struct.unpack(">I", data[pos + 8 + length : pos + 12 + length])
        assert zlib.crc32(kind + body) == crc
        if kind == b"IHDR":
            width, height = struct.unpack(">II", body[:8])
            assert width > 100 and height > 100
        if kind == b"IDAT":
            idat += body
        pos += 12 + length
    raw = zlib.decompress(idat)
    assert len(set(raw[1000:200000])) > 10  # more than a blank canvas


def test_list_shows_every_method_and_its_fields(capsys):
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    import initopt

    for name in initopt.methods():
        assert f"{name}:" in out
    assert "--eta" in out and "0.1" in out


def test_init_round_trip_writes_weights_json_and_plots(tmp_path):
    out = tmp_path / "run"
    rc = main(["init", "--method", "gradinit", *TINY, "--steps", "3", "--eta", "0.2", "--out-dir", str(out), "--plot"])
    assert rc == 0
    res = json.loads((out / "result.json").read_text())
    jsonschema.validate(res, RESULT_SCHEMA)
    assert res["config"]["eta"] == 0.2 and len(res["history"]) == 3
    sd = torch.load(out / "weights.pt", weights_only=True)
    assert set(sd) >= {k for k in res["scales"]}
    check_png(out / "scales.png")
    check_png(out / "history.png")


def test_init_safetensors_and_config_file(tmp_path):
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text("eta: 0.3\nlr: 0.02\n")
    out = tmp_path / "run"
    rc = main(
        [
            "init",
            *TINY,
            "--steps",
            "2",
            "--config",
            str(cfg),
            "--lr",
            "0.05",
            "--out-dir",
            str(out),
            "--weights",
            "w.safetensors",
        ]
    )
    assert rc == 0
    res = json.loads((out / "result.json").read_text())
    assert res["config"]["eta"] == 0.3 and res["config"]["lr"] == 0.05  # flags override the file
    from safetensors.torch import load_file

    assert load_file(str(out / "w.safetensors"))


def test_model_from_a_file(tmp_path):
    f = tmp_path / "mymodel.py"
    f.write_text(
        "import torch\ndef make():\n    return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 10))\n"
    )
    rc = main(["init", "--model", f"{f}:make", "--steps", "2", "--quiet", "--out-dir", str(tmp_path / "o")])
    assert rc == 0


def test_compare_round_trip(tmp_path, capsys):
    out = tmp_path / "cmp"
    rc = main(
        [
            "compare",
            *TINY,
            "--inits",
            "default",
            "gradinit:steps=2,lr=0.1",
            "--seeds",
            "0",
            "1",
            "--train-steps",
            "30",
            "--out-dir",
            str(out),
        ]
    )
    assert rc == 0
    report = json.loads((out / "compare.json").read_text())
    jsonschema.validate(report, COMPARE_SCHEMA)
    assert [r["init"] for r in report["summary"]] == ["default", "gradinit:steps=2,lr=0.1"]
    assert all(len(r["train_loss"]) == 30 for r in report["runs"])
    assert (out / "curves.csv").read_text().count("\n") == 1 + 4 * 30
    check_png(out / "curves.png")
    assert "| default |" in capsys.readouterr().out


@pytest.mark.parametrize(
    "argv,words",
    [
        (["bogus"], "invalid choice"),
        (["init", "--method", "nope"], "unknown method"),
        (["init", "--eta", "abc"], "invalid"),
        (["init", *TINY, "--set-nothing"], "unrecognized"),
        (["init", *TINY, "--model-arg", "depth"], "KEY=VALUE"),
        (["init", "--model", "no_such_model"], "unknown model"),
        (["init", "--model", "nowhere.py:f"], "not found"),
        (["compare", "--inits", "nope"], "unknown method"),
        (["init", *TINY, "--steps", "2", "--eta", "-1"], "eta"),
        (["compare", "--data", "cifar10"], "--data-root"),
    ],
)
def test_bad_arguments_exit_2_with_a_message(argv, words, capsys):
    try:
        rc = main(argv)
    except SystemExit as e:
        rc = e.code
    assert rc == 2
    assert words in capsys.readouterr().err


def test_run_failure_exits_1(tmp_path, capsys):
    rc = main(["init", *TINY, "--steps", "2", "--data", "cifar10", "--data-root", str(tmp_path)])
    assert rc == 1
    assert "no CIFAR-10 data" in capsys.readouterr().err


def test_python_dash_m_and_console_script(tmp_path):
    r = subprocess.run([sys.executable, "-m", "initopt", "list"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "gradinit:" in r.stdout
    r = subprocess.run(
        [sys.executable, "-m", "initopt", "init", "--bad-flag"], capture_output=True, text=True, timeout=120
    )
    assert r.returncode == 2 and "unrecognized arguments" in r.stderr
    exe = Path(sys.executable).with_name("initopt")
    if exe.exists():
        r = subprocess.run([str(exe), "--version"], capture_output=True, text=True, timeout=120)
        assert r.returncode == 0 and "initopt" in r.stdout


def test_demo_small_version(tmp_path, capsys):
    rc = main(
        [
            "demo",
            "--seeds",
            "0",
            "1",
            "--train-steps",
            "5",
            "--init-steps",
            "2",
            "--quiet",
            "--no-plot",
            "--out-dir",
            str(tmp_path),
        ]
    )
    assert rc == 0
    out = capsys.readouterr().out
    assert "method auto:" in out and "choice:" in out and "training steps" in out
    for init in ("default", "kaiming", "lsuv", "hessian", "gradinit", "nio", "auto"):
        assert f"| {init} |" in out
    assert "auto vs default:" in out and "auto vs kaiming:" in out
    assert "starting point decides" in out
    saved = json.loads((tmp_path / "compare.json").read_text())
    assert saved["summary"] and [v["b"] for v in saved["config"]["verdicts"]] == ["default", "kaiming"]
    assert saved["config"]["pass_optimizer"] == ["auto"]


REPORT_SCHEMA = {
    "type": "object",
    "required": ["layers", "model", "notes"],
    "properties": {
        "layers": {
            "type": "array",
            "minItems": 1,
            "items": {
                "type": "object",
                "required": [
                    "layer",
                    "type",
                    "param_norm",
                    "grad_norm",
                    "grad_to_weight",
                    "act_mean",
                    "act_std",
                    "hessian_spectral",
                    "hessian_frobenius",
                ],
            },
        },
        "model": {
            "type": "object",
            "required": [
                "loss",
                "grad_cosine_batch",
                "grad_cosine_sample",
                "gradient_quotient",
                "hessian_top_eigenvalue",
                "hessian_trace",
            ],
        },
    },
}


def test_diagnose_round_trip(tmp_path, capsys):
    out = tmp_path / "report.json"
    rc = main(["diagnose", *TINY, "--probes", "4", "--json", str(out)])
    assert rc == 0
    report = json.loads(out.read_text())
    jsonschema.validate(report, REPORT_SCHEMA)
    assert len(report["layers"]) == 3 and report["model"]["gradient_quotient"] is not None
    assert "| layer |" in capsys.readouterr().out


def test_cifar10_compare_command_on_a_stand_in(tmp_path):
    """The documented CIFAR-10 command (docs/cli.md), on a stand-in folder in torchvision's layout."""
    from test_data import _fake_cifar

    _fake_cifar(tmp_path)
    out = tmp_path / "cmp"
    rc = main(
        [
            "compare",
            "--data", "cifar10", "--data-root", str(tmp_path), "--model", "cnn", "--batch-size", "8",
            "--inits", "default", "kaiming", "hessian", "kaiming+gradinit:steps=2", "hessian+gradinit:steps=2",
            "--seeds", "0", "1", "--train-steps", "3", "--lr", "0.01", "--out-dir", str(out), "--no-plot", "--quiet",
        ]
    )  # fmt: skip
    assert rc == 0
    d = json.loads((out / "compare.json").read_text())
    assert [r["init"] for r in d["summary"]] == [
        "default", "kaiming", "hessian", "kaiming+gradinit:steps=2", "hessian+gradinit:steps=2"
    ]  # fmt: skip
    assert all(r["seeds"] == 2 for r in d["summary"])


def test_init_auto_with_the_training_optimizer(tmp_path, capsys):
    out = tmp_path / "run"
    argv = ["init", "--method", "auto", *TINY, "--steps", "2", "--trial-steps", "2", "--starts", '["model","kaiming"]']
    rc = main([*argv, "--optimizer", "adamw:lr=1e-3,betas=[0.9,0.98]", "--out-dir", str(out)])
    assert rc == 0
    res = json.loads((out / "result.json").read_text())
    assert res["info"]["optimizer"]["optimizer"] == "AdamW" and res["info"]["optimizer"]["groups"][0]["betas"] == [
        0.9,
        0.98,
    ]
    assert res["info"]["choice"] in {c["name"] for c in res["info"]["candidates"]}
    capsys.readouterr()
    assert main([*argv, "--optimizer", "adamm", "--out-dir", str(out)]) == 2
    assert "unknown optimizer 'adamm'" in capsys.readouterr().err
