"""harness/noise.py (``prunebench noise``): the seed and setting runs it launches, and the
spread table it states from result folders."""

from __future__ import annotations

import subprocess

import pytest

from prunebench.harness.cli import main
from prunebench.harness.errors import UsageError
from prunebench.harness.noise import SETTINGS, folder_name, measure, table
from prunebench.harness.results import write_result
from prunebench.harness.session import RunSession
from prunebench.harness.spec import RunSpec
from prunebench.harness.testing import fake_result


def _result(ppl: float, seed: int = 0) -> dict:
    spec = RunSpec(method="wanda-sp", sparsity=0.3, seed=seed, profile="ci", zeroshot=False, timing=False)
    return fake_result(spec, ppl)


def test_the_table_states_values_and_spreads_over_seeds_and_over_settings():
    groups = {"seeds": [_result(100.0, 0), _result(110.0, 1), _result(105.0, 2)], "2 threads": [_result(104.0)]}
    text = table(groups)
    row = next(line for line in text.splitlines() if "wanda-sp" in line)
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[3:7] == ["100.00", "110.00", "105.00", "104.00"]
    assert cells[7] == "10.0%"  # over the seeds: 110 / 100 - 1
    assert cells[8] == "4.0%"  # over the settings at seed 0: 104 / 100 - 1


def test_measure_runs_every_seed_here_and_every_setting_with_its_own_env_and_cache(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(subprocess, "run", lambda argv, env, check: calls.append((argv, env)))
    measure(["--method", "flap", "--sparsity", "0.3"], [0, 1], ["2 threads", "scalar kernels"], tmp_path)
    folders = [argv[argv.index("--results") + 1] for argv, _ in calls]
    assert folders == [str(tmp_path / "seeds")] * 2 + [str(tmp_path / folder_name(s)) for s in ("2 threads", "scalar kernels")]
    assert [argv[argv.index("--seed") + 1] for argv, _ in calls] == ["0", "1", "0", "0"]
    scalar_env = calls[3][1]
    assert scalar_env["ATEN_CPU_CAPABILITY"] == SETTINGS["scalar kernels"]["ATEN_CPU_CAPABILITY"]
    assert scalar_env["PRUNEBENCH_CACHE"] != calls[2][1]["PRUNEBENCH_CACHE"]  # no cached statistic hides a setting
    with pytest.raises(UsageError, match="valid"):
        measure([], [0], ["nope"], tmp_path)


def test_the_command_tabulates_existing_folders(tmp_path, capsys):
    for label, ppls in (("seeds", (100.0, 120.0)), ("threads", (101.0,))):
        for seed, ppl in enumerate(ppls):
            r = _result(ppl, seed)
            write_result(RunSession(RunSpec(method="wanda-sp", sparsity=0.3, seed=seed, profile="ci", zeroshot=False,
                                            timing=False)).result_path(tmp_path / label), r)
    assert main(["noise", "--table", f"seeds={tmp_path / 'seeds'}", "--table", f"2 threads={tmp_path / 'threads'}"]) == 0
    out = capsys.readouterr().out
    assert "20.0%" in out and "1.0%" in out
    assert main(["noise"]) == 2  # neither runs to make nor folders to read
