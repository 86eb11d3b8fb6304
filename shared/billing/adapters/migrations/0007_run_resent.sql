-- The messages sent again for an hour dispatched before (`--resend-unbilled`, the dispatcher event's
-- "resend_unbilled"), summed over every resend: `billing status` shows them beside `dispatched`, which
-- counts only the first dispatch (an hour dispatched before its customers existed reads "dispatched 0"
-- although its customers were sent and billed). Read by the operator tooling only, never by billing.
ALTER TABLE billing_runs ADD COLUMN resent integer NOT NULL DEFAULT 0;
