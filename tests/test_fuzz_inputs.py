"""Fuzz: random malformed copies of examples/tiny-moe against every command's validation.

Each mutant changes config.json (a field's type or value, a deleted or added field) or the
safetensors header (a tensor's dtype, shape or offsets, a dropped or renamed entry, the length
prefix, the file's length), with a fixed seed. Every command runs in-process (typer's CliRunner) with
its heavy library call replaced by a stub, so what runs is exactly the validation a command does
before it computes. The contract, for every mutant and command:

* exit code 1 or 2 (0 for a harmless mutant: inspect's report, or a command reaching its stub);
* an error is one line on stderr, never a traceback or an "internal error";
* nothing appears at the output path, and the input is unchanged.
"""

from __future__ import annotations

import json
import os
import random
import struct
from pathlib import Path
from typing import Any

import pytest
import typer.testing
from typer.main import get_command
from typer.testing import CliRunner

from moetool.cli import app
from moetool.errors import MoetoolError
from tests.malformed import SHARD, TINY_MOE, read_raw_header, snapshot, write_raw_header

SEED = 20260412
CONFIG_MUTANTS = 45
HEADER_MUTANTS = 45


class Reached(MoetoolError):
    """Raised by the stubs: the command's validation let the input through."""

    default_code = "FUZZ_REACHED"


def _reached(*_args: Any, **_kwargs: Any) -> Any:
    raise Reached("validation passed; the stub stops here")


# ----------------------------------------------------------------------------- mutations

_VALUES: list[Any] = [
    0,
    -1,
    1,
    3,
    7,
    2**40,
    160.0,
    0.5,
    "8",
    "",
    True,
    False,
    None,
    [],
    [1, 2],
    {},
    {"a": 1},
]


