"""Each stage's resolved config: template → folder-data facts → profile → variants → run paths → data split.

Templates are `configs/{dataset}/{stage}.yaml` (folder data: `configs/folder/{small,large}/`), profiles
`configs/{dataset}/profiles/{profile}.yaml` or `configs/profiles/{profile}.yaml`, sections keyed by stage;
`--variant` files have the same shape. Every `runs/{dataset}/{pct}` path of a template moves under the run
root, per seed for per-seed stages.
"""

from __future__ import annotations

import copy
import difflib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from diffinject.data.inspect import FolderFacts, inspect_folder
from diffinject.data.sections import source_data_section
from diffinject.workflow.folder import fill_config, template_set

DATASETS = ("cmnist", "ccifar10", "bffhq", "dogscats", "folder")
PROFILES = ("smoke", "quick", "paper")
#: the unsupervised baselines beside Vanilla and LfF (issue 13): each a classifier stage of its own
EXTRA_BASELINES = ("disent", "lff_be", "disent_be")
BASELINES = ("vanilla", "lff", *EXTRA_BASELINES)
#: the generative baselines (issue 22), each a classifier stage on original ∪ its generator's images, and
#: their controls: A² without the distance-consistency term, and top-K oversampling (AmpliBias's slots, each
#: filled by its nearest top-K image itself: what a generator that only memorises would give)
GAN_BASELINES = ("a2", "amplibias")
GAN_CONTROLS = ("a2_nocdc", "topk_oversample")
GAN_ROWS = (*GAN_BASELINES, *GAN_CONTROLS)
#: the generator stages each of those rows needs, in order (`a2_source` is shared across seeds like diffusion)
GENERATOR_CHAIN: dict[str, tuple[str, ...]] = {
    "a2": ("a2_source", "a2_adapt", "a2_translate"),
    "a2_nocdc": ("a2_source", "a2_nocdc_adapt", "a2_nocdc_translate"),
    "amplibias": ("amplibias_gan", "amplibias_generate"),
    "topk_oversample": ("amplibias_gan", "amplibias_generate"),
}
SHARED_GENERATORS = ("a2_source",)
GENERATORS = (
    "a2_adapt", "a2_translate", "a2_nocdc_adapt", "a2_nocdc_translate", "amplibias_gan", "amplibias_generate",
)  # fmt: skip
PER_SEED_STAGES = (*BASELINES, "bias", "inject", "debias", *GENERATORS, *GAN_ROWS)
ALL_STAGES = (*BASELINES, "bias", "diffusion", "inject", "debias", *GAN_ROWS)
#: what `make pipeline` runs when --stages is not given (`make baselines` adds EXTRA_BASELINES)
DEFAULT_STAGES = ("vanilla", "lff", "bias", "diffusion", "inject", "debias")
#: data modules whose imbalance is a `ratio`; the folder datasets take a `pct` folder name instead.
RATIO_DATASETS = ("cmnist", "ccifar10")
#: the top-level keys a `--variant` file may have: the stages, and `topk` (the bias stage's top-K predict)
VARIANT_KEYS = (*ALL_STAGES, "topk", *SHARED_GENERATORS, *GENERATORS)


def pct_to_ratio(pct: str) -> float:
    """'1pct' → 0.01, '0.5pct' → 0.005 (clear error for anything else)."""
    if not pct.endswith("pct"):
        raise ValueError(f"PCT={pct!r}: expected a folder name like 0.5pct, 1pct, 2pct, 5pct")
    try:
        value = float(pct[:-3]) / 100
    except ValueError as error:
        raise ValueError(f"PCT={pct!r}: expected a number before 'pct', e.g. 1pct") from error
    if not 0 < value < 1:
        raise ValueError(f"PCT={pct!r}: the conflicting share must lie in (0, 100) percent")
    return value


def path_component(value: str, what: str) -> str:
    """A folder name that stays one level deep (no separators, `..`, or hidden/empty names)."""
    if not value or value in (".", "..") or value.startswith(".") or "/" in value or "\\" in value:
        raise ValueError(f"{what}={value!r}: expected a plain folder name (no '/', '..' or leading '.')")
    return value


