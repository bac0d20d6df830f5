"""`dreamseed policies check|plan|diff`, `dreamseed route` and `dreamseed docs`: the policy files, read
and explained without running the proxy."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..policy import AUTO_MODEL, BACKENDS_FILE, PolicyError, load_catalog, load_policies, memory_plan
from ..policy.checks import field_name
from ..routing import Prompt, Router, UnknownModelError
from .common import DEFAULT_POLICIES, load_or_exit


def cmd_check(args: argparse.Namespace) -> int:
    policies = load_or_exit(args.directory)
    backends = policies.catalog.backends
    print(
        f"{args.directory}: OK ({len(backends)} backends: {', '.join(backends)}; "
        f"{len(policies.routing.rules)} routing rules)"
    )
    retrieving = [rule.name for rule in policies.routing.rules if policies.rag.settings(rule.name, rule.target).enabled]
    print(f"  rag: retrieval for rules {', '.join(retrieving)}" if retrieving else "  rag: off")
    if policies.scale.backends:
        print("  scale: on demand " + ", ".join(
            f"{name} ({settings.actuator.__struct_config__.tag}, cold start {settings.cold_start})"
            for name, settings in policies.scale.backends.items()))
    return 0


def cmd_plan(args: argparse.Namespace) -> int:
    """Print each GPU host's memory plan as a table; exit 1 (naming the problems) when one does not fit."""
    try:
        catalog = load_catalog(args.directory)
    except PolicyError as exc:
        print(f"{args.directory}: invalid policies", file=sys.stderr)
        for problem in exc.problems:
            print(f"  {problem}", file=sys.stderr)
        return 1
    if not catalog.hosts:
        print(f"{args.directory}: no GPU hosts in {BACKENDS_FILE}")
        return 0
    lines: list[str] = []
    for host_name in catalog.hosts:
        plan = memory_plan(catalog, host_name)
        print(plan.table() + "\n")
        lines += [f"{field_name(('backends', backend, field) if backend else ('hosts', host_name))}: {message}"
                  for backend, field, message in plan.problems()]
    for line in lines:
        print(f"  {line}", file=sys.stderr)
    return 1 if lines else 0


def cmd_docs(args: argparse.Namespace) -> int:
    """Check, or write, the documents generated from code (see docs.py)."""
    from ..docs import generated

    stale = []
    for path, content in generated(Path(args.root)).items():
        if not path.exists() or path.read_text(encoding="utf-8") != content:
            stale.append(path)
            if args.write:
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_text(content, encoding="utf-8")
    for path in stale:
        print(f"{'wrote' if args.write else 'stale'}: {path}")
    return 1 if stale and not args.write else 0


def cmd_diff(args: argparse.Namespace) -> int:
    """The semantic difference between two policy directories, and with --traffic what it moves.
    Exit 0 when the head is valid, 1 when it is not (its problems printed, as `policies check`
    does), 2 when the base itself is invalid or the traffic file cannot be opened."""
    from ..policy.diff import policy_diff
    from ..replay import read_traffic, replay
    from .diff_report import render

    try:
        base = load_policies(args.base)
    except PolicyError as exc:
        print(f"dreamseed: the base {args.base} is invalid ({len(exc.problems)} problem(s)); fix it first:",
              file=sys.stderr)
        for problem in exc.problems:
            print(f"  {problem}", file=sys.stderr)
        return 2
    try:
        head = load_policies(args.head)
    except PolicyError as exc:
        heading = f"{len(exc.problems)} problem(s) in {args.head}: this change cannot be deployed"
        if args.format == "markdown":
            print("## DreamSeed policy diff\n\n**Invalid:** " + heading + "\n")
            print("\n".join(f"- `{problem}`" for problem in exc.problems))
        else:
            print(f"dreamseed: {heading}:", file=sys.stderr)
            for problem in exc.problems:
                print(f"  {problem}", file=sys.stderr)
        return 1
    traffic = replayed = None
    if args.traffic:
        try:
            traffic = read_traffic(Path(args.traffic))
        except OSError as exc:
            print(f"dreamseed: cannot read {args.traffic}: {exc.strerror or exc}", file=sys.stderr)
            return 2
        replayed = replay(base, head, traffic)
    sys.stdout.write(render(policy_diff(base, head), base, head, replayed, traffic, args.format == "markdown"))
    return 0


def cmd_route(args: argparse.Namespace) -> int:
    policies = load_or_exit(args.policies)
    router = Router(policies.routing, policies.catalog)
    # A file or `echo` ends the prompt with a newline the API would never see: drop that one.
    text = sys.stdin.read().removesuffix("\n").removesuffix("\r") if args.prompt == "-" else args.prompt
    prompt = Prompt(prompt=text) if args.completion else Prompt.of_text(text)
    try:
        decision, trace = router.explain(args.model, prompt)
    except UnknownModelError as exc:
        print(f"dreamseed: unknown model {exc.model!r}; available: {', '.join(exc.available)}", file=sys.stderr)
        return 1
    for step in trace:
        print(f"  {'MATCH' if step.matched else 'skip '} {step.rule}: {step.detail}")
    fallback = f" (fallback: {' -> '.join(decision.chain[1:])})" if len(decision.chain) > 1 else ""
    print(f"rule: {decision.rule}")
    print(f"backend: {decision.backend}{fallback}")
    print(f"model: {policies.catalog.backends[decision.backend].model}")
    print(f"why: {decision.reason}")
    return 0


def add_commands(commands: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    policies = commands.add_parser("policies", help="work with policy files")
    policy_commands = policies.add_subparsers(dest="policies_command", required=True)
    check = policy_commands.add_parser("check", help="validate a policy directory")
    check.add_argument("directory", nargs="?", default=DEFAULT_POLICIES)
    check.set_defaults(func=cmd_check)
    plan = policy_commands.add_parser(
        "plan", help="show each GPU host's memory plan (weights, KV cache, tokens of KV, headroom per backend)")
    plan.add_argument("directory", nargs="?", default=DEFAULT_POLICIES)
    plan.set_defaults(func=cmd_plan)
    diff = policy_commands.add_parser(
        "diff", help="what changes from one policy directory to another: rules, backends, retrieval, scaling, the "
                     "memory plan, and with --traffic which requests move")
    diff.add_argument("base", help="the policies before (a pull request's base)")
    diff.add_argument("head", help="the policies after")
    diff.add_argument("--traffic", help="JSON lines of request bodies, or an access log written with --log-prompts")
    diff.add_argument("--format", choices=("text", "markdown"), default="text",
                      help="markdown: a pull-request comment (default: %(default)s)")
    diff.set_defaults(func=cmd_diff)
    docs = commands.add_parser(
        "docs", help="check (or --write) the generated docs: docs/schema/*.schema.json, docs/policy-reference.md, "
                     "the error table in docs/api.md")
    docs.add_argument("--root", default=".", help="the project root (default: %(default)s)")
    docs.add_argument("--write", action="store_true", help="write the files that are stale")
    docs.set_defaults(func=cmd_docs)

    route = commands.add_parser("route", help="show which rule and backend a prompt would get, and why")
    route.add_argument("prompt", help="the prompt text, or - to read it from standard input")
    route.add_argument("--model", default=AUTO_MODEL, help="requested model (default: %(default)s)")
    route.add_argument("--completion", action="store_true", help="treat it as a /v1/completions prompt")
    route.add_argument("--policies", default=DEFAULT_POLICIES)
    route.set_defaults(func=cmd_route)
