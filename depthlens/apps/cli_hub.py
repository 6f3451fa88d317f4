"""Command-line command for the Hugging Face Hub; :func:`add_parsers` adds it to ``depthlens``:

- ``depthlens push LENS REPO`` — upload a lens folder (or file) with a model card (``README.md``:
  model, fingerprint, training data and recipe, evaluation table) to ``REPO``, written
  ``OWNER/NAME`` or as a hub spec ``hf:[spaces/|datasets/]OWNER/NAME[/SUBFOLDER][@BRANCH]``; the
  same spec then reads it back as ``--lens``.

Everything is checked before anything is uploaded: the lens folder exists and its registered kind
reads it, the evaluation (if any) is a report, and the repository name is valid.
"""

from __future__ import annotations

import argparse
from dataclasses import replace
from pathlib import Path

from depthlens.errors import LensFileError, UsageError


def _push(args: argparse.Namespace) -> None:
    from depthlens.apps.hub_push import push_lens
    from depthlens.lenses.hub import parse_hub_spec

    try:
        target = parse_hub_spec(args.repo, prefix_optional=True)
    except LensFileError as error:
        raise UsageError(f"REPO {error}") from None
    if args.branch:
        if target.revision and target.revision != args.branch:
            raise UsageError(f"REPO {args.repo!r} names branch {target.revision!r} but --branch says {args.branch!r}: "
                             "give the branch once")
        target = replace(target, revision=args.branch)
    lens = Path(args.lens).expanduser()
    if not lens.exists():
        raise UsageError(f"LENS {args.lens!r} does not exist: pass a lens folder (depthlens train writes "
                         "runs/<model>/lens)")
    url = push_lens(lens, target, evaluation=Path(args.eval) if args.eval else None, private=args.private,
                    message=args.message)
    print(f"pushed {lens} to {target}: {url}")
    print(f"read it with --lens {target}")


def add_parsers(commands: argparse._SubParsersAction) -> None:
    """Add ``push`` to the ``depthlens`` subcommands."""
    push = commands.add_parser("push", help="upload a lens folder with a model card to the Hugging Face Hub")
    push.add_argument("lens", metavar="LENS", help="the lens folder (or file) to upload, e.g. runs/smollm2-135m/lens")
    push.add_argument("repo", metavar="REPO",
                      help="OWNER/NAME, or hf:[spaces/|datasets/]OWNER/NAME[/SUBFOLDER][@BRANCH] to upload into a "
                           "subfolder, a Space or a branch (created if missing)")
    push.add_argument("--eval", metavar="DIR",
                      help="evaluation folder whose eval.json fills the card's table (default: the run's eval/ beside "
                           "the lens, if it has one)")
    push.add_argument("--private", action="store_true", help="create the repository private (if it does not exist yet)")
    push.add_argument("--branch", "--revision", dest="branch", help="upload to this branch (created if missing)")
    push.add_argument("--message", help="the commit message (default: says depthlens push made it)")
    push.set_defaults(run=_push)


__all__ = ["add_parsers"]