def deep_merge(base: dict[str, Any], override: dict[str, Any] | None) -> dict[str, Any]:
    """`override` into a copy of `base`; dicts merge key by key, anything else (lists too) is replaced.

    A section naming another `class_path` replaces the base section whole: the other class's init args
    would not fit (e.g. a variant training the debiased model with `LfFClassifier`).
    """
    if "class_path" in (override or {}) and override.get("class_path") != base.get("class_path"):
        return copy.deepcopy(override)
    merged = copy.deepcopy(base)
    for key, value in (override or {}).items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def relocate(node: Any, replace: Callable[[str], str]) -> Any:
    """Apply `replace` to every string in a nested YAML structure."""
    if isinstance(node, dict):
        return {key: relocate(value, replace) for key, value in node.items()}
    if isinstance(node, list):
        return [relocate(value, replace) for value in node]
    return replace(node) if isinstance(node, str) else node


def path_mover(dataset: str, root: Path, seed: int | None) -> Callable[[str], str]:
    """Move `runs/{dataset}/{any pct}[/...]` paths of a template config under this run's root.

    Stage folders (and the bare root, which loggers use as `save_dir`) of per-seed stages go to `seed{S}/`;
    the shared diffusion folder stays at the root.
    """
    seeded = root / f"seed{seed}" if seed is not None else root

    prefix = f"runs/{dataset}/"

    def replace(value: str) -> str:
        if not value.startswith(prefix):
            return value
        rest = value[len(prefix) :].partition("/")[2]  # drop the template's pct folder
        first = rest.split("/", 1)[0]
        if first in PER_SEED_STAGES:
            return str((root / f"seed{seed if seed is not None else 0}" / rest).as_posix())
        if first == "diffusion" or first in SHARED_GENERATORS:
            return str((root / rest).as_posix())
        return str((seeded / rest).as_posix()) if rest else str(seeded.as_posix())

    return replace


def set_data_args(config: dict[str, Any], dataset: str, pct: str, data_root: str | None) -> None:
    """Point the config's data module (or the one nested in the injection pairs module) at this split/root."""
    section = source_data_section(config)
    if section is None:
        return
    init = section.setdefault("init_args", {})
    if dataset in RATIO_DATASETS:
        init["ratio"] = pct_to_ratio(pct)
    else:
        init["pct"] = pct
    if data_root is not None:
        init["root"] = data_root


def read_yaml(path: Path, what: str = "config") -> Any:
    """A YAML file's content; non-UTF-8 bytes or a syntax error is a `ValueError` naming the file and line.

    PyYAML's own errors name "<unicode string>", not the file, and a decode error names neither.
    """
    if not path.is_file():
        raise FileNotFoundError(f"{what} {path} not found")
    data = path.read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as error:
        line = data[: error.start].count(b"\n") + 1
        raise ValueError(
            f"{what} {path}, line {line}: not UTF-8 text (byte 0x{data[error.start]:02x}); save it as UTF-8"
        ) from None
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f", line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        context, begun = getattr(error, "context", None), getattr(error, "context_mark", None)
        if context and begun is not None and mark is not None and begun.line != mark.line:
            context += f" begun at line {begun.line + 1}"  # where an unclosed bracket or quote opened
        problem = getattr(error, "problem", None) or str(error)
        detail = f"{context}: {problem}" if context else problem
        raise ValueError(f"{what} {path}{where}: not valid YAML ({detail})") from None


def load_yaml(path: Path) -> dict[str, Any]:
    loaded = read_yaml(path) or {}
    if not isinstance(loaded, dict):
        raise ValueError(f"{path}: expected a mapping at the top level, got {type(loaded).__name__}")
    return loaded


def load_variant(path: Path) -> dict[str, Any]:
    """A `--variant` file, checked: a mapping of known stage names to mappings of overrides (or nothing).

    Unchecked, a misspelt stage (`biass:`) is never looked up and the run silently uses the defaults, and a
    section that is a list fails later as a bare `AttributeError`. Every problem names the file and line.
    """
    loaded = read_yaml(path, "variant file")
    if loaded is None:
        return {}
    if not isinstance(loaded, dict):
        raise ValueError(
            f"variant file {path}: expected a mapping of stage → overrides at the top level (e.g. `inject:` "
            f"with indented keys below it), got a {type(loaded).__name__}"
        )
    node = yaml.compose(path.read_text(encoding="utf-8"), Loader=yaml.SafeLoader)
    pairs = getattr(node, "value", [])
    lines = {k.value: k.start_mark.line + 1 for k, _ in pairs if isinstance(k, yaml.ScalarNode)}
    problems = []
    for key, section in loaded.items():
        where = f"variant file {path}, line {lines.get(str(key), '?')}"
        if key not in VARIANT_KEYS:
            near = difflib.get_close_matches(str(key), VARIANT_KEYS, n=1)
            hint = f" (did you mean {near[0]!r}?)" if near else ""
            problems.append(
                f"{where}: unknown stage {key!r}{hint}; the top-level keys of a variant are stages: "
                + ", ".join(VARIANT_KEYS)
            )
        elif section is not None and not isinstance(section, dict):
            problems.append(
                f"{where}: the {key!r} section must be a mapping of overrides (e.g. `model:` → `init_args:` "
                f"→ `gamma: 0.5`), got a {type(section).__name__}"
            )
    if problems:
        raise ValueError("\n  ".join(problems))
    return loaded


