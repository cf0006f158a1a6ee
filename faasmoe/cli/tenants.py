"""`faasmoe tenant …` and `faasmoe usage`: tenants, their keys, and the usage ledger."""

from __future__ import annotations

import argparse
from pathlib import Path

from faasmoe.tenancy.database import STATE_HELP, default_state_path
from runtime.sizes import format_bytes, parse_size_or_zero


def _state(args: argparse.Namespace) -> Path:
    return args.state or default_state_path()


def add_tenant_parser(subparsers: argparse._SubParsersAction) -> None:
    state = argparse.ArgumentParser(add_help=False)
    state.add_argument("--state", type=Path, default=None, metavar="PATH",
                       help=f"SQLite file of tenants, keys and usage; {STATE_HELP}")
    tenant = subparsers.add_parser("tenant", help="tenants and their API keys: add, list, remove, key")
    actions = tenant.add_subparsers(dest="tenant_command", required=True, metavar="ACTION")
    add = actions.add_parser("add", parents=[state], help="create a tenant and print its first API key (once)")
    add.add_argument("name", metavar="NAME", help="tenant name: 1-63 of a-z 0-9 _ -")
    add.add_argument("--models", default="*", help="comma-separated models it may use, or * for all; default: *")
    add.add_argument("--max-concurrent", type=int, default=0, metavar="N",
                     help="requests in flight at once; default: 0 (unlimited)")
    add.add_argument("--tokens-per-minute", type=int, default=0, metavar="N",
                     help="prompt + completion tokens per minute; default: 0 (unlimited)")
    add.add_argument("--memory-quota", type=parse_size_or_zero, default=0, metavar="SIZE",
                     help="resident memory of its private models (e.g. 2GiB); default: 0 (unlimited)")
    add.add_argument("--admin", action="store_true", help="may call the /admin endpoints")
    add.add_argument("--weight", type=float, default=1.0, metavar="W",
                     help="its share of a shared model when other tenants are busy too (default 1; 2 = twice)")
    add.set_defaults(handler=_tenant_add)
    listing = actions.add_parser("list", parents=[state], help="print the tenants and their limits (never keys)")
    listing.set_defaults(handler=_tenant_list)
    remove = actions.add_parser("remove", parents=[state], help="delete a tenant and revoke its keys (usage stays)")
    remove.add_argument("name", metavar="NAME", help="the tenant to remove")
    remove.set_defaults(handler=_tenant_remove)
    key = actions.add_parser("key", parents=[state], help="issue another API key for a tenant and print it (once)")
    key.add_argument("name", metavar="NAME", help="the tenant")
    key.set_defaults(handler=_tenant_key)


def _existing_state(path: Path) -> Path:
    # Reading commands must not leave an empty database behind in whatever directory they ran in.
    if not path.exists():
        raise ValueError(f"no state database at {path} (create a tenant with `faasmoe tenant add`, "
                         "or pass --state / set $FAASMOE_STATE)")
    return path


def _print_key(name: str, key: str) -> None:
    print(f"API key for tenant {name}:\n\n    {key}\n\n"
          "Store it now: it is kept only as a hash and will not be shown again.")


def _tenant_add(args: argparse.Namespace) -> int:
    from faasmoe.tenancy.tenants import TenantStore

    models = [m.strip() for m in args.models.split(",") if m.strip()]
    with TenantStore(_state(args)) as store:
        _, key = store.add_tenant(args.name, allowed_models=models, max_concurrent=args.max_concurrent,
                                  tokens_per_minute=args.tokens_per_minute,
                                  memory_quota_bytes=args.memory_quota, admin=args.admin, weight=args.weight)
    print(f"added tenant {args.name} to {_state(args)}")
    _print_key(args.name, key)
    return 0


def _tenant_list(args: argparse.Namespace) -> int:
    from datetime import datetime

    from faasmoe.tenancy.tenants import TenantStore

    with TenantStore(_existing_state(_state(args))) as store:
        rows = [[t.name, ",".join(t.allowed_models), t.max_concurrent or "-", t.tokens_per_minute or "-",
                 format_bytes(t.memory_quota_bytes) if t.memory_quota_bytes else "-", "yes" if t.admin else "",
                 f"{t.weight:g}", store.key_count(t.name), datetime.fromtimestamp(t.created_at).strftime("%Y-%m-%d %H:%M")]
                for t in store.list_tenants()]
    if not rows:
        print(f"no tenants in {_state(args)}")
        return 0
    _print_table(["tenant", "models", "max concurrent", "tokens/min", "memory quota", "admin", "weight", "keys", "created"],
                 rows)
    return 0


def _tenant_remove(args: argparse.Namespace) -> int:
    from faasmoe.tenancy.tenants import TenantStore

    with TenantStore(_existing_state(_state(args))) as store:
        keys = store.remove_tenant(args.name)
    print(f"removed tenant {args.name} and revoked its {keys} key(s); its usage stays in the ledger")
    return 0


def _tenant_key(args: argparse.Namespace) -> int:
    from faasmoe.tenancy.tenants import TenantStore

    with TenantStore(_existing_state(_state(args))) as store:
        key = store.add_key(args.name)
    _print_key(args.name, key)
    return 0


def add_usage_parser(subparsers: argparse._SubParsersAction) -> None:
    usage = subparsers.add_parser(
        "usage", help="print metered usage per tenant and model",
        description="Sum the usage ledger per tenant and model: requests, tokens, expert invocations, "
        "expert compute seconds, cold starts and resident memory (GiB-seconds).")
    usage.add_argument("--tenant", default=None, help="only this tenant; default: all")
    usage.add_argument("--since", default=None, metavar="WHEN",
                       help="only requests finished since WHEN: a duration ago (90s, 30m, 1h, 2d) or a local "
                       "date/time (2026-11-29, 2026-11-29T10:00); default: all time")
    usage.add_argument("--state", type=Path, default=None, metavar="PATH",
                       help=f"SQLite file of tenants, keys and usage; {STATE_HELP}")
    usage.add_argument("--json", action="store_true", help="print the rows as JSON instead of a table")
    usage.set_defaults(handler=_usage)


def _usage(args: argparse.Namespace) -> int:
    import json

    from faasmoe.tenancy.ledger import UsageLedger, parse_since

    since = parse_since(args.since) if args.since else None
    with UsageLedger(_existing_state(_state(args))) as ledger:
        rows = ledger.summary(tenant=args.tenant, since=since)
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    if not rows:
        print("no usage recorded" + (f" for tenant {args.tenant}" if args.tenant else "")
              + (f" since {args.since}" if args.since else ""))
        return 0
    _print_table(
        ["tenant", "model", "requests", "errors", "prompt tok", "completion tok", "invocations", "compute s",
         "cold starts", "GiB-s"],
        [[r["tenant"], r["model"], r["requests"], r["errors"], r["prompt_tokens"], r["completion_tokens"],
          r["expert_invocations"], f"{r['expert_compute_s']:.3f}", r["cold_starts"],
          f"{r['resident_byte_seconds'] / 2**30:.3f}"] for r in rows])
    return 0


def _print_table(headers: list[str], rows: list[list]) -> None:
    cells = [headers] + [[str(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    for row in cells:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip())
