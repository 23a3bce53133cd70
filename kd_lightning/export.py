"""`kd-export CHECKPOINT OUT`: the trained student alone (no teacher, no adapters) with its build spec.

The output loads anywhere with `kd_lightning.teachers.read_weights`, serves as `teacher.checkpoint`
of a later run, and rebuilds with `build_model(**spec)`.
"""

from __future__ import annotations

import argparse
import sys

from kd_lightning.errors import ConfigError
from kd_lightning.models import build_model
from kd_lightning.teachers import export_student, load_weights, read_weights


def export(checkpoint: str, out: str) -> str:
    _, spec = read_weights(checkpoint)
    if not spec:
        raise ConfigError(
            f"{checkpoint!r} carries no model spec (it is a plain state_dict, not a kd_lightning checkpoint), so "
            f"the architecture is unknown. Export from a checkpoint written by kd-train, or load the state_dict "
            f"into build_model(<name>, num_classes) yourself."
        )
    model = load_weights(build_model(**spec), checkpoint, role="student")
    return str(export_student(model, out))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="kd-export", description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", help="a Lightning checkpoint written by kd-train (e.g. .../last.ckpt)")
    parser.add_argument("out", help="where to write the student (e.g. student.pt)")
    args = parser.parse_args(argv)
    try:
        print(export(args.checkpoint, args.out))
    except ConfigError as error:
        print(f"kd-export: error: {error}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