@dataclass
class Options:
    dataset: str = "cmnist"
    pct: str = "1pct"
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    runs: str = "runs"
    profile: str = "quick"
    trainer: str = "cpu"
    devices: int | None = None
    data_root: str | None = None
    configs: str = "configs"
    stages: list[str] = field(default_factory=lambda: list(DEFAULT_STAGES))
    variants: list[str] = field(default_factory=list)
    report: bool = True
    #: DATASET=folder: the dataset's folder name under data_root, the headline test subset and overrides of
    #: what is read from the tree (None: read it).
    name: str | None = None
    headline: str = "all"
    image_size: int | None = None
    channels: int | None = None
    num_classes: int | None = None
    num_bias_classes: int | None = None
    #: a diffusion export to use instead of training the diffusion stage (DIFFUSION=<dir>).
    diffusion: str | None = None
    _facts: FolderFacts | None = field(default=None, repr=False, compare=False)

    @property
    def root(self) -> Path:
        if self.dataset == "folder":
            return Path(self.runs) / "folder" / self.folder_name / self.pct
        return Path(self.runs) / self.dataset / self.pct

    @property
    def folder_name(self) -> str:
        if not self.name:
            raise ValueError("DATASET=folder needs NAME=<the dataset's folder under DATA_ROOT> (--name)")
        return path_component(self.name, "NAME")

    @property
    def facts(self) -> FolderFacts:
        """The folder dataset read from its tree (once; errors name the path and the rule)."""
        if self._facts is None:
            self._facts = inspect_folder(
                self.data_root or "data",
                self.folder_name,
                self.pct,
                image_size=self.image_size,
                channels=self.channels,
                num_classes=self.num_classes,
                num_bias_classes=self.num_bias_classes,
            )
        return self._facts

    @property
    def config_dir(self) -> Path:
        """Where this dataset's stage templates live (folder data: the template set for the image size)."""
        if self.dataset == "folder":
            return Path(self.configs) / "folder" / template_set(self.facts.image_size)
        return Path(self.configs) / self.dataset


def profile_section(opts: Options, name: str) -> dict[str, Any]:
    """The profile's section for a stage template (the dataset's own profile file, else the shared one)."""
    profile_file = opts.config_dir / "profiles" / f"{opts.profile}.yaml"
    if not profile_file.is_file():  # dataset-agnostic profile
        profile_file = Path(opts.configs) / "profiles" / f"{opts.profile}.yaml"
    if not profile_file.is_file():
        if opts.profile != "quick":
            raise FileNotFoundError(
                f"profile {opts.profile!r}: neither {opts.config_dir / 'profiles'} nor {profile_file.parent} "
                f"has {opts.profile}.yaml (profiles: {', '.join(PROFILES)})"
            )
        return {}
    return dict(load_yaml(profile_file).get(name) or {})


def stage_config(opts: Options, stage: str, seed: int | None, template: str | None = None) -> dict[str, Any]:
    """The resolved config dict of one stage (template → profile → variants → paths → data)."""
    configs = opts.config_dir
    name = template or stage
    section = profile_section(opts, name)
    # A profile may swap the base file of a stage (e.g. the paper-size diffusion config) with `_template`,
    # a file name in configs/<dataset>/
    base = configs / (section.pop("_template") if "_template" in section else f"{name}.yaml")
    config = load_yaml(base)
    if opts.dataset == "folder":
        config = fill_config(config, name if name != "topk" else "bias", opts.facts, opts.headline)
    config = deep_merge(config, section)
    for variant in opts.variants:
        config = deep_merge(config, load_variant(Path(variant)).get(name))
    config = relocate(config, path_mover(opts.dataset, opts.root, seed))
    set_data_args(config, opts.dataset, opts.pct, opts.data_root)
    return config