def _random_value(rng: random.Random, old: Any) -> Any:
    if isinstance(old, int) and not isinstance(old, bool) and rng.random() < 0.4:
        return rng.choice([old + 1, old - 1, old * 2, old // 2, float(old), -old])
    return rng.choice(_VALUES)


def mutate_config(config: dict[str, Any], rng: random.Random) -> str:
    """Change one thing in the config, in place; returns a description."""
    keys = sorted(config)
    roll = rng.random()
    if roll < 0.12:
        key = rng.choice(keys)
        del config[key]
        return f"del {key}"
    if roll < 0.2:
        config[rng.choice(["model_type", "architectures"])] = rng.choice(["frobnicate", ["X"], 3, None])
        return "family"
    if roll < 0.25:
        config["auto_map"] = rng.choice([{"AutoModelForCausalLM": "m.M"}, "m.M", 1])
        return "auto_map"
    key = rng.choice(keys)
    config[key] = _random_value(rng, config[key])
    return f"{key}={config[key]!r}"


def mutate_header(path: Path, rng: random.Random) -> str:
    """Change one thing in a safetensors file, in place; returns a description."""
    header, data = read_raw_header(path)
    names = [n for n in header if n != "__metadata__"]
    name = rng.choice(names)
    entry = header[name]
    roll = rng.random()
    if roll < 0.08:
        raw = path.read_bytes()
        cut = rng.choice([1, 2, 1000, len(data)])
        path.write_bytes(raw[:-cut])
        return f"truncate {cut}"
    if roll < 0.12:
        raw = path.read_bytes()
        path.write_bytes(struct.pack("<Q", rng.choice([0, 7, 2**40, len(raw)])) + raw[8:])
        return "length prefix"
    if roll < 0.2:
        del header[name]
        description = f"drop {name}"
    elif roll < 0.28:
        header[name + rng.choice(["x", ".bias", "_blocks"])] = header.pop(name)
        description = f"rename {name}"
    elif roll < 0.45:
        entry["dtype"] = rng.choice(["F16", "BF16", "F64", "I32", "U8", "F8_E4M3", "Q9", 5, None])
        description = f"dtype {name}"
    elif roll < 0.7:
        shape = list(entry["shape"])
        choice = rng.random()
        if choice < 0.3 and len(shape) > 1:
            shape.reverse()
        elif choice < 0.5:
            shape = [*shape, 1]
        elif choice < 0.6:
            shape = []
        elif choice < 0.7:
            shape = [2**62, 2**62]
        elif choice < 0.8:
            shape = ["8", 1]
        else:
            index = rng.randrange(len(shape)) if shape else 0
            shape = shape or [1]
            shape[index] = max(0, shape[index] + rng.choice([-1, 1]))
        entry["shape"] = shape
        description = f"shape {name} {shape}"
    elif roll < 0.9:
        start, end = entry["data_offsets"]
        entry["data_offsets"] = rng.choice([[end, start], [start + 4, end + 4], [start, end * 2], [-1, end], [start]])
        description = f"offsets {name}"
    else:
        header["__metadata__"] = rng.choice([{"format": 1}, [], "pt", {"format": "pt", "x": "y"}])
        description = "metadata"
    write_raw_header(path, header, data)
    return description


def _mutants() -> list[tuple[str, int]]:
    return [("config", i) for i in range(CONFIG_MUTANTS)] + [("header", i) for i in range(HEADER_MUTANTS)]


def _build(kind: str, index: int, folder: Path) -> str:
    rng = random.Random(f"{SEED}-{kind}-{index}")
    folder.mkdir()
    for item in TINY_MOE.iterdir():
        if kind == "config" and item.name == SHARD:
            os.link(item, folder / item.name)  # unchanged: a hard link saves copying 20 MB
        else:
            (folder / item.name).write_bytes(item.read_bytes())
    if kind == "config":
        path = folder / "config.json"
        config = json.loads(path.read_text())
        description = mutate_config(config, rng)
        path.write_text(json.dumps(config))
        return description
    return mutate_header(folder / SHARD, rng)


# ----------------------------------------------------------------------------- the commands

COMMANDS = {
    "inspect": ["inspect", "{m}"],
    "inspect-json": ["inspect", "{m}", "--json", "--strict"],
    "merge": ["merge", "{m}", "-o", "{o}", "-n", "4", "-d", "{d}"],
    "quantize": ["quantize", "{m}", "-o", "{o}", "--method", "rtn"],
    "upcycle": ["upcycle", "{m}", "-o", "{o}", "--num-experts", "4", "--top-k", "2"],
    "distill": ["distill", "{m}", "-o", "{o}", "-d", "{d}"],
    "profile-routing": ["profile-routing", "{m}", "-d", "{d}", "--out", "{o}"],
    "eval": ["eval", "{m}", "-d", "{d}"],
}


@pytest.fixture
def stubbed(monkeypatch: pytest.MonkeyPatch) -> None:
    """Replace each command's heavy step (the first one after its validation) by :func:`_reached`."""
    import moetool.merge.api
    import moetool.modeling
    import moetool.quantize
    import moetool.upcycle.api

    monkeypatch.setattr(moetool.merge.api, "merge", _reached)
    monkeypatch.setattr(moetool.quantize, "quantize", _reached)
    # upcycle and distill validate inside the library: stub the step after (distill's is open_checkpoint).
    monkeypatch.setattr(moetool.upcycle.api, "_open_source", _reached)
    monkeypatch.setattr(moetool.modeling, "load_model", _reached)
    monkeypatch.setattr(moetool.modeling, "open_checkpoint", _reached)
    # typer's CliRunner rebuilds the click command from the app on every call, most of its time here.
    command = get_command(app)
    monkeypatch.setattr(typer.testing, "_get_command", lambda _app: command)


def _check(result: Any, command: str, label: str, out: Path) -> None:
    err = result.stderr
    where = f"{label} / {command}: rc={result.exit_code}\n{err}\n{result.stdout[-2000:]}"
    assert result.exit_code in (0, 1, 2), where
    assert "Traceback" not in err and "internal error" not in err, where
    assert not isinstance(result.exception, BaseException) or isinstance(result.exception, SystemExit), where
    if result.exit_code == 0:
        assert command.startswith("inspect"), where  # a command's stub exits 1
    else:
        lines = [line for line in err.splitlines() if line.startswith("error:")]
        assert len(lines) == 1, where
        assert err.strip().splitlines()[-1].startswith("error:"), where
    if command == "inspect-json":
        json.loads(result.stdout)  # one valid document, report or error
    assert not out.exists(), where
    leftovers = [p.name for p in out.parent.iterdir() if p.name.startswith(".moetool-")]
    assert not leftovers, where


def test_fuzz_every_command_refuses_cleanly(tmp_path: Path, stubbed: None) -> None:
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps({"text": f"document {i} " * 20}) + "\n" for i in range(4)))
    runner = CliRunner()
    refused = 0
    for kind, index in _mutants():
        folder = tmp_path / f"{kind}-{index}"
        description = _build(kind, index, folder)
        before = snapshot(folder)
        outs = tmp_path / "outs"
        outs.mkdir()
        for command, template in COMMANDS.items():
            out = outs / command
            args = [a.format(m=folder, o=out, d=data) for a in template]
            result = runner.invoke(app, args, env={"NO_COLOR": "1", "COLUMNS": "100", "HF_HUB_OFFLINE": "1"})
            _check(result, command, f"{kind} #{index} ({description})", out)
            refused += result.exit_code != 0 and "validation passed" not in result.stderr
        assert snapshot(folder) == before, f"{kind} #{index} ({description}) changed the input"
        # Free the disk as we go (header mutants are 20 MB each).
        for path in sorted(folder.iterdir()):
            path.unlink()
        folder.rmdir()
        outs.rmdir()
    # The mutations are not all harmless: most of them must be refused by validation.
    assert refused > len(COMMANDS) * (CONFIG_MUTANTS + HEADER_MUTANTS) // 3
