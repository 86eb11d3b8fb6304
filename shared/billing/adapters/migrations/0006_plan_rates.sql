-- Plan-aware rating (#13: "a plan change moves the subject's dimensions/rates from the hour it takes
-- effect"). A rate belongs to a marketplace AND a plan; every existing row becomes the marketplace's
-- default plan, which rates any subject without a plan, or with a plan the card does not list, exactly
-- as before this migration. A plan's rates replace the default plan's (they are not added to them).
ALTER TABLE rate_card
    ADD COLUMN IF NOT EXISTS plan text NOT NULL DEFAULT 'default'
        CONSTRAINT rate_card_plan_format CHECK (char_length(plan) BETWEEN 1 AND 200);
ALTER TABLE rate_card DROP CONSTRAINT IF EXISTS rate_card_pkey;
ALTER TABLE rate_card ADD CONSTRAINT rate_card_pkey PRIMARY KEY (marketplace, plan, metric, dimension);

