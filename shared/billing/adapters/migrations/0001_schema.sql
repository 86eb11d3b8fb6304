-- Customers, rate card, usage, billing runs and the ledger.

CREATE TABLE customers (
    id                      text PRIMARY KEY CHECK (id ~ '^[A-Za-z0-9._:-]{1,128}$'),
    marketplace             text NOT NULL CHECK (marketplace IN ('aws', 'gcp', 'azure')),
    status                  text NOT NULL DEFAULT 'active' CHECK (status IN ('active', 'suspended', 'cancelled')),
    active_from             timestamptz NOT NULL,
    active_until            timestamptz,
    aws_customer_identifier text,
    aws_account_id          text,
    aws_product_code        text,
    gcp_usage_reporting_id  text,
    gcp_service_name        text,
    azure_resource_id       text,
    azure_resource_uri      text,
    azure_plan_id           text,
    -- bumped by every billing decision: decisions for one customer are serialised by it
    billing_version         bigint NOT NULL DEFAULT 0,
    created_at              timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT aws_identifiers CHECK (marketplace <> 'aws' OR (
        (aws_customer_identifier IS NULL) <> (aws_account_id IS NULL) AND aws_product_code IS NOT NULL)),
    CONSTRAINT gcp_identifiers CHECK (marketplace <> 'gcp' OR (
        gcp_usage_reporting_id IS NOT NULL AND gcp_service_name IS NOT NULL)),
    CONSTRAINT azure_identifiers CHECK (marketplace <> 'azure' OR (
        (azure_resource_id IS NULL) <> (azure_resource_uri IS NULL) AND azure_plan_id IS NOT NULL)),
    CONSTRAINT active_range CHECK (active_until IS NULL OR active_until > active_from)
);

-- How a usage metric becomes a quantity of a marketplace dimension: quantity = usage * factor.
CREATE TABLE rate_card (
    marketplace text NOT NULL CHECK (marketplace IN ('aws', 'gcp', 'azure')),
    metric      text NOT NULL,
    dimension   text NOT NULL CHECK (dimension ~ '^[A-Za-z0-9_./-]{1,100}$'),
    factor      numeric NOT NULL CHECK (factor > 0),
    PRIMARY KEY (marketplace, metric, dimension)
);

-- The Postgres usage source (the embedded default; production may read Elasticsearch instead).
CREATE TABLE usage (
    id          bigserial PRIMARY KEY,
    ts          timestamptz NOT NULL,
    customer_id text NOT NULL,
    cluster_id  text NOT NULL,
    metric      text NOT NULL,
    quantity    numeric NOT NULL
);
CREATE INDEX usage_customer_ts ON usage (customer_id, ts);

CREATE TABLE billing_runs (
    id            uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    period        timestamptz NOT NULL UNIQUE,
    attempts      integer NOT NULL DEFAULT 1,
    dispatched    integer NOT NULL DEFAULT 0,
    started_at    timestamptz NOT NULL DEFAULT now(),
    dispatched_at timestamptz
);

-- One row per (customer, dimension, hour): the decision, then the marketplace's answer.
CREATE TABLE ledger (
    customer_id text NOT NULL REFERENCES customers (id),
    period      timestamptz NOT NULL,
    dimension   text NOT NULL,
    quantity    bigint NOT NULL CHECK (quantity >= 0),
    state       text NOT NULL CHECK (state IN (
        'pending', 'submitted', 'accepted', 'duplicate', 'rejected', 'failed', 'skipped', 'expired')),
    rated       numeric NOT NULL,   -- usage newly accounted for by this decision (negative: a correction)
    carry_in    numeric NOT NULL,   -- balance carried from earlier decisions
    carry_out   numeric NOT NULL,   -- balance left for later decisions
    run_id      uuid NOT NULL,
    record_id   text,               -- the marketplace's id for the accepted record
    attempts    integer NOT NULL DEFAULT 0,
    last_error  text,
    lease_owner text,
    lease_until timestamptz,
    decided_at  timestamptz NOT NULL DEFAULT now(),
    updated_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (customer_id, period, dimension)
);
CREATE INDEX ledger_period_state ON ledger (period, state);

-- The carried fraction (or credit, when negative) per customer and dimension.
CREATE TABLE balances (
    customer_id text NOT NULL REFERENCES customers (id),
    dimension   text NOT NULL,
    carry       numeric NOT NULL,
    updated_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (customer_id, dimension)
);

-- The rated usage last seen for each (customer, dimension, hour): what changes later is late usage.
CREATE TABLE usage_observations (
    customer_id text NOT NULL,
    dimension   text NOT NULL,
    hour        timestamptz NOT NULL,
    rated       numeric NOT NULL,
    PRIMARY KEY (customer_id, dimension, hour)
);
