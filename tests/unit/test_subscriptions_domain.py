"""The subscription fold: replays and reordering change nothing; billing follows the status timeline."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from hypothesis import given
from hypothesis import strategies as st

from billing.domain.model import Marketplace, Period
from billing.domain.subscriptions import (
    EventSource,
    Identity,
    LifecycleEvent,
    LifecycleKind,
    SubjectKey,
    SubscriptionStatus,
    apply,
    billable_during,
    final_bill_due,
    fold,
    initial,
)

KEY = SubjectKey(Marketplace.AWS, "arn:aws:license-manager::123456789012:license:l-1")
T0 = datetime(2026, 11, 26, 10, tzinfo=UTC)


def ev(
    kind: LifecycleKind,
    *,
    eff: timedelta,
    order: timedelta | None = None,
    eid: str | None = None,
    **extra: object,
) -> LifecycleEvent:
    return LifecycleEvent(
        key=KEY,
        kind=kind,
        effective_at=T0 + eff,
        ordering=T0 + (order if order is not None else eff),
        event_id=eid or f"{kind}-{eff}-{order}",
        source=EventSource.AWS_AGREEMENT,
        **extra,  # type: ignore[arg-type]
    )


def hour(h: int) -> Period:
    return Period(T0 + timedelta(hours=h))


def test_subscribe_then_end_mid_hour_bills_up_to_the_end_hour_and_not_after() -> None:
    # Given a subject active from 10:00 that unsubscribes at 12:20
    state = fold(
        KEY,
        [
            ev(LifecycleKind.ACTIVE, eff=timedelta(0)),
            ev(LifecycleKind.ENDING, eff=timedelta(hours=2, minutes=20)),
        ],
    )
    # Then it is billable for 10:00, 11:00 and the partial 12:00, never for 13:00
    assert [billable_during(state, hour(h)) for h in (-1, 0, 1, 2, 3)] == [False, True, True, True, False]
    assert state.ends_at == T0 + timedelta(hours=2, minutes=20)
    assert final_bill_due(state, T0 + timedelta(hours=2)) is None
    assert final_bill_due(state, T0 + timedelta(hours=2, minutes=30)) == state.ends_at


def test_suspension_leaves_a_gap_and_reinstatement_resumes() -> None:
    state = fold(
        KEY,
        [
            ev(LifecycleKind.ACTIVE, eff=timedelta(0)),
            ev(LifecycleKind.SUSPENDED, eff=timedelta(hours=1)),
            ev(LifecycleKind.REINSTATED, eff=timedelta(hours=3)),
        ],
    )
    assert [billable_during(state, hour(h)) for h in range(5)] == [True, False, False, True, True]
    assert state.status is SubscriptionStatus.ACTIVE


def test_a_newer_revert_cancels_a_scheduled_end_but_an_older_one_does_not() -> None:
    # Given a cancellation announced at 11:00 that takes effect at 15:00
    ending = ev(LifecycleKind.ENDING, eff=timedelta(hours=5), order=timedelta(hours=1))
    active = ev(LifecycleKind.ACTIVE, eff=timedelta(0))
    # When the customer reverts it at 12:00 (newer than the announcement)
    revert = ev(LifecycleKind.ACTIVE, eff=timedelta(hours=2), order=timedelta(hours=2))
    assert fold(KEY, [active, ending, revert]).ends_at is None
    # But an activation announced before the cancellation leaves the end in place, whatever the order
    stale = ev(LifecycleKind.REINSTATED, eff=timedelta(minutes=30), order=timedelta(minutes=30))
    assert fold(KEY, [ending, stale, active]).ends_at == T0 + timedelta(hours=5)


def test_a_plan_change_moves_the_dimensions_from_the_hour_it_takes_effect() -> None:
    state = fold(
        KEY,
        [
            ev(LifecycleKind.ACTIVE, eff=timedelta(0), plan="basic", dimensions=("requests",)),
            ev(LifecycleKind.PLAN_CHANGED, eff=timedelta(hours=2, minutes=40), plan="pro"),
        ],
    )
    assert [(p.plan if (p := state.plan_for(hour(h))) else None) for h in (-1, 0, 1, 2, 3)] == [
        None,
        "basic",
        "basic",
        "pro",
        "pro",
    ]
    # the change names no dimensions: the plan keeps the ones it had
    assert state.plan_for(hour(3)).dimensions == ("requests",)  # type: ignore[union-attr]


def test_identity_and_tenant_are_merged_from_every_event() -> None:
    state = fold(
        KEY,
        [
            ev(LifecycleKind.ACTIVE, eff=timedelta(0), identity=Identity(aws_account_id="123456789012")),
            ev(
                LifecycleKind.QUANTITY_CHANGED,
                eff=timedelta(hours=1),
                quantity=3,
                tenant_id="tenant-7",
                identity=Identity(aws_license_arn=KEY.subject_id),
            ),
        ],
    )
    assert state.tenant_id == "tenant-7"
    assert state.identity == Identity(aws_account_id="123456789012", aws_license_arn=KEY.subject_id)
    assert state.status is SubscriptionStatus.ACTIVE


def test_an_event_of_another_subject_is_refused() -> None:
    other = SubjectKey(Marketplace.GCP, "entitlement-1")
    try:
        apply(initial(other), ev(LifecycleKind.ACTIVE, eff=timedelta(0)))
    except ValueError:
        return
    raise AssertionError("applied an event to the wrong subject")


# --- properties: any order, any replay ----------------------------------------------------------

KINDS = list(LifecycleKind)
events_strategy = st.lists(
    st.builds(
        lambda i, kind, eff, order, plan: ev(
            kind,
            eff=timedelta(minutes=eff),
            order=timedelta(minutes=order),
            eid=f"e{i}",
            plan=plan,
        ),
        st.integers(0, 10_000),
        st.sampled_from(KINDS),
        st.integers(-120, 600),
        st.integers(-120, 600),
        st.sampled_from([None, "basic", "pro"]),
    ),
    max_size=8,
    unique_by=lambda e: e.event_id,
)


@given(events=events_strategy, data=st.data())
def test_any_order_and_any_replay_give_the_same_state(
    events: list[LifecycleEvent], data: st.DataObject
) -> None:
    # Given the events in the marketplace's order
    expected = fold(KEY, sorted(events, key=lambda e: e.sort_key))
    # When they arrive shuffled, with some delivered again at random points
    replays = data.draw(st.lists(st.sampled_from(events), max_size=6)) if events else []
    arrival = data.draw(st.permutations([*events, *replays]))
    got = fold(KEY, arrival)
    # Then the state, and so every billing answer, is the same
    assert got == expected
    for h in range(-3, 12):
        assert billable_during(got, hour(h)) == billable_during(expected, hour(h))


@given(events=events_strategy)
def test_applying_an_event_twice_changes_nothing(events: list[LifecycleEvent]) -> None:
    state = fold(KEY, events)
    for event in events:
        assert apply(state, event) == state


def test_a_late_registration_links_the_tenant_but_never_revives_an_ended_subscription() -> None:
    ended = fold(
        KEY,
        [
            ev(LifecycleKind.ACTIVE, eff=timedelta(0)),
            ev(LifecycleKind.ENDED, eff=timedelta(hours=1)),
            ev(LifecycleKind.REGISTERED, eff=timedelta(hours=2), tenant_id="tenant-9"),
        ],
    )
    assert ended.tenant_id == "tenant-9"
    assert ended.status is SubscriptionStatus.ENDED
    assert not billable_during(ended, hour(2))
