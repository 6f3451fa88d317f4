"""``depthlens cache``: list or clear the model cache (GGUF models dequantized once, kept as
safetensors); :func:`add_parsers` adds it to ``depthlens``."""

from __future__ import annotations

import argparse

from depthlens.errors import UsageError


def _cache(args: argparse.Namespace) -> None:
    from depthlens.model import cache
    from depthlens.model.load import clear_cache

    root = cache.cache_root()
    if args.action == "list":
        entries = cache.list_entries()
        for entry in entries:
            stale = "" if entry.current else "  (other library versions: clear it)"
            print(f"{entry.size / 2**20:8.0f} MiB  {entry.dtype:<8}  {entry.spec}  from {entry.source}{stale}")
        print(f"{len(entries)} cached model(s), {sum(e.size for e in entries) / 2**20:.0f} MiB, in {root}")
        return
    if args.all and args.spec is not None:
        raise UsageError(f"give the model spec {args.spec!r} or --all, not both")
    if not args.all and args.spec is None:
        raise UsageError("give the model spec whose cache entries to remove, or --all")
    removed = clear_cache(None if args.all else args.spec)
    what = "every entry" if args.all else f"the entries of {args.spec}"
    print(f"removed {len(removed)} cached model(s), {sum(e.size for e in removed) / 2**20:.0f} MiB ({what}) from {root}")


def add_parsers(commands: argparse._SubParsersAction) -> None:
    """Add ``cache list`` and ``cache clear`` to the ``depthlens`` subcommands."""
    cached = commands.add_parser("cache", help="list or clear the model cache (GGUF models dequantized once, kept as safetensors)")
    actions = cached.add_subparsers(dest="action", required=True)
    actions.add_parser("list", help="show every cached model with its size and source")
    clear = actions.add_parser("clear", help="remove the cached copies of one model, or all of them")
    clear.add_argument("spec", nargs="?", help="built-in name or .gguf file whose cached copies to remove")
    clear.add_argument("--all", action="store_true", help="remove every cached model")
    cached.set_defaults(run=_cache)


__all__ = ["add_parsers"]
