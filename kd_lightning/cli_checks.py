"""Command-line names checked against conf/ before Hydra composes, so a typo lists the valid choices.

Hydra's own message for `distill=[kdd]` is its config search path; this one names the group, the closest
valid option and all of them. It reads the command line with Hydra's parsers, so it sees what Hydra sees.
"""

from __future__ import annotations

import difflib
from pathlib import Path

from hydra._internal.config_loader_impl import ConfigLoaderImpl
from hydra._internal.utils import create_config_search_path, get_args_parser
from hydra.core.object_type import ObjectType
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import ChoiceSweep, Override
from hydra.errors import OverrideParseException
from omegaconf import OmegaConf

from kd_lightning.errors import ConfigError


def check_command_line(argv: list[str], config_dir: str, config_name: str = "train") -> None:
    """Raise a ConfigError for an unknown config-group option or group name among `argv`'s overrides."""
    args, _ = get_args_parser().parse_known_args(argv)
    search_path = create_config_search_path(config_dir)
    if args.config_dir:
        search_path.prepend("command-line", f"file://{Path(args.config_dir).resolve()}")
    loader = ConfigLoaderImpl(config_search_path=search_path)
    try:
        overrides = OverridesParser.create().parse_overrides(args.overrides)
    except OverrideParseException:
        return  # a syntax error: Hydra's own message points at the offending character
    primary = Path(args.config_dir or config_dir) / f"{args.config_name or config_name}.yaml"
    primary_keys = set(OmegaConf.load(primary)) | global_keys(Path(config_dir)) if primary.is_file() else None
    for override in overrides:
        group = override.key_or_group
        if loader.repository.group_exists(group):
            options = group_options(loader, group)
            for choice in chosen_options(override):
                if choice not in options:
                    raise ConfigError(unknown_option_message(group, choice, options, override))
        elif "." not in group and "/" not in group and not override.is_add() and not override.is_force_add() \
                and not override.is_delete() and primary_keys is not None and group not in primary_keys:
            groups = sorted(loader.list_groups(""))
            raise ConfigError(
                f"'{override.input_line}' names no config group or setting: '{group}' is neither. "
                f"{closest_phrase(group, [*groups, *primary_keys])}Config groups: {', '.join(groups)}. To add a "
                f"new top-level key on purpose, write +{override.input_line}."
            )


def global_keys(config_dir: Path) -> set[str]:
    """Top-level keys that `# @package _global_` group options add (e.g. scheme=multi_teacher's `teachers`):
    valid on the command line once that option is chosen, so not a misspelling to refuse here."""
    keys: set[str] = set()
    for path in config_dir.rglob("*.yaml"):
        text = path.read_text()
        if text.startswith("# @package _global_"):
            keys |= set(OmegaConf.create(text) or {}) - {"defaults"}
    return keys


def group_options(loader: ConfigLoaderImpl, group: str) -> list[str]:
    """Every option of `group`, those in subfolders as `sub/name` (how `+experiment=cifar100/...` names them)."""
    options = list(loader.get_group_options(group, results_filter=ObjectType.CONFIG))
    for subgroup in loader.list_groups(group):
        options += [f"{subgroup}/{name}" for name in group_options(loader, f"{group}/{subgroup}")]
    return sorted(options)


def chosen_options(override: Override) -> list[str]:
    """The option names an override selects: one, a list (`distill=[kd,at]`), or a sweep of either."""
    value = override.value()
    if isinstance(value, ChoiceSweep):
        values = value.list
    elif override.is_sweep_override():  # glob(...) or range(...): Hydra filters them against the options itself
        return []
    else:
        values = [value]
    flat = [item for entry in values for item in (entry if isinstance(entry, list) else [entry])]
    return [item for item in flat if isinstance(item, str)]


def unknown_option_message(group: str, choice: str, options: list[str], override: Override) -> str:
    return (f"Unknown option '{choice}' for config group '{group}' (in '{override.input_line}'). "
            f"{closest_phrase(choice, options)}Valid options: {', '.join(options)}. "
            + ("Options of hydra/ groups come from Hydra and its installed plugins." if group.startswith("hydra/")
               else f"Each is a file conf/{group}/<option>.yaml; to add your own, create that file."))


def closest_phrase(given: str, candidates: list[str]) -> str:
    # Nested options ("cifar100/resnet32x4_resnet8x4") are also matched on their last part alone.
    by_name = {candidate.rsplit("/", 1)[-1]: candidate for candidate in candidates}
    match = difflib.get_close_matches(given, candidates, n=1, cutoff=0.5) or \
        [by_name[name] for name in difflib.get_close_matches(given.rsplit("/", 1)[-1], list(by_name), n=1, cutoff=0.5)]
    return f"The closest match is '{match[0]}'. " if match else ""
