"""Checks before any stage starts: the dataset is where the configs say, and every input a planned stage
reads from a stage that is not planned (or from outside the run) exists.

Each problem becomes one `CannotStart` message naming the path, the layout, where the data come from and
what to set; `pipeline.main` prints it without a traceback and exits with code 2. Without this, a missing
dataset surfaces once per stage, inside each stage's log, after several stages have started.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from diffinject.data.datasets import check_image
from diffinject.data.layout import FolderLayout, scan_images
from diffinject.data.sections import source_data_section
from diffinject.workflow.configs import Options, stage_config
from diffinject.workflow.markers import STAGE_OUTPUTS
from diffinject.workflow.runner import Step

#: where each user-supplied dataset comes from, and the folder under DATA_ROOT it must be in
SOURCES = {
    "bffhq": (
        "bffhq",
        "BFFHQ as released by DisEnt / BiasEnsemble (their READMEs link the download), unpacked so that "
        "{root}/bffhq/{pct}/align, …/conflict, …/valid and {root}/bffhq/test exist",
    ),
    "dogscats": (
        "dogs_and_cats",
        "Dogs & Cats as released by BiasEnsemble (its README links the download), unpacked so that "
        "{root}/dogs_and_cats/{pct}/align, …/conflict, …/valid and {root}/dogs_and_cats/test exist",
    ),
    "folder": ("{name}", "your own images in the DisEnt layout (configs/folder/README.md)"),
}
CIFAR_HELP = (
    "CIFAR-10 in torchvision's layout ({root}/cifar-10-batches-py, the 'python version' from "
    "https://www.cs.toronto.edu/~kriz/cifar.html), from which Corrupted CIFAR-10 is built once, or DisEnt's "
    "cifar10c download at {root}/cifar10c/{pct} + {root}/cifar10c/test"
)


class CannotStart(RuntimeError):
    """A problem found before any stage started (printed without a traceback, exit code 2)."""


def _data_help(opts: Options, what: str) -> str:
    root = opts.data_root or "data"
    return (
        f"{what}\n  The data: {what_data(opts).format(root=root, pct=opts.pct, name=opts.name)}.\n"
        f"  Set DATA_ROOT to the folder that holds it (now: {root}), e.g. "
        f"make pipeline DATASET={opts.dataset} PCT={opts.pct} DATA_ROOT=/path/to/data"
        + (f" NAME={opts.name}" if opts.dataset == "folder" else "")
    )


def what_data(opts: Options) -> str:
    if opts.dataset == "ccifar10":
        return CIFAR_HELP
    return SOURCES[opts.dataset][1]


def check_dataset(opts: Options) -> None:
    """The user-supplied dataset is present (CMNIST never needs a download: the embedded digits); for the
    folder-layout datasets, its test images decode too (`check_test_pixels`)."""
    root = Path(opts.data_root or "data")
    if opts.dataset == "ccifar10":
        from diffinject.data.ccifar10 import cifar10_present

        built = all((root / "cifar10c" / sub).is_dir() for sub in (opts.pct, "test"))
        if not (built or cifar10_present(root)):
            raise CannotStart(_data_help(opts, f"no Corrupted CIFAR-10 and no CIFAR-10 under {root}."))
        return
    if opts.dataset not in SOURCES:
        return
    try:
        if opts.dataset == "folder":
            channels = opts.facts.channels  # reads the whole tree; every layout rule is checked there
            test = FolderLayout(root, opts.folder_name, opts.pct).test_dir()
            test_paths = opts.facts.test_paths
        else:
            layout = FolderLayout(root, SOURCES[opts.dataset][0], opts.pct)
            layout.train_dirs(), layout.valid_dir()
            channels = 3
            test = layout.test_dir()
            test_paths = scan_images([test], f"test split {test}").paths
    except (FileNotFoundError, ValueError) as error:
        raise CannotStart(_data_help(opts, str(error))) from error
    check_test_pixels(test_paths, channels, bad_image_policy(opts), test)


def bad_image_policy(opts: Options) -> str:
    """`on_bad_image` of the classifier stages (the bias stage's data section; "error" when unset)."""
    try:
        section = source_data_section(stage_config(opts, "bias", opts.seeds[0] if opts.seeds else 0))
    except (FileNotFoundError, ValueError):
        return "error"
    return str(((section or {}).get("init_args") or {}).get("on_bad_image", "error"))


def check_test_pixels(paths: Sequence[Path], channels: int, policy: str, test: Path) -> None:
    """Decode every test image now (the split is small): pixel damage behind a valid header would otherwise
    surface only when the first stage tests, after its whole fit. Under `on_bad_image: skip` the files are
    only named (the stages drop them); otherwise the run cannot start."""
    bad = [(p, c.problem) for p in paths if (c := check_image(p, channels, decode=True)).problem is not None]
    if not bad:
        return
    listing = "\n  ".join(f"{path}: {problem}" for path, problem in bad[:5])
    more = f"\n  ... and {len(bad) - 5} more" if len(bad) > 5 else ""
    if policy == "skip":
        print(
            f"[pipeline] {len(bad)} test image(s) in {test} do not decode; on_bad_image: skip drops them at "
            f"test time:\n  {listing}{more}",
            flush=True,
        )
        return
    raise CannotStart(
        f"{len(bad)} test image(s) in {test} do not decode (checked before any stage, since the test split "
        f"is read only after each fit):\n  {listing}{more}\n  Fix or remove them, or drop them with "
        f"on_bad_image: skip in the stages' data section (--variant)."
    )


def check_handovers(steps: Sequence[Step], root: Path) -> None:
    """Every upstream a planned step reads but this run does not build must already be there."""
    planned = {step.key for step in steps}
    missing = []
    for step in steps:
        for key in step.upstream:
            if key in planned:
                continue
            # what a downstream stage reads: the named (not globbed) files of the upstream's outputs
            outputs = STAGE_OUTPUTS.get(key.rsplit("/", 1)[-1], ())
            wanted = [name for name in outputs if "*" not in name]
            absent = [name for name in wanted if not (root / key / name).is_file()]
            if absent:
                missing.append(f"{step.key} reads {', '.join(absent)} from {root / key}: not there")
        missing += [f"{step.key} reads {path}: missing" for path in step.inputs if not path.is_file()]
    if missing:
        raise CannotStart(
            "\n  ".join(["inputs of the planned stages are missing:", *sorted(set(missing))])
            + "\n  Add the stages that build them to --stages (default: all), or set DIFFUSION=<export>."
        )
