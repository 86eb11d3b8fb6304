"""The SQL of the Postgres adapters: named parameters, and ledger states only ever bound from the enum."""

from __future__ import annotations

import re

import pytest

from billing.adapters import postgres, postgres_reconcile
from billing.adapters.postgres import STATE_PARAMETERS, Statement
from billing.domain.model import REFUSED_STATES, UNFINISHED_STATES, CustomerStatus, LedgerState
from billing.migrate import migration_files


def statements() -> dict[str, Statement]:
    found = {}
    for module in (postgres, postgres_reconcile):
        for name, value in vars(module).items():
            if isinstance(value, Statement):
                found[f"{module.__name__}.{name}"] = value
    return found


def test_named_parameters_become_positional_in_order_of_first_use() -> None:
    # Given SQL with a name used twice and a cast
    sql = "SELECT :b::text, :a, :b WHERE x = 'a:b' -- note: here"
    # When it is compiled
    statement = Statement.of(sql)
    # Then each name has one number, casts and text are untouched, and values bind by name
    assert statement.text == "SELECT $1::text, $2, $1 WHERE x = 'a:b' -- note: here"
    assert statement.args(a=1, b=2) == [2, 1]


def test_a_state_parameter_is_bound_from_the_enum() -> None:
    statement = Statement.of("WHERE state = :state_submitted OR state = ANY(:states_unfinished)")
    assert statement.args() == [
        LedgerState.SUBMITTED.value,
        sorted(s.value for s in UNFINISHED_STATES),
    ]


def test_a_misspelt_state_fails_when_the_statement_is_defined() -> None:
    with pytest.raises(ValueError, match="state_submited"):
        Statement.of("UPDATE ledger SET state = :state_submited")


def test_a_missing_or_unknown_parameter_is_refused() -> None:
    statement = Statement.of("SELECT :a")
    with pytest.raises(TypeError, match="missing"):
        statement.args()
    with pytest.raises(TypeError, match="unknown"):
        statement.args(a=1, b=2)


def test_a_ledger_state_cannot_be_passed_in_by_a_caller() -> None:
    statement = Statement.of("UPDATE ledger SET state = :state_accepted")
    with pytest.raises(TypeError, match="not from LedgerState"):
        statement.args(state_accepted="accepted")


def test_the_state_sets_are_what_the_domain_says() -> None:
    assert set(STATE_PARAMETERS["states_unfinished"]) == {s.value for s in LedgerState if not s.final}  # type: ignore[call-overload]
    assert set(STATE_PARAMETERS["states_refused"]) == {s.value for s in REFUSED_STATES}  # type: ignore[call-overload]


@pytest.mark.parametrize("name", sorted(statements()))
def test_no_statement_spells_a_ledger_state_or_customer_status_in_its_text(name: str) -> None:
    # Given every statement of the Postgres adapters, When its SQL text is read, Then no state or status
    # appears as a quoted literal: they are parameters bound from LedgerState and CustomerStatus
    literals = set(re.findall(r"'([a-z]+)'", statements()[name].text))
    assert literals & ({s.value for s in LedgerState} | {s.value for s in CustomerStatus}) == set()


def test_every_ledger_statement_is_a_named_statement() -> None:
    assert {"_LOAD", "_DECIDE", "_CLAIM", "_RECORD", "_EXPIRE", "_TO_BILL"} <= {
        n.rsplit(".", 1)[1] for n in statements() if n.startswith("billing.adapters.postgres.")
    }


def test_the_ledger_table_accepts_exactly_the_enum_s_states() -> None:
    # Given the schema the migrations build, When the ledger's state check is read, Then it lists exactly
    # LedgerState's values: a state added to the enum without a migration (or the reverse) fails here
    schema = "\n".join(sql for _, sql in migration_files())
    checks = re.findall(r"state\s+text NOT NULL CHECK \(state IN \(([^)]*)\)\)", schema)
    assert len(checks) == 1
    assert set(re.findall(r"'([a-z]+)'", checks[0])) == {s.value for s in LedgerState}
