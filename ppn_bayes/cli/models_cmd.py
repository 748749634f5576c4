"""``ppn models``: list the bundled model aliases and fetch them into the cache."""

from __future__ import annotations

import argparse
from typing import Any

HELP = "list and fetch bundled base models"


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser("models", help=HELP, description=HELP)
    sub = parser.add_subparsers(dest="models_command", metavar="ACTION", required=True)
    fetch = sub.add_parser("fetch", help="download and cache a bundled model (once)")
    fetch.add_argument("alias", help="a bundled alias, e.g. smollm2-135m")
    fetch.add_argument("--force", action="store_true", help="rebuild the cached copy even if present")
    fetch.set_defaults(func=run_fetch)
    lst = sub.add_parser("list", help="list bundled aliases and whether they are cached")
    lst.set_defaults(func=run_list)


def run_fetch(args: argparse.Namespace) -> int:
    from ppn_bayes.hub.zoo import fetch

    print(fetch(args.alias, force=args.force))
    return 0


def run_list(args: argparse.Namespace) -> int:
    from ppn_bayes.hub.zoo import is_cached, list_aliases, model_card

    rows = [("alias", "name", "family", "params", "license", "source", "cached")]
    for alias in list_aliases():
        card = model_card(alias)
        params = card.get("architecture", {}).get("parameters")
        source = "hub (network)" if card.get("needs_network") else "PyPI (offline ok)"
        rows.append((alias, card["name"], card.get("family", "?"), f"{params / 1e6:,.0f}M" if params else "?",
                     str(card.get("license", "?")).split(" (")[0], source, "yes" if is_cached(alias) else "no"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip())
    return 0
