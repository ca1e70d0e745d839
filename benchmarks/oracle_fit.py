"""`oracle_synthetic.py --fit`: the seed's debias stage rerun on the oracle manifest, through the real CLI.

The config is the seed's resolved `debias/pipeline_config.yaml` with only the synthetic manifest (and
`synthetic_control: none`: the oracle images are the point) and the output folders changed; the commands
are the pipeline's `fit_test` ones (fit, resumed from `last.ckpt`; test the selected checkpoint; test the last
epoch into `last_epoch/`), each a `python -m diffinject` subprocess whose output goes to `pipeline.log`.
A finished fit with the same config, oracle manifest (sha256), trainer file and seed is not run again; a
folder left by another one is cleared first.
"""

from __future__ import annotations

import copy
import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

from diffinject.data.sections import source_data_section
from diffinject.workflow.configs import relocate

RECORD = ".oracle_fit.json"
METRICS = {"overall": "test/acc", "aligned": "test/acc_aligned", "conflicting": "test/acc_conflicting"}


def oracle_config(config: dict[str, Any], manifest: Path, folder: Path) -> dict[str, Any]:
    """The debias config training on `manifest`, writing its checkpoints, logs and metrics to `folder`."""
    config = copy.deepcopy(config)
    trainer = config.setdefault("trainer", {})
    old = str(trainer.get("default_root_dir") or "")
    if old:  # e.g. callbacks' dirpaths under the stage folder
        new = str(folder)
        config = relocate(config, lambda s: new + s[len(old) :] if s == old or s.startswith(old + "/") else s)
        trainer = config["trainer"]
    trainer["default_root_dir"] = str(folder)
    logger = trainer.get("logger")
    if isinstance(logger, dict) and isinstance(logger.get("init_args"), dict):
        logger["init_args"].update(save_dir=str(folder.parent), name=folder.name)
    init = source_data_section(config).setdefault("init_args", {})
    init.update(synthetic_manifest=str(manifest), synthetic_control="none")
    return config


def commands(folder: Path, trainer: Path, seed: int) -> list[list[str]]:
    """The pipeline's fit/test commands for a stage folder holding `pipeline_config.yaml`."""
    common = ["--config", str(folder / "pipeline_config.yaml"), "--trainer", str(trainer)]
    common += ["--seed_everything", str(seed)]
    last = folder / "checkpoints" / "last.ckpt"
    resume = ["--ckpt_path", str(last)] if last.is_file() else []
    place = ["--trainer.default_root_dir", str(folder / "last_epoch")]
    place += ["--trainer.logger.init_args.save_dir", str(folder)]
    place += ["--trainer.logger.init_args.name", "last_epoch"]
    return [
        ["fit", *common, *resume],
        ["test", *common, "--ckpt_path", str(folder / "checkpoints" / "best.ckpt")],
        ["test", *common, *place, "--ckpt_path", str(last)],
    ]


def run_command(command: list[str], log: Path) -> None:
    """`python -m diffinject COMMAND`, output appended to `log`; a failure raises with the log's tail."""
    with log.open("a") as handle:
        handle.write(f"$ diffinject {' '.join(command)}\n")
        handle.flush()
        code = subprocess.call([sys.executable, "-m", "diffinject", *command], stdout=handle, stderr=handle)
    if code != 0:
        tail = "\n".join(log.read_text(errors="replace").splitlines()[-20:])
        raise RuntimeError(f"`diffinject {command[0]}` exited with {code}; end of {log}:\n{tail}")


def accuracies(path: Path) -> dict[str, Any] | None:
    """Overall / aligned / conflicting test accuracy and the tested epoch from a stage's metrics.json."""
    if not path.is_file():
        return None
    metrics = json.loads(path.read_text())
    test = metrics.get("test") or {}
    return {
        **{name: test.get(key) for name, key in METRICS.items()},
        "epoch": metrics.get("checkpoint_epoch"),
    }


def stage_accuracies(folder: Path) -> dict[str, Any]:
    """The selected checkpoint's and the last epoch's test accuracies of a classifier stage folder."""
    return {
        "selected": accuracies(folder / "metrics.json"),
        "last_epoch": accuracies(folder / "last_epoch" / "metrics.json"),
    }


def fit_oracle(
    config: dict[str, Any], manifest: Path, folder: Path, trainer: Path, seed: int
) -> dict[str, Any]:
    """Train and test on the oracle set (skipped when done for the same inputs); its accuracies."""
    text = yaml.safe_dump(oracle_config(config, manifest, folder), sort_keys=False)
    parts = [text, hashlib.sha256(manifest.read_bytes()).hexdigest(), trainer.read_text(), str(seed)]
    key = hashlib.sha256("\n".join(parts).encode()).hexdigest()
    record = folder / RECORD
    previous = json.loads(record.read_text()) if record.is_file() else {}
    outputs = (folder / "metrics.json", folder / "last_epoch" / "metrics.json")
    if previous.get("key") == key and previous.get("done") and all(p.is_file() for p in outputs):
        return {**stage_accuracies(folder), "skipped": True}
    if folder.exists() and previous.get("key") != key:
        shutil.rmtree(folder)  # another config's or manifest's outputs: never resumed into
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "pipeline_config.yaml").write_text(text)
    record.write_text(json.dumps({"key": key, "done": False}) + "\n")
    for command in commands(folder, trainer, seed):
        run_command(command, folder / "pipeline.log")
    record.write_text(json.dumps({"key": key, "done": True}) + "\n")
    return {**stage_accuracies(folder), "skipped": False}
