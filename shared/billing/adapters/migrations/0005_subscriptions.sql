-- Subscriptions (#13): the marketplaces say who is billed, for which hours, under which identity.
--
-- Design: a billing subject (one marketplace agreement: an AWS license or legacy customer/product, a
-- Google entitlement, an Azure SaaS subscription or managed app) is one row of `customers` once it is
-- linked to the seller's tenant id, and that row's id IS the tenant id: usage is recorded against the
-- tenant id, and the dispatcher, the biller, the ledger and reconcile all key on customers.id, so none
-- of them changes. Before the link (an AWS agreement event arrives before the buyer registers) a subject
-- exists only in `subscription_state`, with customer_id NULL: it is not billed, and nothing is lost,
-- because its events are all kept. One tenant id is linked to at most one subject (UNIQUE below), so two
-- licenses of one AWS account are two tenants and two customers, never one usage stream billed twice.
--
-- `subscription_events` is the append-only history (every event as received, deduplicated by the
-- marketplace's own event id); `subscription_state` is the fold of that history
-- (billing.domain.subscriptions), rewritten in the same transaction as each append.

-- AWS 2026 listings meter by CustomerAWSAccountId + LicenseArn with no ProductCode; legacy customers by
-- CustomerIdentifier (or account id) + ProductCode. A row is one or the other, never both: AWS would
-- bill both records.
ALTER TABLE customers
    ADD COLUMN IF NOT EXISTS aws_license_arn text,
    DROP CONSTRAINT IF EXISTS aws_identifiers,
    DROP CONSTRAINT IF EXISTS customers_aws_license_arn_format,
    ADD CONSTRAINT aws_identifiers CHECK (marketplace <> 'aws' OR (
        (aws_license_arn IS NULL
            AND (aws_customer_identifier IS NULL) <> (aws_account_id IS NULL) AND aws_product_code IS NOT NULL)
        OR (aws_license_arn IS NOT NULL AND aws_account_id IS NOT NULL
            AND aws_customer_identifier IS NULL AND aws_product_code IS NULL))),
    -- arn:aws:license-manager::<account>:license:l-<id> (License Manager ARNs; 2048 is the API's cap)
    ADD CONSTRAINT customers_aws_license_arn_format
        CHECK (char_length(aws_license_arn) <= 2048
               AND aws_license_arn ~ '^arn:aws[a-z-]*:license-manager:[a-z0-9-]*:[0-9]{0,12}:license[:/][A-Za-z0-9_-]{1,128}$');

CREATE TABLE IF NOT EXISTS subscription_events (
    id            bigserial PRIMARY KEY,
    marketplace   text NOT NULL CHECK (marketplace IN ('aws', 'gcp', 'azure')),
    subject_id    text NOT NULL CHECK (char_length(subject_id) BETWEEN 1 AND 1024),
    event_id      text NOT NULL CHECK (char_length(event_id) BETWEEN 1 AND 512),
    kind          text NOT NULL CHECK (kind IN ('registered', 'requested', 'active', 'plan_changed', 'quantity_changed',
                                                'suspended', 'reinstated', 'ending', 'ended')),
    source        text NOT NULL,
    effective_at  timestamptz NOT NULL,
    ordering      timestamptz NOT NULL,
    sequence      bigint NOT NULL DEFAULT 0,
    plan          text,
    dimensions    text[],
    quantity      bigint CHECK (quantity >= 0),
    tenant_id     text,
    identity      jsonb NOT NULL DEFAULT '{}',
    raw           jsonb,
    received_at   timestamptz NOT NULL DEFAULT now(),
    -- at-least-once delivery: the marketplace's id names one event, kept once
    UNIQUE (marketplace, event_id)
);
CREATE INDEX IF NOT EXISTS subscription_events_subject ON subscription_events (marketplace, subject_id, id);

-- The history is evidence: an operator reads it to see why a customer was or was not billed.
CREATE OR REPLACE FUNCTION subscription_events_append_only() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'subscription_events is append-only (% refused)', TG_OP;
END $$;
DROP TRIGGER IF EXISTS subscription_events_append_only ON subscription_events;
CREATE TRIGGER subscription_events_append_only BEFORE UPDATE OR DELETE ON subscription_events
    FOR EACH ROW EXECUTE FUNCTION subscription_events_append_only();

CREATE TABLE IF NOT EXISTS subscription_state (
    marketplace   text NOT NULL CHECK (marketplace IN ('aws', 'gcp', 'azure')),
    subject_id    text NOT NULL,
    customer_id   text UNIQUE REFERENCES customers (id),
    tenant_id     text,
    status        text NOT NULL CHECK (status IN ('pending', 'active', 'suspended', 'ended')),
    -- the instants the subject is billable (ACTIVE); the dispatcher bills an hour that overlaps it
    billable      tstzmultirange NOT NULL DEFAULT '{}',
    ends_at       timestamptz,
    plans         jsonb NOT NULL DEFAULT '[]',  -- [{"start", "plan", "dimensions", "quantity"}]
    identity      jsonb NOT NULL DEFAULT '{}',
    -- why a subject with a tenant is not linked yet (identity incomplete, tenant taken), for operators
    link_problem  text,
    events        integer NOT NULL DEFAULT 0,
    updated_at    timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (marketplace, subject_id)
);
CREATE INDEX IF NOT EXISTS subscription_state_billable ON subscription_state USING gist (billable);

-- AWS agreement events name only the agreement: its license is found through earlier events
CREATE INDEX IF NOT EXISTS subscription_events_aws_agreement ON subscription_events ((identity->>'aws_agreement_id'))
    WHERE marketplace = 'aws';
