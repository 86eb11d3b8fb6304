"""`--help` readable at 80 columns, ending with the environment variables each command reads.

Applied once to the app's registered commands (`prepare_help`), so a command keeps its own help text and
no command has to repeat the list; commands not listed in ENVIRONMENT get no epilog.

The help is click's plain layout (the app sets ``rich_markup_mode=None``), not typer's rich panels: rich
fits an options table into 80 columns by cutting option names, metavars and defaults with "…"
(`--resend-unbil…`), and keeps a docstring's line breaks in a command list. click wraps every cell
instead, moves an option's help under a long name, and never cuts. A group's command list gets each
command's first sentence, whole (`summarize`): click would otherwise cut it with "..." to fit a line.
And click's wrapper breaks lines after hyphens, splitting `--queue-url` in two: the formatter holds
them (`_unbroken_hyphens`).
"""

from __future__ import annotations

import inspect
import re
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from collections.abc import Sequence

    import typer

_DATABASE = "DATABASE_URL (or BILLING_DATABASE_SECRET_ARN; BILLING_DB_TLS_VERIFY, BILLING_DB_CA_BUNDLE)"
_AWS = "AWS credentials (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY or AWS_PROFILE), AWS_DEFAULT_REGION"
_QUEUES = (
    "BILLING_QUEUE_URL or each lane's BILLING_AWS_QUEUE_URL, BILLING_GCP_QUEUE_URL, BILLING_AZURE_QUEUE_URL"
)
_MARKETPLACES = (
    "AWS_ENDPOINT_URL_MARKETPLACE_METERING; BILLING_GCP_SERVICE_CONTROL_URL and "
    "GOOGLE_APPLICATION_CREDENTIALS (or BILLING_GCP_ACCESS_TOKEN); BILLING_AZURE_METERING_URL and "
    "AZURE_CLIENT_ID, AZURE_CLIENT_SECRET, "
    "AZURE_TENANT_ID (or BILLING_AZURE_ACCESS_TOKEN)"
)
_LOCAL_DIR = "BILLING_LOCAL_DIR (the state directory; default ./.billing-local)"

ENVIRONMENT: dict[str, str] = {
    "db migrate": _DATABASE,
    "seed": _DATABASE,
    "run": f"{_DATABASE}; {_QUEUES}; {_AWS}, AWS_ENDPOINT_URL_SQS; {_MARKETPLACES}",
    "demo": "none: it starts its own embedded stack (DATABASE_URL, if set, is used for PostgreSQL)",
    "status": f"{_DATABASE}; the lanes' BILLING_<MARKETPLACE>_QUOTA_PER_SECOND",
    "reconcile": f"{_DATABASE}; BILLING_USAGE_SOURCE (and BILLING_ES_URL, BILLING_ES_API_KEY)",
    "redrive": (
        f"{_AWS}, AWS_ENDPOINT_URL_SQS; BILLING_<LANE>_DLQ_URL and BILLING_<LANE>_QUEUE_URL with --lane"
    ),
    "invoke": "the function's Environment in template.yaml, --env-vars; none needed for the sample events",
    "timeline": "none",
    # `billing local`: the stack's state (pid, environment, log) lives in one directory
    "local up": (
        f"{_LOCAL_DIR}; it needs no other and prints the ones the other commands need (DATABASE_URL,"
        " the queue URLs, the marketplace endpoints) as export lines"
    ),
    "local env": f"{_LOCAL_DIR}, the directory `billing local up` used",
    "local down": f"{_LOCAL_DIR}, the directory `billing local up` used",
    "local hour": "BILLING_LOCAL_NOW (an ISO instant the local tooling takes as now; default the wall clock)",
    # `billing customers`: the billing subjects and their subscription history, in the database
    "customers list": _DATABASE,
    "customers show": _DATABASE,
    "customers history": _DATABASE,
    "customers import": _DATABASE,
}


def _epilog(names: str) -> str:
    return f"Environment: {names}. Add --debug for a traceback on failure."


def prepare_help(app: typer.Typer) -> None:
    """Epilogs naming the environment, whole one-sentence summaries in every command list, and a
    layout that never breaks a line inside a hyphenated word."""
    document_environment(app)
    summarize(app)
    _unbroken_hyphens(app)


# U+2011 NON-BREAKING HYPHEN: textwrap breaks after an ASCII "-" only
_HELD = "\u2011"


def _unbroken_hyphens(app: typer.Typer) -> None:
    """Every command's help formatter keeps hyphenated words whole (`--queue-url`, `no-allow-rejected`,
    `./.billing-local`): click's wrapper (textwrap, break_on_hyphens) would split them across lines,
    and a name cut in two cannot be copied. The hyphens are held while wrapping and restored after."""
    from typer._click.core import Context
    from typer._click.formatting import HelpFormatter
    from typer.core import TyperCommand, TyperGroup

    class Formatter(HelpFormatter):
        def write_text(self, text: str) -> None:
            super().write_text(text.replace("-", _HELD))

        def write_dl(self, rows: Sequence[tuple[str, str]], col_max: int = 30, col_spacing: int = 2) -> None:
            held = [(first, second.replace("-", _HELD)) for first, second in rows]
            super().write_dl(held, col_max, col_spacing)

        def getvalue(self) -> str:
            return super().getvalue().replace(_HELD, "-")

    class HelpContext(Context):
        formatter_class = Formatter

    class Command(TyperCommand):
        context_class = HelpContext

    class Group(TyperGroup):
        context_class = HelpContext

    def walk(instance: typer.Typer) -> None:
        instance.info.cls = Group
        for command in instance.registered_commands:
            if command.cls in (None, TyperCommand):  # a command's own class is left alone
                command.cls = Command
        for group in instance.registered_groups:
            if group.typer_instance is not None:
                walk(group.typer_instance)

    walk(app)


# a sentence ends at ".", "!" or "?" followed by a capital or a backquote ("e.g. for" does not end one)
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z`])")


def first_sentence(text: str) -> str:
    """The first sentence of the first paragraph, on one line."""
    paragraph = " ".join(inspect.cleandoc(text).split("\n\n", 1)[0].split())
    return _SENTENCE_END.split(paragraph, 1)[0]


def summarize(app: typer.Typer) -> None:
    """Give every command and sub-app without a ``short_help`` its help's first sentence as one."""
    from typer.models import DefaultPlaceholder

    for command in app.registered_commands:
        text = command.help or (inspect.getdoc(command.callback) if command.callback else None)
        if command.short_help is None and text:
            command.short_help = first_sentence(text)
    for group in app.registered_groups:
        if group.typer_instance is None:
            continue
        text = group.help if isinstance(group.help, str) else group.typer_instance.info.help
        if isinstance(group.short_help, DefaultPlaceholder) and isinstance(text, str):
            group.short_help = first_sentence(text)
        summarize(group.typer_instance)


def document_environment(app: typer.Typer, prefix: str = "") -> None:
    """Give every command listed in ENVIRONMENT an epilog naming its variables (and its sub-apps')."""
    for command in app.registered_commands:
        name = f"{prefix}{command.name or ''}"
        if name in ENVIRONMENT and command.epilog is None:
            command.epilog = _epilog(ENVIRONMENT[name])
    for group in app.registered_groups:
        if group.typer_instance is not None and group.name:
            document_environment(group.typer_instance, f"{prefix}{group.name} ")
